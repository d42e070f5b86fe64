"""Reading images and masks from disk with one-line errors that name the file.

Every image becomes 8-bit RGB whatever its mode on disk (grayscale, RGBA, CMYK, 16-bit);
every mask becomes a binary ``{0, 1}`` float array (threshold at half range), so JPEG-compressed,
RGB or anti-aliased masks behave like the 0/255 PNGs the DreamBooth masks are.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dreammix.errors import DreamMixError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DreamMixError("file not found", str(path))
    try:
        # PIL warns above MAX_IMAGE_PIXELS (89 M) and refuses twice that: a decompression bomb (a
        # few KB on disk, gigabytes once decoded) is refused in one line, not by the OOM killer.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DreamMixError(f"image too large ({exc.__class__.__name__}: over {Image.MAX_IMAGE_PIXELS} pixels); "
                            "downscale it first", str(path)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DreamMixError(f"cannot read image: {exc.__class__.__name__}", str(path)) from exc
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit images are rescaled, not clipped: x/257 rounded).

    An integer image none of whose values exceeds 255 holds 8-bit values (PIL's ``convert("I;16")``
    or ``convert("I")`` of an 8-bit image keeps 0..255, and writes them so into 16-bit files);
    it is read as 8-bit, the way :func:`mask_to_binary` reads it, rather than as near black.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white so transparent subject cut-outs keep a clean background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB, or raise :class:`DreamMixError` naming the file."""
    return to_rgb(_open(Path(path)))


def mask_to_binary(mask: Image.Image) -> np.ndarray:
    """Binary float32 ``(H, W)`` array: 1 where the (grayscale) mask is at least half range."""
    if mask.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(mask, dtype=np.float64)
        threshold = 32768.0 if array.max() > 255 else 128.0
        return (array >= threshold).astype(np.float32)
    if mask.mode in ("RGBA", "LA"):
        mask = mask.convert("RGBA")
        # A transparent-background mask: use alpha when it carries the shape.
        alpha = np.asarray(mask.getchannel("A"))
        if alpha.min() < 128 <= alpha.max():
            return (alpha >= 128).astype(np.float32)
    return (np.asarray(mask.convert("L")) >= 128).astype(np.float32)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Open a mask as a binary ``(H, W)`` array (1 = region to fill).

    ``size`` is the ``(width, height)`` of the image the mask belongs to: a mask of another size
    is resized to it (nearest neighbour) with a warning, since such masks exist in the wild (one
    DreamBooth mask is 1440 px for a 1280 px image) and the shape is still right.
    """
    path = Path(path)
    mask = _open(path)
    if size is not None and mask.size != tuple(size):
        warnings.warn(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}; resizing the mask",
            stacklevel=2,
        )
        # in its own mode: convert("L") first would clip 16-bit values and drop an alpha shape
        mask = mask.resize(tuple(size), Image.NEAREST)
    return mask_to_binary(mask)


def list_images(directory: str | Path) -> list[Path]:
    """Image files of a folder, sorted by name; a missing folder is a :class:`DreamMixError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DreamMixError("image folder not found", str(directory))
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
