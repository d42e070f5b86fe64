"""All per-image benchmark scores of a batch of generated images of one subject.

For each generated image the scores are computed twice: on the **crop** of the inpainted region
(a square around the mask's box, :func:`~dreammix.metrics.common.square_box`) and on the **full**
image. The unsuffixed keys (``clip_i``, ``clip_t``, ``dino``) are the crop scores, which the
tables report: on a full COCO image the inserted object covers 2–40 % of the pixels, and a
full-image score mostly measures the unchanged background. The ``*_full`` keys are kept for
comparison with papers that score whole images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dreammix.errors import DreamMixError
from dreammix.metrics.clip import ClipScorer
from dreammix.metrics.common import crop_region
from dreammix.metrics.dino import DinoScorer

SCORE_KEYS = ("clip_i", "clip_t", "dino", "clip_i_full", "clip_t_full", "dino_full")


@dataclass
class MetricSuite:
    clip: ClipScorer
    dino: DinoScorer
    identifier: str = "sks"
    crop_scale: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> MetricSuite:
        """Build from the ``metrics`` config group (models by hub id or local folder)."""
        cache = None if cfg.get("cache_dir") is None else str(cfg.cache_dir)
        if cfg.get("build_tiny", False):  # metrics=tiny: offline runs without hub models
            from dreammix.metrics.tiny import ensure_tiny_clip, ensure_tiny_dino

            ensure_tiny_clip(str(cfg.clip.model))
            ensure_tiny_dino(str(cfg.dino.model))
        clip = ClipScorer.from_pretrained(str(cfg.clip.model), device=cfg.device, batch_size=int(cfg.batch_size), cache_dir=cache)
        dino = DinoScorer.from_pretrained(
            str(cfg.dino.model),
            resize=int(cfg.dino.resize),
            crop=int(cfg.dino.crop),
            device=cfg.device,
            batch_size=int(cfg.batch_size),
            cache_dir=cache,
        )
        return cls(clip=clip, dino=dino, identifier=str(cfg.identifier), crop_scale=float(cfg.get("crop_scale", 1.0)))

    def score(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Sequence[int]],
        prompts: Sequence[str],
        references: Sequence[str | Path],
    ) -> list[dict[str, float]]:
        """One dict of :data:`SCORE_KEYS` per image; ``references`` are the subject's images."""
        if not (len(images) == len(boxes) == len(prompts)):
            raise DreamMixError(f"{len(images)} images, {len(boxes)} boxes, {len(prompts)} prompts", "metrics")
        if not images:
            return []
        crops = [crop_region(im, box, self.crop_scale) for im, box in zip(images, boxes)]
        clip_refs = self.clip.reference_features(references)
        dino_refs = self.dino.reference_features(references)
        results: dict[str, list[float]] = {}
        for suffix, batch in (("", crops), ("_full", list(images))):
            clip_features = self.clip.encode_images(batch)
            results["clip_i" + suffix] = self.clip.clip_i(clip_features, clip_refs).tolist()
            results["clip_t" + suffix] = self.clip.clip_t(clip_features, prompts, self.identifier).tolist()
            results["dino" + suffix] = self.dino.dino(self.dino.encode_images(batch), dino_refs).tolist()
        return [{key: float(results[key][i]) for key in SCORE_KEYS} for i in range(len(images))]
