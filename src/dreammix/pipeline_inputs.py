"""What :class:`~dreammix.pipeline.DreamMixInpaintPipeline` and the multi-region driver
(:mod:`dreammix.multi_region`) both take in: the two DIF stages, the LCG step count, and user images
and masks in any of the forms diffusers accepts (PIL, uint8 / uint16 / float arrays, tensors) turned
into RGB uint8 and binary float masks. Kept apart so that neither module imports the other.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import PIL.Image
import torch

from dreammix.data.images import mask_to_binary, to_rgb
from dreammix.errors import DreamMixError

#: DIF's stages: Local Content Generation on the crop, then Global Context Harmonization.
STAGES = ("local", "global")


def split_steps(lambda_: float, num_inference_steps: int) -> int:
    """Number of LCG steps: ``round(λ·T)``, halves rounded up (not Python's banker's rounding)."""
    return int(math.floor(lambda_ * num_inference_steps + 0.5))


def _as_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, PIL.Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise DreamMixError(f"image array must be HxW or HxWx3, got shape {image.shape}", "image")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        arr = arr[..., :3]
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        if np.issubdtype(arr.dtype, np.floating):
            return np.clip(np.floor(arr * 255.0 + 0.5), 0, 255).astype(np.uint8)
        if arr.dtype == np.uint16:
            return np.clip(np.floor(arr / 257.0 + 0.5), 0, 255).astype(np.uint8)
        raise DreamMixError(f"image array dtype {arr.dtype} is not supported (uint8, uint16 or float)", "image")
    raise DreamMixError(f"image must be a PIL image or a numpy array, got {type(image).__name__}", "image")


def _as_binary_mask(mask: Any) -> np.ndarray:
    if isinstance(mask, PIL.Image.Image):
        return mask_to_binary(mask)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        arr = np.squeeze(mask)
        # half range of the array's own scale, decided before an RGB(A) array is averaged to gray
        # (its mean is float whatever the scale): bool/float 0.5, 8-bit 128, 16-bit 32768
        if np.issubdtype(arr.dtype, np.integer) and (arr.dtype == np.uint16 or arr.max() > 255):
            threshold = 32768.0
        elif arr.dtype == np.uint8 or (np.issubdtype(arr.dtype, np.integer) and arr.max() > 1):
            threshold = 128.0
        else:
            threshold = 0.5
        if arr.ndim == 3:  # RGB(A) array: use its gray level like an RGB mask file
            arr = arr[..., :3].astype(np.float64).mean(axis=-1)
        if arr.ndim != 2:
            raise DreamMixError(f"mask array must be HxW, got shape {mask.shape}", "mask_image")
        return (arr >= threshold).astype(np.float32)
    raise DreamMixError(f"mask must be a PIL image or a numpy array, got {type(mask).__name__}", "mask_image")


def _resize(image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
    """LANCZOS resize, skipped when the size already matches (keeps pixels exact)."""
    return image if image.size == tuple(size) else image.resize(tuple(size), PIL.Image.LANCZOS)
