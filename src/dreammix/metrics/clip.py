"""CLIP-I and CLIP-T with transformers' ``CLIPModel`` (DESIGN.md §3–4; paper §4.1).

- **CLIP-I**: mean cosine between the CLIP image embedding of a generated image (the inpainted
  region's crop, and the full image) and that of every reference image of the subject.
- **CLIP-T**: cosine between the image embedding and the text embedding of the prompt with the
  identifier (``sks``) removed — the text encoder never learned the identifier, so leaving it in
  only adds noise to the score.

Both are raw cosines in [-1, 1], as in the paper's tables (not ×100, not clipped at 0 like
torchmetrics' CLIPScore). We call ``CLIPModel.get_image_features``/``get_text_features``
ourselves rather than torchmetrics' ``CLIPScore``: with transformers 5 those methods return a
``BaseModelOutputWithPooling`` (projected embeddings in ``pooler_output``) instead of a tensor,
which CLIPScore does not handle; :func:`projected_embeds` accepts both forms.
Preprocessing is the checkpoint's own ``CLIPImageProcessor`` (shortest side to the model
resolution, bicubic, centre crop, CLIP normalisation).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreammix.data.images import load_image
from dreammix.errors import DreamMixError
from dreammix.metrics.common import FeatureCache, batched, mean_cosine, model_fingerprint, normalize, resolve_device

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


def strip_identifier(prompt: str, identifier: str = "sks") -> str:
    """``"a sks red can"`` → ``"a red can"``: the identifier removed as a whole word."""
    if not identifier:
        return " ".join(prompt.split())
    text = re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt, flags=re.IGNORECASE)
    return " ".join(text.split())


def projected_embeds(output: Any, kind: str) -> torch.Tensor:
    """The projected embeddings from ``get_{kind}_features``, whatever transformers returns:
    a tensor (transformers 4), or a ModelOutput with ``{kind}_embeds`` or ``pooler_output``
    (transformers 5, where ``pooler_output`` holds the *projected* features)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in (f"{kind}_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP {kind} feature output: {type(output).__name__}")


def load_pretrained(loader: Any, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with a one-line error naming the model (no hub on CI)."""
    try:
        return loader.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise DreamMixError(
            f"cannot load {what} ({exc.__class__.__name__}); give a hub id or a local folder", str(name_or_path)
        ) from exc


class ClipScorer:
    """CLIP image/text embeddings (L2-normalised, float32, CPU) and the CLIP-I / CLIP-T scores."""

    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        *,
        name: str = DEFAULT_CLIP_MODEL,
        device: str | torch.device | None = "auto",
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
    ):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.name = str(name)
        self.cache = FeatureCache("clip-" + model_fingerprint(self.model, self.name), cache_dir)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_CLIP_MODEL,
        *,
        device: str | torch.device | None = "auto",
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
    ) -> ClipScorer:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        model = load_pretrained(CLIPModel, name_or_path, "CLIP model")
        image_processor = load_pretrained(CLIPImageProcessor, name_or_path, "CLIP image processor")
        tokenizer = load_pretrained(CLIPTokenizer, name_or_path, "CLIP tokenizer")
        if len(tokenizer) <= 2:
            # transformers 5 builds an empty (specials-only) tokenizer from a folder without
            # tokenizer files instead of failing: every CLIP-T prompt would be unknown tokens
            raise DreamMixError(f"no CLIP tokenizer files (vocabulary of {len(tokenizer)} tokens) in {name_or_path}",
                                "metrics.clip")
        return cls(
            model, image_processor, tokenizer, name=str(name_or_path), device=device, batch_size=batch_size, cache_dir=cache_dir
        )

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)`` normalised image embeddings, computed in batches."""
        rows = []
        for chunk in batched(list(images), self.batch_size):
            pixels = self.image_processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, dtype=self.model.dtype)
            rows.append(normalize(projected_embeds(self.model.get_image_features(pixel_values=pixels), "image")).cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.model.config.projection_dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` normalised text embeddings (CLIP's 77-token limit: longer prompts truncated)."""
        rows = []
        for chunk in batched(list(texts), self.batch_size):
            tokens = self.tokenizer(list(chunk), padding=True, truncation=True, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            rows.append(normalize(projected_embeds(self.model.get_text_features(**tokens), "text")).cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.model.config.projection_dim)

    def reference_features(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Embeddings of reference images, cached per image (memory + optional disk)."""
        return self.cache.features(paths, lambda missing: self.encode_images([load_image(p) for p in missing]))

    def clip_i(
        self, images: Sequence[Image.Image] | torch.Tensor, references: Sequence[str | Path] | torch.Tensor
    ) -> torch.Tensor:
        """``(N,)`` CLIP-I: mean cosine of each image with every reference image."""
        features = images if isinstance(images, torch.Tensor) else self.encode_images(images)
        refs = references if isinstance(references, torch.Tensor) else self.reference_features(references)
        return mean_cosine(features, refs)

    def clip_t(
        self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str], identifier: str = "sks"
    ) -> torch.Tensor:
        """``(N,)`` CLIP-T: cosine of image *i* with prompt *i* (identifier removed)."""
        features = images if isinstance(images, torch.Tensor) else self.encode_images(images)
        if len(prompts) != len(features):
            raise DreamMixError(f"{len(features)} images but {len(prompts)} prompts", "CLIP-T")
        texts = self.encode_texts([strip_identifier(p, identifier) for p in prompts])
        return (normalize(features) * normalize(texts)).sum(dim=1)
