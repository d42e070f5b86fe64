"""Load the base inpainting pipeline from a hub id, a local folder, or the built tiny model; the
one entry for either base (plain SDXL inpainting, or SDXL + Fooocus patch: :mod:`.fooocus`).

All three go through ``StableDiffusionXLInpaintPipeline.from_pretrained`` so the tiny model used
in tests exercises the exact code path of the real one.
"""

from __future__ import annotations

import torch

from dreammix.models.fooocus import FooocusSpec, load_fooocus_components
from dreammix.models.pretrained import (  # noqa: F401 - re-exported: callers import them from here
    ModelSpec,
    _looks_like_path,
    check_model_folder,
    finish_pipeline,
    pretrained_pipeline,
    resolve_dtype,
)


def load_inpaint_pipeline(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """The diffusers SDXL inpainting pipeline for ``spec`` (weights in ``dtype``, VAE fp32 if asked)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    if spec.random_weights:
        from dreammix.models.sdxl_arch import build_sdxl_arch_pipeline

        return build_sdxl_arch_pipeline(dtype)
    source = spec.pretrained
    if spec.build_if_missing:
        from dreammix.models.tiny import ensure_tiny_pipeline

        ensure_tiny_pipeline(source)
    check_model_folder(source)
    return finish_pipeline(pretrained_pipeline(StableDiffusionXLInpaintPipeline, spec, dtype), spec)


def model_spec_from_config(cfg) -> ModelSpec:
    """The spec of ``conf/model/<name>.yaml``: a Fooocus spec when the config names a patch file."""
    if cfg.get("patch_file"):
        return FooocusSpec.from_config(cfg)
    return ModelSpec.from_config(cfg)


def load_pipeline(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """Load either base as an SDXL inpainting pipeline: every caller then treats both alike.

    ``spec.compile_unet`` wraps the UNet in ``torch.compile`` in place (``Module.compile``): it
    compiles lazily at the first call, so adapters attached afterwards (training LoRA, a subject
    LoRA for inference) are part of the graph, and parameter names, hence LoRA checkpoints, stay.
    """
    if hasattr(spec, "patch_file"):
        pipe = load_fooocus_components(spec, dtype)
    else:
        pipe = load_inpaint_pipeline(spec, dtype)
    if spec.compile_unet:
        pipe.unet.compile()
    return pipe
