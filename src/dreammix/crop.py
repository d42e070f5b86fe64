"""Geometry of the disentangled inpainting framework: the LCG crop, sizes, feathering, pasting.

Pure numpy/torch on whole arrays (no pixel loops), independent of any model, so every rule here
is unit-tested with hand-computed numbers.

- :func:`lcg_crop_box` — the enlarged square region m' of Eq. 3 (DESIGN.md §3): a square around the
  mask's bounding box, half-side ``scale × max(half-height, half-width)``, at least
  ``min_frac × min(H, W)`` wide, shifted (not shrunk) to lie inside the image; only when the square
  is larger than the image is it clipped to the image side. Small objects thus get the model's full
  resolution (the paper's motivation: the UNet's lowest feature map is 32× smaller than the input).
- :func:`processing_size` — the size an image is denoised at: the model's area (resolution²) at
  the image's own aspect ratio, in multiples the UNet can down-sample, so no input is squashed.
- :func:`feather` / :func:`composite` — the final paste: exactly the input where the feathered
  mask is 0, exactly the generated pixels where it is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Box:
    """A pixel rectangle ``[left, right) × [top, bottom)`` (PIL's crop convention)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.right, self.bottom)

    def slices(self) -> tuple[slice, slice]:
        """``array[box.slices()]`` selects the box from an (H, W, ...) array."""
        return slice(self.top, self.bottom), slice(self.left, self.right)


def mask_bbox(mask: np.ndarray) -> Box | None:
    """Tight bounding box of the pixels ``> 0.5``; ``None`` for an empty mask."""
    rows = np.flatnonzero((mask > 0.5).any(axis=1))
    cols = np.flatnonzero((mask > 0.5).any(axis=0))
    if rows.size == 0:
        return None
    return Box(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def lcg_crop_box(mask: np.ndarray, scale: float = 1.15, min_frac: float = 0.5) -> Box:
    """The LCG crop m' (Eq. 3) for a binary (H, W) mask, as described in the module docstring.

    The side is ``ceil(2 · max(scale · max(h, w) / 2, min_frac · min(H, W) / 2))`` where h, w are the
    bounding box's height and width; the square is centred on the box centre, then moved inside the
    image. ``min_frac`` uses the *shorter* image side so that the square always fits on that axis.
    """
    height, width = mask.shape[:2]
    bbox = mask_bbox(mask)
    if bbox is None:
        raise ValueError("empty mask has no crop box")
    half = scale * max(bbox.height, bbox.width) / 2.0
    half = max(half, min_frac * min(height, width) / 2.0)
    side = max(1, int(math.ceil(2.0 * half - 1e-9)))
    box_w, box_h = min(side, width), min(side, height)
    cx, cy = (bbox.left + bbox.right) / 2.0, (bbox.top + bbox.bottom) / 2.0
    left = int(min(max(math.floor(cx - box_w / 2.0 + 0.5), 0), width - box_w))
    top = int(min(max(math.floor(cy - box_h / 2.0 + 0.5), 0), height - box_h))
    return Box(left, top, left + box_w, top + box_h)


def processing_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """``(w, h)`` with area ≈ resolution² and the input's aspect ratio, each a multiple of ``multiple``.

    SDXL is trained on ~1 MP buckets of many aspect ratios, so a 640×427 photo is denoised at
    1248×832 rather than squashed into 1024×1024. A square input gives exactly resolution².
    """
    s = resolution / math.sqrt(width * height)
    w = max(multiple, int(math.floor(width * s / multiple + 0.5)) * multiple)
    h = max(multiple, int(math.floor(height * s / multiple + 0.5)) * multiple)
    return w, h


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a binary (H, W) mask to ``size = (w, h)`` without ever losing coverage.

    An output pixel is 1 when *any* input pixel under it is 1 (area average > 0), the pixel-space
    analogue of the latent max-pool convention (DESIGN.md §3): a thin object never vanishes when
    an image is shrunk to the model's resolution.
    """
    w, h = size
    if mask.shape[:2] == (h, w):
        return (mask > 0.5).astype(np.float32)
    t = torch.from_numpy((mask > 0.5).astype(np.float32))[None, None]
    if h <= mask.shape[0] and w <= mask.shape[1]:
        out = F.adaptive_max_pool2d(t, (h, w))
    else:
        out = (F.interpolate(t, size=(h, w), mode="area") > 0).float()
    return out[0, 0].numpy().astype(np.float32)


def _square_pool(t: torch.Tensor, radius: int, pool, **kwargs) -> torch.Tensor:
    """A (2r+1)² max/mean filter as two 1-D passes (separable: O(r) per pixel, not O(r²));
    with ``count_include_pad=False`` the border means are the same as the 2-D filter's."""
    k = 2 * radius + 1
    t = pool(t, kernel_size=(k, 1), stride=1, padding=(radius, 0), **kwargs)
    return pool(t, kernel_size=(1, k), stride=1, padding=(0, radius), **kwargs)


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """Soft alpha for pasting: dilate by ``radius`` (square), then box-blur with the same radius.

    Guarantees, exact in float32: alpha = 1 on every mask pixel; alpha = 0 at every pixel whose
    Chebyshev distance to the mask exceeds ``2 · radius`` (so those pixels stay bit-identical to
    the input); in between it ramps linearly-ish, hiding the VAE's seam around the mask.
    """
    m = (mask > 0.5).astype(np.float32)
    if radius <= 0:
        return m
    dilated = _square_pool(torch.from_numpy(m)[None, None], radius, F.max_pool2d)
    blurred = _square_pool(dilated, radius, F.avg_pool2d, count_include_pad=False)
    alpha = blurred[0, 0].numpy()
    alpha[m > 0] = 1.0  # exact even if the mean of 1s were not exactly 1
    alpha[alpha < 1e-6] = 0.0
    return alpha.astype(np.float32)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary square dilation: 1 within Chebyshev distance ``radius`` of the mask."""
    m = (mask > 0.5).astype(np.float32)
    if radius <= 0:
        return m
    return _square_pool(torch.from_numpy(m)[None, None], radius, F.max_pool2d)[0, 0].numpy()


def composite(base: np.ndarray, overlay: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base·(1−α) + overlay·α`` on uint8 (H, W, 3) images; exactly ``base`` where α = 0 and
    exactly ``overlay`` where α = 1."""
    if base.shape != overlay.shape:
        raise ValueError(f"composite: base {base.shape} and overlay {overlay.shape} differ")
    a = alpha.astype(np.float32)[..., None]
    mixed = base.astype(np.float32) * (1.0 - a) + overlay.astype(np.float32) * a
    out = np.clip(np.floor(mixed + 0.5), 0, 255).astype(np.uint8)
    out = np.where(a == 0.0, base, out)
    return np.where(a == 1.0, overlay, out)


def paste(base: np.ndarray, patch: np.ndarray, box: Box, alpha: np.ndarray) -> np.ndarray:
    """Paste ``patch`` (box-sized uint8) into ``base`` at ``box`` through ``alpha`` (full-size).

    Alpha outside the box is ignored (the patch has no pixels there), so the result equals
    ``base`` outside the box whatever the feathering.
    """
    if patch.shape[:2] != (box.height, box.width):
        raise ValueError(f"paste: patch {patch.shape[:2]} does not fit box {box}")
    out = base.copy()
    sl = box.slices()
    out[sl] = composite(base[sl], patch, alpha[sl])
    return out
