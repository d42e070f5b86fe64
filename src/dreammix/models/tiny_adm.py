"""Tiny random models for ADM's text-to-image + segmentation route (``adm.route=t2i_segment``).

Built from configs like :mod:`dreammix.models.tiny` (no hub access), saved with ``save_pretrained``
and then loaded through the same ``from_pretrained`` code as the real models:

- the text-to-image SDXL *base*: the tiny Fooocus base (:func:`dreammix.models.fooocus.build_tiny_fooocus`,
  a plain 4-channel SDXL UNet with the tiny inpainting model's VAE and text encoders), the stand-in
  for ``stabilityai/stable-diffusion-xl-base-1.0``;
- CLIPSeg: ``CLIPSegForImageSegmentation`` + ``CLIPSegProcessor`` (ViT image processor with
  CLIPSeg's ImageNet normalisation, CLIP tokenizer over the in-code vocabulary), the stand-in for
  ``CIDAS/clipseg-rd64-refined`` (352 px input, 3 extracted layers, reduce dim 64).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreammix.atomic import atomic_write_dir

TINY_CLIPSEG_SIZE = 32
#: CLIPSeg's normalisation (the refined checkpoint's preprocessor_config.json).
CLIPSEG_MEAN = (0.485, 0.456, 0.406)
CLIPSEG_STD = (0.229, 0.224, 0.225)


def ensure_tiny_t2i(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny SDXL text-to-image base at ``path`` unless it is there (atomic rename).

    It is the same pipeline :func:`dreammix.models.fooocus.ensure_tiny_fooocus` saves as its base
    (same seed), so ``model=tiny`` and ``model=tiny_fooocus`` may share the folder.
    """
    from dreammix.models.fooocus import build_tiny_fooocus

    return atomic_write_dir(
        Path(path).expanduser(), lambda d: build_tiny_fooocus(seed).save_pretrained(d, safe_serialization=True),
        marker="model_index.json", remove_incomplete=True,
    )


def build_tiny_clipseg(seed: int = 0):
    """A tiny random ``CLIPSegForImageSegmentation`` and its ``CLIPSegProcessor``, in memory."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer, ViTImageProcessor

    from dreammix.models.tiny import tokenizer_vocab_and_merges

    vocab, merges = tokenizer_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    image_processor = ViTImageProcessor(
        size={"height": TINY_CLIPSEG_SIZE, "width": TINY_CLIPSEG_SIZE}, image_mean=list(CLIPSEG_MEAN),
        image_std=list(CLIPSEG_STD), resample=2,
    )
    config = CLIPSegConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=TINY_CLIPSEG_SIZE, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4,
        ),
        projection_dim=16, extract_layers=[1, 2], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    return model, CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


def ensure_tiny_clipseg(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny CLIPSeg model and processor at ``path`` unless they are there (atomic rename)."""

    def save(directory: Path) -> None:
        model, processor = build_tiny_clipseg(seed)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)

    return atomic_write_dir(Path(path).expanduser(), save, marker="config.json", remove_incomplete=True)
