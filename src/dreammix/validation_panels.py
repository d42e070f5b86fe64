"""Validation panels during training that show the method, not just the training photos
(the config checks are :mod:`dreammix.validation`).

Every ``validation.every_n_steps`` optimizer steps the current LoRA inpaints the subject into
*held-out* backgrounds (a folder; by default the first COCO val2017 photos when ``make data``
fetched them) with each of ``validation.prompts`` — an identity prompt ("a photo of sks can") and
attribute edits ("a red sks can") — through :class:`~dreammix.pipeline.DreamMixInpaintPipeline`,
i.e. DIF (λ = ``validation.lambda_``, Eq. 3–6) and TAS (Eq. 9, the words chosen from the subject's
attribute dictionary by the offline same-category rule). So a panel shows whether the subject is
learned (identity) and still editable (attribute), where the old grids only re-inpainted the
training photos with the training prompt.

Each prompt's conditioning is encoded once before training (``encode_conditions``), so the text
encoders stay off the GPU for the whole run and a render costs UNet + VAE calls only. Panels are
labelled (prompt, step, λ, TAS words) in the saved grid and in W&B captions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dreammix.errors import DreamMixError
from dreammix.tracking import wandb_logger_of

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class ValidationSpec:
    """``cfg.validation``, checked before any weights load."""

    every_n_steps: int
    prompts: tuple[str, ...]
    backgrounds: Path | None
    num_backgrounds: int
    num_inference_steps: int
    guidance_scale: float
    lambda_: float
    tas: bool
    seed: int = 0

    @classmethod
    def from_config(cls, val, default_backgrounds: str | Path | None, seed: int) -> "ValidationSpec":
        prompts = tuple(str(p) for p in (val.get("prompts") or ()))
        folder = val.get("backgrounds")
        if folder is None and default_backgrounds is not None and Path(str(default_backgrounds)).is_dir():
            folder = default_backgrounds
        spec = cls(
            every_n_steps=int(val.every_n_steps), prompts=prompts,
            backgrounds=Path(str(folder)) if folder else None, num_backgrounds=int(val.num_samples),
            num_inference_steps=int(val.num_inference_steps), guidance_scale=float(val.guidance_scale),
            lambda_=float(val.get("lambda_", 0.7)), tas=bool(val.get("tas", True)), seed=seed,
        )
        if spec.every_n_steps > 0 and not spec.prompts:
            raise DreamMixError("validation.prompts is empty", "validation.prompts")
        if not 0.0 <= spec.lambda_ <= 1.0:
            raise DreamMixError(f"lambda_ must be in [0, 1], got {spec.lambda_}", "validation.lambda_")
        if spec.backgrounds is not None and not spec.backgrounds.is_dir():
            raise DreamMixError(f"validation background folder not found: {spec.backgrounds}", "validation.backgrounds")
        return spec


@dataclass(frozen=True)
class Background:
    """A held-out scene at model resolution and the region to fill (white = fill)."""

    name: str
    image: Image.Image
    mask: Image.Image


def centre_box_mask(size: int, fraction: float = 0.5) -> Image.Image:
    """A centred square covering ``fraction`` of the side: where the object goes in a scene
    that comes without a mask."""
    mask = Image.new("L", (size, size), 0)
    lo = int(round(size * (1 - fraction) / 2))
    mask.paste(255, (lo, lo, size - lo, size - lo))
    return mask


def _square(image: Image.Image, size: int, resample) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample)


def load_backgrounds(folder: Path, count: int, resolution: int) -> list[Background]:
    """The first ``count`` images of ``folder`` (sorted), centre-cropped to ``resolution``; the mask
    is ``folder/masks/<stem>.png`` when present, else a centred box."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not paths:
        raise DreamMixError(f"no images in the validation background folder {folder}", "validation.backgrounds")
    out = []
    for path in paths:
        image = _square(Image.open(path).convert("RGB"), resolution, Image.Resampling.BICUBIC)
        mask_path = folder / "masks" / f"{path.stem}.png"
        if mask_path.is_file():
            mask = _square(Image.open(mask_path).convert("L"), resolution, Image.Resampling.NEAREST)
            mask = mask.point(lambda v: 255 if v >= 128 else 0)
        else:
            mask = centre_box_mask(resolution)
        out.append(Background(path.stem, image, mask))
    return out


