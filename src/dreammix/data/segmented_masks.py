"""Masks for subject photos that have none (``data.missing_mask=segment``), cached on disk.

A custom subject then needs only its photos: each photo without a mask file gets the mask of its
class noun found by text-prompted segmentation (:mod:`dreammix.segment`, the same CLIPSeg as ADM's
``t2i_segment`` route). Masks are segmented once and cached:

- beside the photos, in ``<subject.image_dir>/segmented_masks/`` (``<photo stem>.png``, L mode,
  0/255), when the photo folder is writable;
- otherwise (a read-only data folder) in ``<paths.cache_dir>/segmented_masks/<subject>-<hash of
  the photo folder's path>/``.

The log says which folder is used. ``segment.json`` there records the segmenter settings, the
query and a SHA-1 of each photo's bytes: a mask is reused only for the same photo segmented the
same way, so another threshold, model or an edited photo segments again. Only files this module
wrote are ever replaced. Photos whose mask comes out empty are warned about by
:func:`dreammix.data.subjects.load_source_examples` (and trained with the whole image as region).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dreammix.atomic import atomic_save_image, atomic_write_text
from dreammix.data.images import load_mask
from dreammix.errors import DreamMixError

__all__ = ["BESIDE_NAME", "RECORD_NAME", "SubjectMaskSegmenter", "mask_cache_dir", "source_mask_segmenter"]

log = logging.getLogger(__name__)

BESIDE_NAME = "segmented_masks"
RECORD_NAME = "segment.json"


def _can_write(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (made if missing): tried, not guessed from
    permission bits (root ignores them; a read-only mount does not)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def mask_cache_dir(image_dir: Path, subject_name: str, cache_root: Path) -> Path:
    """Where the segmented masks of the photos in ``image_dir`` live (see the module docstring)."""
    beside = Path(image_dir) / BESIDE_NAME
    if _can_write(beside):
        return beside
    digest = hashlib.sha1(str(Path(image_dir).resolve()).encode()).hexdigest()[:12]
    fallback = Path(cache_root) / BESIDE_NAME / f"{subject_name}-{digest}"
    if not _can_write(fallback):
        raise DreamMixError(f"cannot write segmented masks beside the photos nor to {fallback}", "paths.cache_dir")
    return fallback


def _sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


class SubjectMaskSegmenter:
    """``segment_masks`` for :func:`~dreammix.data.subjects.load_source_examples`: cached masks
    first, CLIPSeg (loaded only on a cache miss, released afterwards) for the rest."""

    def __init__(self, spec, query: str, image_dir: Path, subject_name: str, cache_root: Path, device=None):
        self.spec, self.query, self.device = spec, query, device
        self.image_dir, self.subject_name, self.cache_root = Path(image_dir), subject_name, Path(cache_root)

    def settings(self) -> dict:
        return {**self.spec.settings(), "query": self.query}

    def __call__(self, paths: Sequence[Path], images: Sequence[Image.Image]) -> list[np.ndarray]:
        folder = mask_cache_dir(self.image_dir, self.subject_name, self.cache_root)
        where = "beside the photos" if folder.parent == self.image_dir else "in the cache (photo folder read-only)"
        log.info("segmented masks of subject %s: %s, %s", self.subject_name, folder, where)
        record = self._read_record(folder)
        known = record["images"] if record.get("settings") == self.settings() else {}
        hashes = [_sha1(p) for p in paths]
        masks: list[np.ndarray | None] = []
        for path, image, digest in zip(paths, images, hashes):
            cached = folder / f"{path.stem}.png"
            entry = known.get(path.stem)
            fresh = entry is not None and entry.get("sha1") == digest and cached.is_file()
            masks.append(load_mask(cached, size=image.size) if fresh else None)
        todo = [i for i, m in enumerate(masks) if m is None]
        if todo:
            from dreammix.segment import load_segmenter

            log.info("segmenting '%s' in %d photo(s) without a mask: %s", self.query, len(todo),
                     ", ".join(paths[i].name for i in todo))  # fmt: skip
            segmenter = load_segmenter(self.spec, self.device)
            found = segmenter.masks([images[i] for i in todo], [self.query] * len(todo))
            del segmenter
            from dreammix.segment import mask_image

            for i, mask in zip(todo, found):
                atomic_save_image(mask_image(mask), folder / f"{paths[i].stem}.png")
                masks[i] = np.asarray(mask, dtype=np.float32)
        images_record = {**known} if known else {}
        for path, digest, mask in zip(paths, hashes, masks):
            images_record[path.stem] = {"image": path.name, "sha1": digest, "area": round(float(np.mean(mask)), 6)}
        atomic_write_text(folder / RECORD_NAME, json.dumps({"settings": self.settings(), "images": images_record},
                                                           indent=1, ensure_ascii=False) + "\n")  # fmt: skip
        return [np.asarray(m, dtype=np.float32) for m in masks]

    @staticmethod
    def _read_record(folder: Path) -> dict:
        path = folder / RECORD_NAME
        if not path.is_file():
            return {}
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            log.warning("%s is unreadable; segmenting again", path)
            return {}
        return record if isinstance(record, dict) and isinstance(record.get("images"), dict) else {}


def source_mask_segmenter(cfg, subject, device=None) -> SubjectMaskSegmenter | None:
    """The ``segment_masks`` function for ``data.missing_mask=segment`` (None for other policies);
    its settings are checked here, before any model is loaded."""
    if str(cfg.data.get("missing_mask", "full")) != "segment":
        return None
    from dreammix.segment import SegmenterSpec

    spec = SegmenterSpec.from_config(cfg.get("segmenter"))
    return SubjectMaskSegmenter(spec, str(subject.class_noun), subject.image_dir, subject.name,
                                Path(str(cfg.paths.cache_dir)), device)  # fmt: skip
