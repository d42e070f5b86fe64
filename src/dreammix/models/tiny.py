"""A tiny random SDXL-shaped inpainting pipeline, built from configs (diffusers' test style).

Same classes and wiring as ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1`` — a 9-channel
UNet with the ``text_time`` added embedding (6 time ids + pooled text), two CLIP text encoders
whose penultimate states are concatenated, a VAE with down-scale factor 8, Euler scheduler — only
a few thousand times smaller. It is saved with ``save_pretrained`` and then loaded through the
same ``from_pretrained`` path as the real model, so tests exercise the real loading code.
The tokenizer is built in code: a byte-level BPE vocabulary with no hub download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreammix.atomic import atomic_write_dir

TEXT_HIDDEN = 32
PROJECTION_DIM = 32
TIME_EMBED_DIM = 8
NUM_TIME_IDS = 6  # SDXL inpainting 0.1: original size, crop coords, target size (no aesthetic score)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


#: Words that get a single token each (so prompts in tests tokenize into meaningful units).
_WORDS = ("a", "photo", "of", "sks", "can", "dog", "cat", "red", "blue", "teapot", "clock", "toy", "the", "in", "on")


def tokenizer_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE vocabulary: specials (bos 0, eos 1), every byte with and without the
    end-of-word marker, and merges that make each of ``_WORDS`` a single token."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    for ch in byte_chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)  # tokenizers >= 0.23 wants merges as tuples
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    return vocab, merges


def sdxl_tokenizers():
    """SDXL's two CLIP tokenizers over the in-code vocabulary; the second pads with "!" (as the
    real model does)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab_and_merges()
    return (CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77),
            CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="!", model_max_length=77))


def assemble_inpaint_pipeline(unet, vae, text_encoder, text_encoder_2, tokenizers=None):
    """An SDXL inpainting pipeline around built models: SDXL's Euler schedule, in-code tokenizers."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline

    tokenizer, tokenizer_2 = tokenizers or sdxl_tokenizers()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        num_train_timesteps=1000,
    )
    return StableDiffusionXLInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_pipeline(seed: int = 0):
    """Create the tiny pipeline in memory (random weights from ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = sdxl_tokenizers()
    vocab_size = len(tokenizers[0])

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=NUM_TIME_IDS * TIME_EMBED_DIM + PROJECTION_DIM,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        vocab_size=vocab_size,
        hidden_act="gelu",
        projection_dim=PROJECTION_DIM,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return assemble_inpaint_pipeline(unet, vae, text_encoder, text_encoder_2, tokenizers)


def ensure_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny pipeline at ``path`` unless it is already there (atomic rename)."""
    # Another process that finishes first writes an identical copy (same seed): it is kept.
    def save(staging: Path) -> None:
        build_tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)

    return atomic_write_dir(path, save, marker="model_index.json")
