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


# ----------------------------------------------------------------------------------------------
# Bézier blobs (the public code's training masks)
# ----------------------------------------------------------------------------------------------

#: ``augment``: the mask as given (variant 0) plus dilation / box variants (paper text: "we employ
#: user masks"); ``blob``: every mask replaced by :func:`bezier_blob_mask` (the public code's
#: ``extend_mask_with_bezier`` on every training image: silhouettes are never seen).
MASK_MODES = ("augment", "blob")


def quadratic_bezier(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` points ``(1−t)²·p0 + 2(1−t)t·p1 + t²·p2`` for ``t`` evenly in [0, 1] (``(n, 2)``).

    Every point is a convex combination of the three control points, so the curve lies inside
    their triangle: the property :func:`bezier_blob_mask` builds its guarantees on.
    """
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def bezier_blob_mask(
    mask: torch.Tensor, grow: tuple[float, float], generator: torch.Generator, points_per_side: int = 32
) -> torch.Tensor:
    """A random closed Bézier blob around the bounding box of a ``(H, W)`` mask.

    The box (``w × h``) is grown by ``g·w`` left and right and ``g·h`` above and below,
    ``g ~ U[grow]`` (public code: 0.1–1.0), clipped to the image. The blob's outline is four
    quadratic Bézier segments through one random anchor in each corner zone of the ring between
    box and grown box (top-left → top-right → bottom-right → bottom-left), each segment pulled out
    by a control point on the grown box's side (random position along its middle half).

    Why it covers the box: each segment's control triangle lies in one outer half-plane of the
    box (above its top, right of its right side, ...), so the outline never enters the box and
    winds once around it; the filled blob therefore contains the whole box. All control points
    lie in the grown box, hence so does the blob. Empty mask → empty blob.
    """
    box = bounding_box(mask)
    h, w = mask.shape
    if box is None:
        return torch.zeros((h, w), dtype=torch.float32)
    low, high = grow
    g = _uniform(generator, low, high)
    top, left, bottom, right = box
    # Pixel-centre coordinates: the box's pixels span [left, right-1] × [top, bottom-1].
    x0, x1, y0, y1 = float(left), float(right - 1), float(top), float(bottom - 1)
    bw, bh = right - left, bottom - top
    gx0, gx1 = max(0.0, x0 - g * bw), min(w - 1.0, x1 + g * bw)
    gy0, gy1 = max(0.0, y0 - g * bh), min(h - 1.0, y1 + g * bh)

    def point(xa: float, xb: float, ya: float, yb: float) -> torch.Tensor:
        return torch.tensor([_uniform(generator, xa, xb), _uniform(generator, ya, yb)], dtype=torch.float64)

    corners = [point(gx0, x0, gy0, y0), point(x1, gx1, gy0, y0), point(x1, gx1, y1, gy1), point(gx0, x0, y1, gy1)]
    qx0, qx1 = gx0 + (gx1 - gx0) / 4, gx1 - (gx1 - gx0) / 4
    qy0, qy1 = gy0 + (gy1 - gy0) / 4, gy1 - (gy1 - gy0) / 4
    controls = [point(qx0, qx1, gy0, gy0), point(gx1, gx1, qy0, qy1), point(qx0, qx1, gy1, gy1), point(gx0, gx0, qy0, qy1)]
    outline = torch.cat(
        [quadratic_bezier(corners[i], controls[i], corners[(i + 1) % 4], points_per_side) for i in range(4)]
    )
    return fill_polygon(outline, (h, w))


def fill_polygon(points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Rasterise a closed polygon ``(n, 2)`` of pixel-centre ``(x, y)`` points into an ``(H, W)``
    {0, 1} mask, outline pixels included. Points are rounded to the nearest pixel first: a point on
    the far side of an integer line stays on that side (or on it), and float noise such as 20.9999
    cannot spill a row beyond a straight edge."""
    from PIL import Image, ImageDraw

    h, w = size
    canvas = Image.new("L", (w, h), 0)
    xy = [(int(x), int(y)) for x, y in points.round().tolist()]
    ImageDraw.Draw(canvas).polygon(xy, fill=1, outline=1)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(h, w).float()
