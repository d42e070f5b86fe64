"""What every inference entry shares (``inpaint.py`` for one region or several, ``eval.py``, the
app): the ``scheduler=`` table, the sampler-preset check, loading the base model as one
:class:`~dreammix.pipeline.DreamMixInpaintPipeline`, and output naming and writing. Kept apart from
the entry modules so that the multi-region and multi-subject extensions need not import the
single-subject modules that dispatch to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from dreammix.atomic import atomic_save_image
from dreammix.errors import DreamMixError
from dreammix.imaging import image_strip

#: ``scheduler=`` names → diffusers classes (+ config overrides). ``default`` keeps the model's.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    # Fooocus's / the public code's default sampler, "dpmpp_2m_sde_gpu" + "karras" (its noise comes
    # from a Brownian tree there, from the generator here)
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (built from the model's own scheduler config)."""
    if name in (None, "default"):
        return
    if name not in SCHEDULERS:
        raise DreamMixError(f"unknown scheduler {name!r}; choose from default, {', '.join(SCHEDULERS)}", "scheduler")
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def sampler_spec(cfg: DictConfig):
    """``cfg.sampler`` as a checked :class:`~dreammix.sampling.SamplerSpec`, refused (before any
    loading) when ``cfg.model`` cannot honour one of its knobs."""
    from dreammix.sampling import SamplerSpec

    spec = SamplerSpec.from_config(cfg.get("sampler"))
    spec.check_model(cfg.model)
    return spec


def output_paths(out: str | Path, num_images: int) -> list[Path]:
    """``out`` itself for one image, ``<stem>_0.png … <stem>_{N-1}.png`` beside it for N."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise DreamMixError(f"output must be a .png path, got {str(out)!r}", "out")
    if num_images == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num_images)]


def load_pipeline(cfg: DictConfig, device: torch.device):
    """The base model of ``cfg.model`` as a :class:`DreamMixInpaintPipeline` on ``device`` (one UNet)."""
    from dreammix.models.loading import load_pipeline as load_base_pipeline
    from dreammix.models.loading import model_spec_from_config, resolve_dtype
    from dreammix.pipeline import DreamMixInpaintPipeline

    spec = model_spec_from_config(cfg.model)
    base = load_base_pipeline(spec, resolve_dtype(spec.weight_dtype, device))
    pipe = base if isinstance(base, DreamMixInpaintPipeline) else DreamMixInpaintPipeline.from_base(base)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=not cfg.get("progress", True))
    return pipe


def write_outputs(paths: list[Path], result, image: Image.Image, mask: np.ndarray, *, save_grid: bool) -> list[Path]:
    """Write each final image (atomically, so a killed run never leaves half a PNG) and, with
    ``save_grid``, its ``<stem>_grid.png`` strip input | mask | LCG result | final; return the paths."""
    written: list[Path] = []
    mask_image = Image.fromarray((np.asarray(mask, np.float32) * 255).astype(np.uint8), mode="L")
    for i, (path, final) in enumerate(zip(paths, result.images)):
        atomic_save_image(final, path)
        written.append(path)
        if save_grid:
            lcg = result.lcg_images[i] if result.lcg_images is not None else image
            grid_path = path.with_name(f"{path.stem}_grid.png")
            atomic_save_image(image_strip([image, mask_image, lcg, final]), grid_path)
            written.append(grid_path)
    return written


def load_base_pipeline(cfg: DictConfig):
    """The base model (SDXL inpainting or Fooocus) of ``cfg.model`` as a DreamMix pipeline on
    ``cfg.device``, without a LoRA, remembering the model's own scheduler (``evaluate.prepare_pipeline``
    restores it before applying a run's ``scheduler=``)."""
    from dreammix.adm_manifest import resolve_device

    pipe = load_pipeline(cfg, torch.device(resolve_device(str(cfg.get("device", "auto")))))
    pipe._dreammix_default_scheduler = pipe.scheduler
    return pipe