def training_backgrounds(examples: Sequence, count: int, resolution: int) -> list[Background]:
    """Fallback without a background folder: the subject's own photos and masks (labelled so)."""
    from dreammix.data.frozen import square_crop_resize

    out = []
    for example in list(examples)[:count]:
        pixels, mask = square_crop_resize(example, resolution)
        image = Image.fromarray(((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
        out.append(Background(f"train:{Path(example.path).stem}", image, Image.fromarray((mask.numpy() * 255).astype(np.uint8), "L")))
    return out


def tas_words(prompts: Sequence[str], attributes: Mapping[str, Sequence[str]] | None, enabled: bool) -> dict[str, list[str]]:
    """Per prompt, the attribute words TAS removes (the offline same-category rule of
    :func:`dreammix.tas.select_eliminate_words`); none for identity prompts or without a dictionary."""
    from dreammix.tas import clean_eliminate_words, select_eliminate_words

    if not enabled or not attributes:
        return {p: [] for p in prompts}
    return {p: clean_eliminate_words(select_eliminate_words(p, attributes)) for p in prompts}


def caption(prompt: str, step: int, lambda_: float, words: Sequence[str]) -> str:
    return f"{prompt} | step {step} | λ={lambda_:g} | TAS: {', '.join(words) if words else '-'}"


def labelled(image: Image.Image, lines: Sequence[str], line_height: int = 12) -> Image.Image:
    """``image`` with ``lines`` of text on a white band below it."""
    band = line_height * len(lines) + 4
    out = Image.new("RGB", (image.width, image.height + band), "white")
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((2, image.height + 2 + i * line_height), line, fill="black", font=font)
    return out


def masked_preview(background: Background) -> Image.Image:
    keep = np.asarray(background.mask)[..., None] < 128
    return Image.fromarray((np.asarray(background.image) * keep + 127 * ~keep).astype(np.uint8))


class ValidationCallback(L.Callback):
    """Renders and saves/logs the validation panels; see the module docstring."""

    def __init__(self, pipe, spec: ValidationSpec, backgrounds: list[Background], eliminate: dict[str, list[str]],
                 out_dir: str | Path):
        self.pipe, self.spec, self.backgrounds, self.eliminate = pipe, spec, backgrounds, eliminate
        self.out_dir = Path(out_dir)
        # Encoded now, while the text encoders are still loaded; no text encoder runs afterwards.
        self.conditions = {
            p: pipe.encode_conditions(p, eliminate=eliminate[p], guidance_scale=spec.guidance_scale)
            for p in spec.prompts
        }
        self._last_step = -1

    @torch.no_grad()
    def render(self, step: int) -> tuple[Image.Image, list[Image.Image], list[str]]:
        """The labelled grid (rows = backgrounds, columns = masked input + one per prompt), the
        unlabelled panels and their captions."""
        spec = self.spec
        panels, captions, rows = [], [], []
        for background in self.backgrounds:
            row = [labelled(masked_preview(background), [background.name, "input + mask", ""])]
            for prompt in spec.prompts:
                words = self.eliminate[prompt]
                out = self.pipe(
                    image=background.image, mask_image=background.mask, prompt=prompt, eliminate=words,
                    conditions=self.conditions[prompt], lambda_=spec.lambda_,
                    num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(spec.seed),
                ).images[0]
                panels.append(out)
                captions.append(f"{background.name} | {caption(prompt, step, spec.lambda_, words)}")
                row.append(labelled(out, [prompt, f"step {step}  λ={spec.lambda_:g}",
                                          f"TAS: {', '.join(words) if words else '-'}"]))
            rows.append(row)
        width, height = rows[0][0].width, rows[0][0].height
        grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
        for r, row in enumerate(rows):
            for c, panel in enumerate(row):
                grid.paste(panel, (c * width, r * height))
        return grid, panels, captions

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.spec.every_n_steps <= 0 or step == 0 or step % self.spec.every_n_steps or step == self._last_step:
            return
        if not trainer.is_global_zero:  # DDP: one grid per step, from rank 0
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        vae_dtype = self.pipe.vae.dtype
        grid, panels, captions = self.render(step)
        self.pipe.vae.to(dtype=vae_dtype)  # the pipeline may upcast the VAE for decoding
        pl_module.train(was_training)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grid.save(self.out_dir / f"step_{step:06d}.png")
        wandb_logger = wandb_logger_of(trainer.loggers)
        if wandb_logger is not None:
            wandb_logger.log_image(key="val/samples", images=panels, caption=captions, step=step)
            wandb_logger.log_image(key="val/grid", images=[grid], caption=[f"step {step}"], step=step)


def validation_spec(cfg) -> ValidationSpec:
    """From a training config: default backgrounds ``<paths.coco_dir>/val2017`` when present."""
    from omegaconf import OmegaConf

    coco = OmegaConf.select(cfg, "paths.coco_dir")
    return ValidationSpec.from_config(cfg.validation, Path(str(coco)) / "val2017" if coco else None, int(cfg.seed))


def validation_callback(cfg, spec: ValidationSpec, pipe, source_examples: Sequence, resolution: int, run_dir: Path):
    """The callback for a training run: DreamMix's pipeline on the training pipeline's modules
    (the same UNet, so the LoRA being trained), TAS words from the subject's dictionary."""
    from omegaconf import OmegaConf

    from dreammix.attributes import offline_attributes
    from dreammix.pipeline import DreamMixInpaintPipeline

    if spec.backgrounds is not None:
        backgrounds = load_backgrounds(spec.backgrounds, spec.num_backgrounds, resolution)
    else:
        log.info("validation: no background folder (validation.backgrounds, or COCO val2017 via make data); "
                 "using the training photos")
        backgrounds = training_backgrounds(source_examples, spec.num_backgrounds, resolution)
    attributes = offline_attributes(cfg.subject, OmegaConf.select(cfg, "data.regular_dir"))
    words = tas_words(spec.prompts, attributes, spec.tas)
    return ValidationCallback(DreamMixInpaintPipeline.from_base(pipe), spec, backgrounds, words, Path(run_dir) / "samples")
