"""Tiny random CLIP and DINO-ViT models of the real classes, for offline tests and ``metrics=tiny``.

Same classes, processors and ``from_pretrained`` loading path as ``openai/clip-vit-base-patch32``
and ``facebook/dino-vits16``, a few hundred thousand times smaller, built from configs with a
tokenizer made in code (:func:`dreammix.models.tiny.tokenizer_vocab_and_merges`) — no hub access.
Scores from these models are meaningless; the code paths and the cosine arithmetic are not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreammix.atomic import atomic_write_dir

TINY_IMAGE_SIZE = 32
_VISION = dict(
    image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
)


def ensure_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPModel`` + ``CLIPImageProcessor`` + ``CLIPTokenizer`` at ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from dreammix.models.tiny import tokenizer_vocab_and_merges

    def save(directory: Path) -> None:
        vocab, merges = tokenizer_vocab_and_merges()
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
        )
        config = CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
            vision_config=dict(_VISION),
            projection_dim=16,
        )
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        image_processor.save_pretrained(directory)

    return atomic_write_dir(path, save, marker="config.json")


def ensure_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``ViTModel`` (no pooler, like the DINO checkpoints) at ``path``."""
    from transformers import ViTConfig, ViTModel

    def save(directory: Path) -> None:
        config = ViTConfig(**_VISION)
        torch.manual_seed(seed)
        ViTModel(config, add_pooling_layer=False).save_pretrained(directory)

    return atomic_write_dir(path, save, marker="config.json")
