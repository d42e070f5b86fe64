"""LoRA adapters on the UNet via peft, and their export in diffusers format *with* metadata.

Paper §4.1: rank 4 on the attention key/value projections (``to_k``, ``to_v``). The exported
``pytorch_lora_weights.safetensors`` carries the peft ``LoraConfig`` as adapter metadata: without
it, ``load_lora_weights`` guesses ``alpha = rank`` and a run trained with another alpha would be
rescaled silently on reload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreammix.atomic import atomic_write_dir

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """Shape of the adapter: rank, scaling alpha (effective scale alpha/rank), targets."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=("to_k", "to_v"))
    # DoRA (Liu et al. 2024, peft ``use_dora``): a trained magnitude vector per adapted weight.
    use_dora: bool = False

    def __post_init__(self) -> None:
        from dreammix.errors import DreamMixError

        if self.rank < 1:
            raise DreamMixError(f"rank must be >= 1, got {self.rank}", "lora.rank")
        if self.alpha <= 0:
            raise DreamMixError(f"alpha must be > 0, got {self.alpha}", "lora.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise DreamMixError(f"dropout must be in [0, 1), got {self.dropout}", "lora.dropout")
        if not self.target_modules:
            raise DreamMixError("target_modules must name at least one module", "lora.target_modules")

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            init_lora_weights="gaussian",
            use_dora=self.use_dora,
        )


def add_lora(unet: torch.nn.Module, spec: LoraSpec) -> list[torch.nn.Parameter]:
    """Freeze the UNet, attach a LoRA adapter, return its (float32) trainable parameters."""
    from dreammix.errors import DreamMixError

    unet.requires_grad_(False)
    try:
        unet.add_adapter(spec.to_peft())
    except ValueError as exc:  # peft: target modules not found in the model
        raise DreamMixError(f"cannot attach LoRA: {str(exc).splitlines()[0]}", "lora.target_modules") from exc
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()  # adapters train in fp32 even when the base weights are bf16
        p.requires_grad_(True)
    return params


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers naming (what ``load_lora_weights`` expects)."""
    from peft.utils import get_peft_model_state_dict

    return _diffusers_names(get_peft_model_state_dict(unet))


def _diffusers_names(peft_names: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names where diffusers has them. It renames only attention projections
    (to_q/k/v/out.0); a file mixing both namings loads partially (``load_lora_weights`` drops the
    renamed half), so a LoRA with other targets keeps peft's names throughout (which diffusers loads)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(peft_names)
    return peft_names if any(".lora_A." in k or ".lora_B." in k for k in converted) else converted


def checkpoint_lora_state_dict(state_dict: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA of a training checkpoint (``DreamMixLoRAModule`` parameters ``unet.<module>.lora_A.<adapter>.weight``)
    in the naming of :func:`lora_state_dict`: the same tensors the run would have exported at that step."""
    peft_names = {}
    for key, value in state_dict.items():
        if not key.startswith("unet.") or "lora_" not in key:
            continue
        peft_names[key[len("unet."):].replace(f".{adapter}.", ".")] = value
    return _diffusers_names(peft_names)


def save_lora_weights(
    weights: dict[str, torch.Tensor], directory: str | Path, spec: LoraSpec, also: Callable[[Path], None] | None = None
) -> Path:
    """Write ``weights`` (naming of :func:`lora_state_dict`) as ``<directory>/pytorch_lora_weights.safetensors``
    with the adapter metadata, atomically (temp dir + rename); ``also(staging)`` adds files to the
    same folder before it appears (other formats, the model card)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}

    def build(staging: Path) -> None:
        StableDiffusionXLInpaintPipeline.save_lora_weights(
            staging,
            unet_lora_layers=weights,
            unet_lora_adapter_metadata=spec.to_peft().to_dict(),
            safe_serialization=True,
        )
        if also is not None:
            also(staging)

    # replace=True moves an older export aside before the rename, so a crash never leaves no LoRA at all.
    return atomic_write_dir(directory, build, replace=True) / LORA_WEIGHTS_NAME


def save_lora(unet: torch.nn.Module, directory: str | Path, spec: LoraSpec) -> Path:
    """Write the UNet's LoRA as ``<directory>/pytorch_lora_weights.safetensors`` (see :func:`save_lora_weights`)."""
    return save_lora_weights(lora_state_dict(unet), directory, spec)
