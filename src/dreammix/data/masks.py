"""Training-mask augmentation: make object masks look like the masks users draw.

Users mark a place with a brush stroke or a box, rarely a pixel-exact silhouette. Training only
on tight segmentation masks teaches the model to fill exactly the given shape, so we randomly
dilate the mask or replace it by its (grown) bounding box. All randomness comes from the given
``torch.Generator`` so cached variants are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaskAugmentation:
    """Probabilities and ranges of the two augmentations (fractions of the image side)."""

    dilate_prob: float = 0.5
    max_dilate: float = 0.05
    box_prob: float = 0.3
    max_box_margin: float = 0.1

    def __post_init__(self) -> None:
        for name in ("dilate_prob", "box_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("max_dilate", "max_box_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a ``(H, W)`` mask by a square of half-side ``radius`` pixels."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return F.max_pool2d(mask[None, None].float(), kernel_size=k, stride=1, padding=radius)[0, 0]


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(top, left, bottom, right)`` (exclusive ends) of the nonzero pixels, or None if empty."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def box_mask(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """The mask's bounding box grown by ``margin`` pixels on each side, clipped to the image."""
    box = bounding_box(mask)
    out = torch.zeros_like(mask, dtype=torch.float32)
    if box is None:
        return out
    h, w = mask.shape
    top, left, bottom, right = box
    out[max(0, top - margin) : min(h, bottom + margin), max(0, left - margin) : min(w, right + margin)] = 1.0
    return out


def augment_mask(mask: torch.Tensor, aug: MaskAugmentation, generator: torch.Generator) -> torch.Tensor:
    """One random user-like variant of a binary ``(H, W)`` mask; never smaller than the input."""
    side = max(mask.shape)
    out = mask.float()
    draw = torch.rand(4, generator=generator).tolist()
    if draw[0] < aug.box_prob:
        out = box_mask(out, int(round(draw[1] * aug.max_box_margin * side)))
    elif draw[2] < aug.dilate_prob:
        out = dilate(out, int(round(draw[3] * aug.max_dilate * side)))
    return out
