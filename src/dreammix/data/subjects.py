"""A subject's source data: its images and object masks, checked and loaded once.

Source images are the few photos of the user's object (DreamBooth: 4–6 per subject); each has an
object mask with the same file stem in the mask folder. Policy for the defects we meet in practice:
a mask of another size is resized with a warning, a missing mask gets ``missing_mask`` ("full":
the whole image is the region to fill, i.e. plain DreamBooth on that photo; "error": stop;
"segment": found by text-prompted segmentation of the class noun, see
:mod:`dreammix.data.segmented_masks`, and "full" with a warning naming the photo where it finds
nothing), an empty mask file is an error (nothing to learn from), an unreadable image is an
error naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dreammix.data.images import list_images, load_image, load_mask
from dreammix.errors import DreamMixError

MISSING_MASK_POLICIES = ("full", "error", "segment")

#: ``segment_masks(paths, images)`` → one ``(H, W)`` mask per image (1 = object; may be empty).
SegmentMasks = Callable[[Sequence[Path], Sequence[Image.Image]], Sequence[np.ndarray]]


@dataclass(frozen=True)
class Subject:
    """One subject (``conf/subject/*.yaml``): its name, class noun and where its files are."""

    name: str
    class_noun: str
    image_dir: Path
    mask_dir: Path | None = None
    kind: str = "object"

    @classmethod
    def from_config(cls, cfg) -> "Subject":
        mask_dir = cfg.get("mask_dir")
        return cls(
            name=str(cfg.name),
            class_noun=str(cfg.class_noun),
            image_dir=Path(str(cfg.image_dir)),
            mask_dir=Path(str(mask_dir)) if mask_dir else None,
            kind=str(cfg.get("kind", "object")),
        )


def ensure_subject_images(subject: Subject, dreambooth_dir: str | Path | None) -> None:
    """Download a DreamBooth subject's photos on first use (as ``make data`` does, checksummed);
    offline, one line that names ``make data`` and ``paths.dreambooth_dir``. Custom subjects,
    whose folder lies elsewhere, are left to the checks that follow."""
    from dreammix.data.download import DownloadError, ensure_dreambooth_subject

    if dreambooth_dir is None:
        return
    try:
        ensure_dreambooth_subject(subject.name, subject.image_dir, Path(str(dreambooth_dir)))
    except DownloadError as exc:
        raise DreamMixError(str(exc)) from exc  # the message names make data and paths.dreambooth_dir


@dataclass(frozen=True)
class MaskedImage:
    """An RGB image with its binary object mask (``(H, W)`` float, 1 = object)."""

    image: Image.Image
    mask: np.ndarray
    path: Path


def load_source_examples(
    subject: Subject, missing_mask: str = "full", segment_masks: SegmentMasks | None = None
) -> list[MaskedImage]:
    """Load every image of the subject with its mask, applying the policy above
    (``missing_mask="segment"`` asks ``segment_masks`` once for all photos without a mask)."""
    if missing_mask not in MISSING_MASK_POLICIES:
        raise DreamMixError(f"missing_mask must be one of {MISSING_MASK_POLICIES}, got {missing_mask!r}", "data.missing_mask")
    if missing_mask == "segment" and segment_masks is None:
        raise ValueError("missing_mask='segment' needs a segment_masks function")
    if not subject.image_dir.is_dir():
        raise DreamMixError(f"image folder of subject '{subject.name}' not found: {subject.image_dir}", "subject.image_dir")
    if subject.mask_dir is not None and not subject.mask_dir.is_dir():
        raise DreamMixError(
            f"mask folder of subject '{subject.name}' not found: {subject.mask_dir} (copy the object masks there, "
            "or subject.mask_dir=null to train on whole photos)", "subject.mask_dir",
        )
    paths = list_images(subject.image_dir)
    if not paths:
        raise DreamMixError(f"no images in {subject.image_dir}", "subject.image_dir")
    masks_by_stem = {}
    if subject.mask_dir is not None:
        masks_by_stem = {p.stem: p for p in list_images(subject.mask_dir)}
    loaded: list[tuple[Image.Image, np.ndarray | None, Path]] = []
    for path in paths:
        image = load_image(path)
        mask_path = masks_by_stem.get(path.stem)
        if mask_path is None:
            if missing_mask == "error":
                raise DreamMixError(f"no mask for {path.name} in {subject.mask_dir}", "data.missing_mask=error")
            mask = None
            if missing_mask == "full":
                warnings.warn(f"no mask for {path}; using the whole image as the object region", stacklevel=2)
                mask = np.ones((image.height, image.width), dtype=np.float32)
        else:
            mask = load_mask(mask_path, size=image.size)
            if not mask.any():
                raise DreamMixError("mask is empty (no pixel >= 128)", str(mask_path))
        loaded.append((image, mask, path))
    unmasked = [i for i, (_, mask, _) in enumerate(loaded) if mask is None]
    if unmasked:
        found = segment_masks([loaded[i][2] for i in unmasked], [loaded[i][0] for i in unmasked])
        for i, mask in zip(unmasked, found, strict=True):
            image, _, path = loaded[i]
            mask = np.asarray(mask, dtype=np.float32)
            if mask.shape != (image.height, image.width):
                raise ValueError(f"segment_masks gave a {mask.shape} mask for the {image.size} image {path}")
            if not mask.any():
                warnings.warn(f"segmentation found no {subject.class_noun} in {path} (empty mask); using the whole "
                              "image as the object region", stacklevel=2)  # fmt: skip
                mask = np.ones_like(mask)
            loaded[i] = (image, mask, path)
    return [MaskedImage(image=image, mask=mask, path=path) for image, mask, path in loaded]
