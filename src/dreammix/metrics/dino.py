"""DINO subject similarity (DreamBooth's metric; paper §4.1): mean cosine between the CLS token of
a self-supervised ViT-S/16 (``facebook/dino-vits16``, transformers ``ViTModel``) for a generated
image and for every reference image of the subject.

Preprocessing follows the DreamBooth evaluation: ``Resize(256, bicubic)`` of the shorter side,
``CenterCrop(224)``, ImageNet mean/std — not the checkpoint's ``ViTImageProcessor`` (which
squashes to 224×224 without keeping the aspect ratio). DINO is more sensitive than CLIP to the
subject's unique features, which is why the paper reports both. Raw cosine in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreammix.data.images import load_image
from dreammix.metrics.clip import load_pretrained
from dreammix.metrics.common import FeatureCache, batched, mean_cosine, model_fingerprint, normalize, resolve_device

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_transform(resize: int = 256, crop: int = 224):
    """The DreamBooth DINO preprocessing as a torchvision transform (PIL → normalised tensor)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(int(resize), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(int(crop)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class DinoScorer:
    """DINO CLS embeddings (L2-normalised, float32, CPU) and the DINO score."""

    def __init__(
        self,
        model: Any,
        *,
        name: str = DEFAULT_DINO_MODEL,
        resize: int = 256,
        crop: int = 224,
        device: str | torch.device | None = "auto",
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
    ):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.transform = dino_transform(resize, crop)
        self.batch_size = int(batch_size)
        self.name = str(name)
        key = model_fingerprint(self.model, self.name, extra=f"resize={resize},crop={crop}")
        self.cache = FeatureCache("dino-" + key, cache_dir)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_DINO_MODEL,
        *,
        resize: int = 256,
        crop: int = 224,
        device: str | torch.device | None = "auto",
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
    ) -> DinoScorer:
        from transformers import ViTModel

        # The DINO checkpoints have no pooler; the CLS token is all we use.
        model = load_pretrained(ViTModel, name_or_path, "DINO ViT model", add_pooling_layer=False)
        return cls(
            model,
            name=str(name_or_path),
            resize=resize,
            crop=crop,
            device=device,
            batch_size=batch_size,
            cache_dir=cache_dir,
        )

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)`` normalised CLS tokens of the last hidden state, computed in batches."""
        rows = []
        for chunk in batched(list(images), self.batch_size):
            pixels = torch.stack([self.transform(im.convert("RGB")) for im in chunk])
            pixels = pixels.to(self.device, dtype=self.model.dtype)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            rows.append(normalize(hidden[:, 0]).cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.model.config.hidden_size)

    def reference_features(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """CLS embeddings of reference images, cached per image (memory + optional disk)."""
        return self.cache.features(paths, lambda missing: self.encode_images([load_image(p) for p in missing]))

    def dino(
        self, images: Sequence[Image.Image] | torch.Tensor, references: Sequence[str | Path] | torch.Tensor
    ) -> torch.Tensor:
        """``(N,)`` DINO: mean cosine of each image with every reference image."""
        features = images if isinstance(images, torch.Tensor) else self.encode_images(images)
        refs = references if isinstance(references, torch.Tensor) else self.reference_features(references)
        return mean_cosine(features, refs)
