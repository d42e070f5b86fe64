"""What every base model is and how a diffusers pipeline is read from a hub id or a folder.

The pieces both loaders share — :mod:`dreammix.models.loading` (plain SDXL inpainting, the
dispatcher) and :mod:`dreammix.models.fooocus` (SDXL + the Fooocus patch) — so neither imports
the other's module for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dreammix.errors import DreamMixError


@dataclass(frozen=True)
class ModelSpec:
    """Where the base model comes from and how to hold it (``conf/model/*.yaml``)."""

    name: str
    pretrained: str
    revision: str | None = None
    variant: str | None = None
    resolution: int = 1024
    weight_dtype: str = "auto"
    vae_fp32: bool = True
    gradient_checkpointing: bool = False
    compile_unet: bool = False
    build_if_missing: bool = False
    # Build the real SDXL inpainting architecture with random weights (performance runs, no download).
    random_weights: bool = False

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise DreamMixError(f"resolution must be a positive multiple of 8, got {self.resolution}", "model.resolution")
        if self.weight_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise DreamMixError(
                f"weight_dtype must be auto|float32|bfloat16|float16, got {self.weight_dtype!r}", "model.weight_dtype"
            )

    @classmethod
    def from_config(cls, cfg) -> "ModelSpec":
        fields = cls.__dataclass_fields__
        return cls(**{k: cfg[k] for k in cfg if k in fields})


def resolve_dtype(weight_dtype: str, device: torch.device | str) -> torch.dtype:
    """``auto`` → bf16 on CUDA (frozen weights, half the memory), fp32 elsewhere."""
    if weight_dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, weight_dtype)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def check_model_folder(source: str) -> None:
    """A local ``source`` must be a diffusers folder: say so in one line before diffusers tries."""
    if _looks_like_path(source) and not (Path(source).expanduser() / "model_index.json").is_file():
        raise DreamMixError(f"no diffusers model at {source} (model_index.json missing)", "model.pretrained")


def pretrained_pipeline(cls, spec: ModelSpec, dtype: torch.dtype):  # noqa: ANN001 - a diffusers pipeline class
    """``cls.from_pretrained`` of ``spec.pretrained`` (hub id or local folder, ``~`` expanded);
    a missing or unreadable model is a one-line :class:`DreamMixError` naming ``model.pretrained``."""
    source = spec.pretrained
    # The VAE is read straight into fp32 when it is to run in fp32: loading it in bf16 and casting
    # afterwards would keep the bf16 rounding of its weights.
    dtypes = {"default": dtype, "vae": torch.float32} if spec.vae_fp32 else dtype
    try:
        return cls.from_pretrained(
            str(Path(source).expanduser()) if _looks_like_path(source) else source,
            revision=spec.revision,
            variant=spec.variant,
            dtype=dtypes,
        )
    except (OSError, ValueError) as exc:
        raise DreamMixError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}", "model.pretrained") from exc


def finish_pipeline(pipe, spec: ModelSpec):  # noqa: ANN001 - a diffusers pipeline
    """The settings every loaded pipeline gets: VAE in fp32 when ``spec.vae_fp32``, no progress bar."""
    if spec.vae_fp32 and pipe.vae.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
