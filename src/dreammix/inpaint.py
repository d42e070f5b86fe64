"""``run_inpaint(cfg)``: DIF + TAS inference on one image, called by ``src/inpaint.py`` and tests.

Every user input is checked *before* the model is loaded (a wrong path fails in a second, not
after minutes of loading SDXL): image and mask files, the LoRA folder, λ, the TAS words and the
``sks`` identifier. Images of any mode are converted to RGB; masks are thresholded, and a mask
whose size differs from the image is resized to it with a warning (DESIGN: such masks exist in
the DreamBooth data); the Python pipeline itself rejects a size mismatch instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from dreammix.adm_manifest import resolve_device
from dreammix.cli import config_value
from dreammix.data.images import load_image, load_mask
from dreammix.errors import DreamMixError
from dreammix.paths import ensure_writable_dir
from dreammix.inference_setup import (  # noqa: F401 - also this module's API
    SCHEDULERS,
    load_pipeline,
    output_paths,
    sampler_spec,
    set_scheduler,
    write_outputs,
)
from dreammix.tas import IDENTIFIER, check_identifier, clean_eliminate_words
from dreammix.validation import check_lora_file

log = logging.getLogger(__name__)

def resolve_eliminate(cfg: DictConfig, prompt: str) -> list[str]:
    """The TAS words: ``tas.eliminate`` when given; else, with an attribute dictionary (``tas.attributes``
    file, or the ``subject`` config / its ADM run), the selection of the ADM code — the VLM's
    choice when ``vlm`` names one, the offline same-category rule otherwise; else none."""
    tas = cfg.tas
    if not tas.enabled:
        return []
    if tas.get("eliminate") is not None:
        words = tas.eliminate
        if isinstance(words, str):
            words = [words]
        words = clean_eliminate_words(list(words), IDENTIFIER)
        if words:
            check_identifier(prompt, IDENTIFIER)
        return words
    from dreammix.attributes import load_attributes_file, offline_attributes, select_attributes_to_eliminate

    attributes = None
    if tas.get("attributes"):
        attributes = load_attributes_file(tas.attributes)
    elif cfg.get("subject"):
        regular_dir = Path(cfg.paths.adm_dir) / cfg.subject.name
        attributes = offline_attributes(cfg.subject, regular_dir)
    if not attributes:
        log.info("TAS: no tas.eliminate words and no attribute dictionary; running without TAS")
        return []
    check_identifier(prompt, IDENTIFIER)
    client = None
    if cfg.get("vlm") is not None:
        from dreammix.vlm import make_vlm_client

        client = make_vlm_client(cfg.vlm)
    words = clean_eliminate_words(select_attributes_to_eliminate(prompt, attributes, client=client), IDENTIFIER)
    log.info("TAS: eliminating %s (selected from the attribute dictionary)", words)
    return words


def _check_paths(cfg: DictConfig) -> None:
    for key in ("image", "mask"):
        if not Path(str(cfg[key])).expanduser().is_file():
            raise DreamMixError("file not found", f"{key}={cfg[key]}")
    if cfg.get("lora"):
        from dreammix.models.lora import LORA_WEIGHTS_NAME

        lora = Path(str(cfg.lora)).expanduser()
        if not lora.is_dir():
            raise DreamMixError("LoRA folder not found", f"lora={cfg.lora}")
        if not (lora / LORA_WEIGHTS_NAME).is_file():
            raise DreamMixError(f"LoRA folder has no {LORA_WEIGHTS_NAME}", f"lora={cfg.lora}")
        check_lora_file(lora / LORA_WEIGHTS_NAME, f"lora={cfg.lora}")  # before the base model loads


def run_inpaint(cfg: DictConfig) -> list[Path]:
    """Inpaint ``cfg.image`` inside ``cfg.mask`` following ``cfg.prompt``; return the written files.

    Writes ``cfg.out`` (or ``<stem>_<i>.png`` for ``num_images > 1``), each the size of the input,
    and with ``save_grid`` a ``<stem>[_<i>]_grid.png`` strip: input | mask | LCG result | final.
    """
    if cfg.get("regions"):  # several subjects, each with its own mask, prompt and LoRA
        from dreammix.inpaint_regions import run_inpaint_regions

        return run_inpaint_regions(cfg)
    # 1. Validate everything that does not need the model
    prompt = str(cfg.prompt)
    _check_paths(cfg)
    steps = config_value(cfg, "steps", int)
    num_images = config_value(cfg, "num_images", int)
    lambda_ = config_value(cfg, "dif.lambda_", float)
    if not 0.0 <= lambda_ <= 1.0:
        raise DreamMixError(f"must be in [0, 1], got {lambda_}", "dif.lambda_")
    if steps < 1 or num_images < 1:
        raise DreamMixError("steps and num_images must be >= 1", "steps" if steps < 1 else "num_images")
    stages = list(cfg.tas.stages) if cfg.tas.enabled else []
    if cfg.scheduler not in (None, "default") and cfg.scheduler not in SCHEDULERS:
        raise DreamMixError(f"unknown scheduler {cfg.scheduler!r}; choose from default, {', '.join(SCHEDULERS)}", "scheduler")
    sampler = sampler_spec(cfg)
    paths = output_paths(cfg.out, num_images)
    for path in paths:  # a read-only or impossible location fails now, not after generating
        ensure_writable_dir(path.parent, "out")
        if path.is_dir():
            raise DreamMixError(f"{path} is a folder", "out")
    image = load_image(cfg.image)
    mask = load_mask(cfg.mask, size=image.size)
    if not mask.any():
        raise DreamMixError("mask is empty: no pixel is marked to fill (white = fill)", f"mask={cfg.mask}")
    eliminate = resolve_eliminate(cfg, prompt)

    # 2. Model, scheduler, subject LoRA (a peft adapter on the one UNet)
    device = torch.device(resolve_device(str(cfg.get("device", "auto"))))
    pipe = load_pipeline(cfg, device)
    set_scheduler(pipe, cfg.scheduler)
    if cfg.get("lora"):
        pipe.load_subject_lora(cfg.lora, scale=config_value(cfg, "lora_scale", float))
    else:
        log.info("no LoRA given: inpainting with the base model only")

    # 3. DIF + TAS
    generator = torch.Generator("cpu").manual_seed(config_value(cfg, "seed", int))
    result = pipe(
        image=image,
        mask_image=mask,
        prompt=prompt,
        negative_prompt=cfg.get("negative_prompt"),
        num_inference_steps=steps,
        guidance_scale=config_value(cfg, "guidance_scale", float),
        lambda_=lambda_,
        eliminate=eliminate,
        tas_stages=stages,
        num_images_per_prompt=num_images,
        generator=generator,
        resolution=cfg.get("resolution"),
        crop_scale=config_value(cfg, "dif.crop_scale", float),
        min_crop_frac=config_value(cfg, "dif.min_crop_frac", float),
        blend=bool(cfg.dif.blend),
        feather_radius=cfg.dif.get("feather_radius"),
        sampler=sampler,
    )

    # 4. Write outputs atomically
    written = write_outputs(paths, result, image, mask, save_grid=bool(cfg.save_grid))
    log.info(
        "wrote %s (λ=%.2f: %d LCG + %d GCH steps, crop %s, TAS %s)",
        ", ".join(str(p) for p in written), lambda_, result.lcg_steps, steps - result.lcg_steps,
        result.crop_box, eliminate or "off",
    )  # fmt: skip
    return written

