"""Checks of a training run's inputs that need no model: run before the base model loads.

Loading SDXL takes minutes; an unreadable subject photo, an empty mask or a checkpoint of another
LoRA shape used to surface only after it, under dozens of lines of other output. Everything here
reads only small files (the subject's few photos and masks, the LoRA-only checkpoint).
"""

from __future__ import annotations

import warnings

import numpy as np
from pathlib import Path

from dreammix.data.frozen import object_square
from dreammix.data.subjects import Subject, load_source_examples
from dreammix.errors import DreamMixError
from dreammix.models.lora import LoraSpec
from dreammix.validation import load_checkpoint_safely


def check_checkpoint(ckpt_path: Path, lora: LoraSpec) -> None:
    """The checkpoint must be one of ours (read without unpickling code), finite, and of this LoRA shape."""
    state = load_checkpoint_safely(ckpt_path, "ckpt_path")
    saved = state.get("dreammix_lora")
    configured = {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules), "use_dora": lora.use_dora}
    if isinstance(saved, dict) and any(saved.get(k, False if k == "use_dora" else None) != v for k, v in configured.items()):
        raise DreamMixError(f"checkpoint LoRA {saved} does not match the configured LoRA {configured}", "ckpt_path / lora.*")
    if not any("lora_" in key for key in state["state_dict"]):
        raise DreamMixError("the checkpoint holds no LoRA weights", "ckpt_path")


def check_before_loading(subject: Subject, data, lora: LoraSpec, ckpt_path: Path | None) -> None:  # noqa: ANN001 - DataSpec
    """Subject photos and masks readable, non-empty and croppable; checkpoint usable (module docstring)."""
    with warnings.catch_warnings():  # the datamodule repeats them when it loads the data for real
        warnings.simplefilter("ignore")
        # photos that ADM-style segmentation will mask later are only checked for readability here
        # (segmenting needs its model; the datamodule checks their crop once it has the masks)
        whole = lambda paths, images: [np.ones((im.height, im.width), np.float32) for im in images]  # noqa: E731
        examples = load_source_examples(subject, data.missing_mask, segment_masks=whole)
    for example in examples:  # the square training crop must keep the object (else: error naming the photo)
        object_square(example.mask, example.path)
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, lora)
