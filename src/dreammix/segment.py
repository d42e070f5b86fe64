"""Text-prompted segmentation: an object mask from an image and a noun ("can", "dog").

Used twice: ADM's text-to-image route (``adm.route=t2i_segment``: the regular images are made by
the SDXL base from the prompt alone, so their object masks must be found afterwards, as the
authors' public code does) and subject photos without a mask (``data.missing_mask=segment``).

The model is CLIPSeg (Lüddecke & Ecker 2022; ``transformers.CLIPSegForImageSegmentation``,
default ``CIDAS/clipseg-rd64-refined``), the simplest open-vocabulary segmenter transformers
ships: one forward pass per (image, text) pair gives a low-resolution logit map (352² for the
real model). The map is resized bilinearly to the image's own size, passed through a sigmoid,
and thresholded at ``segmenter.threshold``: a pixel is object (1) when its probability is above
it. Weights load from a hub id or a local folder with ``from_pretrained`` (HF cache, offline
capable); ``segmenter=tiny`` builds a tiny random CLIPSeg into the cache for tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreammix.errors import DreamMixError

__all__ = ["SegmenterSpec", "TextSegmenter", "load_segmenter", "mask_image"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterSpec:
    """``conf/segmenter/*.yaml``: which CLIPSeg and where to cut its probabilities. It runs on
    the device of the job that asks (``adm.device``, the trainer's device)."""

    pretrained: str = "CIDAS/clipseg-rd64-refined"
    revision: str | None = None
    threshold: float = 0.4
    batch_size: int = 8
    build_if_missing: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise DreamMixError(f"must be a probability in (0, 1), got {self.threshold}", "segmenter.threshold")
        if self.batch_size < 1:
            raise DreamMixError(f"must be >= 1, got {self.batch_size}", "segmenter.batch_size")

    @classmethod
    def from_config(cls, cfg) -> "SegmenterSpec":
        if cfg is None:
            raise DreamMixError("no segmentation model configured (add segmenter=clipseg)", "segmenter")
        try:
            return cls(
                pretrained=str(cfg.pretrained), revision=cfg.get("revision"), threshold=float(cfg.threshold),
                batch_size=int(cfg.get("batch_size", 8)), build_if_missing=bool(cfg.get("build_if_missing", False)),
            )
        except (TypeError, ValueError) as exc:
            raise DreamMixError(f"bad value: {exc}", "segmenter") from exc

    def settings(self) -> dict:
        """What decides a mask (written beside cached masks: other settings → segment again)."""
        return {"pretrained": self.pretrained, "revision": self.revision, "threshold": self.threshold}


class TextSegmenter:
    """CLIPSeg behind one call: ``masks(images, queries)`` → one boolean ``(H, W)`` array per image,
    at that image's size (``probabilities`` gives the maps before the threshold)."""

    def __init__(self, model, processor, threshold: float, device: torch.device | str = "cpu", batch_size: int = 8):
        self.model = model.eval().to(device)
        self.processor = processor
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    @torch.inference_mode()
    def probabilities(self, images: Sequence[Image.Image], queries: Sequence[str]) -> list[np.ndarray]:
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images but {len(queries)} queries")
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            texts = list(queries[start : start + self.batch_size])
            inputs = self.processor(text=texts, images=batch, padding=True, return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits.float()
            if logits.ndim == 2:  # older transformers squeezed a batch of one to (h, w)
                logits = logits[None]
            for image, logit in zip(batch, logits):
                # The logit map is resized, then squashed: the mask is where the interpolated
                # logit exceeds log(t / (1 - t)).
                full = F.interpolate(logit[None, None], size=(image.height, image.width), mode="bilinear",
                                     align_corners=False)[0, 0]  # fmt: skip
                out.append(torch.sigmoid(full).cpu().numpy())
        return out

    def masks(self, images: Sequence[Image.Image], queries: Sequence[str]) -> list[np.ndarray]:
        return [p > self.threshold for p in self.probabilities(images, queries)]


def mask_image(mask: np.ndarray) -> Image.Image:
    """A boolean mask as the project's mask file: mode ``L``, 255 = object, 0 = keep."""
    return Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L")


def load_segmenter(spec: SegmenterSpec, device: torch.device | str | None = None) -> TextSegmenter:
    """CLIPSeg from ``spec.pretrained`` (hub id or local folder; the tiny one is built when
    ``build_if_missing``). A missing or unreadable model is one line naming ``segmenter.pretrained``."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from dreammix.models.loading import _looks_like_path

    source = spec.pretrained
    if spec.build_if_missing:
        from dreammix.models.tiny_adm import ensure_tiny_clipseg

        ensure_tiny_clipseg(source)
    if _looks_like_path(source):
        source = str(Path(source).expanduser())
        if not (Path(source) / "config.json").is_file():
            raise DreamMixError(f"no CLIPSeg model at {source} (config.json missing)", "segmenter.pretrained")
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(source, revision=spec.revision)
        processor = CLIPSegProcessor.from_pretrained(source, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise DreamMixError(f"cannot load segmentation model {spec.pretrained!r}: {str(exc).splitlines()[0]}",
                            "segmenter.pretrained") from exc  # fmt: skip
    device = torch.device("cpu" if device is None else device)
    log.info("segmentation model %s on %s (threshold %.2f)", spec.pretrained, device, spec.threshold)
    return TextSegmenter(model, processor, spec.threshold, device, spec.batch_size)
