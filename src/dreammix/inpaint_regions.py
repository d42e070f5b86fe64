"""``python src/inpaint.py image=… regions=[…]``: multi-subject inpainting from the command line.

Each region is ``{mask: <file>, prompt: <text>, lora: <train run>/lora, lora_scale: 1.0,
eliminate: [words]}``. Its TAS words are ``eliminate`` when given; else, with ``tas.enabled``, the
offline selection from its own LoRA run's attribute dictionary (``dreammix.lora_catalog``). Every
file is checked before the model loads; the algorithm is :mod:`dreammix.multi_region`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dreammix.cli import config_value
from dreammix.data.images import load_image, load_mask
from dreammix.errors import DreamMixError
from dreammix.multi_region import Region, check_disjoint

log = logging.getLogger(__name__)


def regions_from_config(cfg: DictConfig, image_size: tuple[int, int]) -> list[Region]:
    """Typed regions with loaded masks and resolved TAS words (no model needed)."""
    from dreammix.lora_catalog import read_lora_entry, suggested_eliminate
    from dreammix.tas import IDENTIFIER, check_identifier, clean_eliminate_words

    raw = OmegaConf.to_container(cfg.regions, resolve=True)
    if not isinstance(raw, list):
        raise DreamMixError("regions must be a list of {mask, prompt, lora}", "regions")
    regions = []
    for i, item in enumerate(raw):
        where = f"regions[{i}]"
        region = Region.from_mapping(item, i)
        if not Path(str(region.mask)).expanduser().is_file():
            raise DreamMixError("file not found", f"{where}.mask={region.mask}")
        entry = read_lora_entry(region.lora) if region.lora else None  # raises when no weights
        mask = load_mask(str(region.mask), size=image_size)
        if not mask.any():
            raise DreamMixError("mask is empty: no pixel is marked to fill (white = fill)", f"{where}.mask={region.mask}")
        from_dictionary = bool(cfg.tas.enabled and region.eliminate is None and entry and entry.attributes)
        if not cfg.tas.enabled:
            eliminate: list[str] = []
        elif region.eliminate is not None:
            eliminate = clean_eliminate_words(region.eliminate, IDENTIFIER)
        else:
            eliminate = suggested_eliminate(entry, region.prompt)
        if eliminate or from_dictionary:  # as for one subject: TAS with a dictionary needs the identifier
            try:
                check_identifier(region.prompt, IDENTIFIER)
            except DreamMixError as exc:
                raise DreamMixError(exc.what, f"{where}.prompt") from exc
        log.info("region %d: %s, LoRA %s, TAS %s", i, region.prompt, region.lora or "none (base model)", eliminate or "off")
        regions.append(Region(mask, region.prompt, region.lora, region.lora_scale, eliminate))
    check_disjoint([r.mask for r in regions])
    return regions


def _check_sampler(cfg: DictConfig) -> None:
    """The public code's sampling knobs (``sampler.*``) run inside the single-subject call only;
    refused here rather than silently ignored (scheduler and guidance scale do apply)."""
    if cfg.get("sampler") is None:
        return
    import dataclasses

    from dreammix.inference_setup import sampler_spec
    from dreammix.sampling import SamplerSpec

    if dataclasses.replace(sampler_spec(cfg), name="default") != SamplerSpec():
        raise DreamMixError("the sampler knobs (sharpness, size scale, start, base switch, TAS context, upscaler) "
                            "are not supported with regions= yet; use sampler=default", "sampler")  # fmt: skip


def run_inpaint_regions(cfg: DictConfig) -> list[Path]:
    """Inpaint every region of ``cfg.image``; write ``cfg.out`` (``<stem>_<i>.png`` for N images) and,
    with ``save_grid``, ``<stem>[_<i>]_grid.png``: input | all masks | LCG result | final."""
    from dreammix.inference_setup import SCHEDULERS, load_pipeline, output_paths, set_scheduler, write_outputs
    from dreammix.adm import resolve_device

    for key in ("mask", "prompt", "lora"):
        if not OmegaConf.is_missing(cfg, key) and cfg.get(key) is not None:
            raise DreamMixError(f"give {key} inside each region, not at the top level, with regions=", key)
    if not Path(str(cfg.image)).expanduser().is_file():
        raise DreamMixError("file not found", f"image={cfg.image}")
    steps = config_value(cfg, "steps", int)
    num_images = config_value(cfg, "num_images", int)
    lambda_ = config_value(cfg, "dif.lambda_", float)
    if cfg.scheduler not in (None, "default") and cfg.scheduler not in SCHEDULERS:
        raise DreamMixError(f"unknown scheduler {cfg.scheduler!r}; choose from default, {', '.join(SCHEDULERS)}", "scheduler")
    _check_sampler(cfg)
    paths = output_paths(cfg.out, max(1, num_images))
    image = load_image(cfg.image)
    regions = regions_from_config(cfg, image.size)

    device = torch.device(resolve_device(str(cfg.get("device", "auto"))))
    pipe = load_pipeline(cfg, device)
    set_scheduler(pipe, cfg.scheduler)
    result = pipe.inpaint_regions(
        image, regions,
        negative_prompt=cfg.get("negative_prompt"),
        num_inference_steps=steps,
        guidance_scale=config_value(cfg, "guidance_scale", float),
        lambda_=lambda_,
        tas_stages=list(cfg.tas.stages) if cfg.tas.enabled else [],
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(config_value(cfg, "seed", int)),
        resolution=cfg.get("resolution"),
        crop_scale=config_value(cfg, "dif.crop_scale", float),
        min_crop_frac=config_value(cfg, "dif.min_crop_frac", float),
        blend=bool(cfg.dif.blend),
        feather_radius=cfg.dif.get("feather_radius"),
    )  # fmt: skip

    union = np.maximum.reduce([np.asarray(r.mask, np.float32) for r in regions])
    written = write_outputs(paths, result, image, union, save_grid=bool(cfg.save_grid))
    log.info("wrote %s (%d regions, λ=%.2f, crops %s)", ", ".join(map(str, written)), len(regions), lambda_, result.crop_boxes)
    return written
