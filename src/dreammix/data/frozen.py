"""Frozen inputs computed once: VAE latents, both text encoders' embeddings, SDXL time ids.

Only the UNet's LoRA weights train, so everything upstream of the UNet is a constant per item.
We encode it once before training (``CachedInpaintSet``) and the training step runs the UNet
alone — no text-encoder or VAE-encoder call per step (the performance issue counts this).
Mask augmentation is kept by encoding ``variants`` augmented masks per source image up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dreammix.data.masks import MASK_MODES, MaskAugmentation, augment_mask, bezier_blob_mask
from dreammix.data.subjects import MaskedImage
from dreammix.errors import DreamMixError
from dreammix.losses import latent_mask

#: ``center``: centre square, time ids ``(R, R, 0, 0, R, R)``; ``random``: the public code's
#: (and diffusers' SDXL training scripts') resize-short-side + random crop, with the crop offset
#: and the original size in the time ids.
CROP_MODES = ("center", "random")
#: ``mean``: the VAE posterior's mean; ``sample``: one posterior draw per cached item (the public
#: code encodes with ``pipe._encode_vae_image``, which samples).
LATENT_MODES = ("mean", "sample")


@dataclass(frozen=True)
class InputOptions:
    """How training items are cut, masked and encoded (``conf/data``: ``crop``, ``vae_latents``,
    ``mask_mode``, ``blob_grow``). Defaults: the paper text's reading (centre crop, posterior
    mean, the given masks + augmentation); each value alone switches to the public code's way."""

    crop: str = "center"
    vae_latents: str = "mean"
    mask_mode: str = "augment"
    blob_grow: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self) -> None:
        for name, value, allowed in (("crop", self.crop, CROP_MODES), ("vae_latents", self.vae_latents, LATENT_MODES),
                                     ("mask_mode", self.mask_mode, MASK_MODES)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        low, high = self.blob_grow
        if not 0.0 <= low <= high:
            raise ValueError(f"blob_grow must be [low, high] with 0 <= low <= high, got {list(self.blob_grow)}")

    @property
    def per_item_latents(self) -> bool:
        """Each item needs its own clean latents (its own crop, or its own posterior draw)."""
        return self.crop == "random" or self.vae_latents == "sample"


#: A square crop must keep at least this share of the object mask's pixels.
MIN_KEPT_MASK = 0.5


def object_square(mask: np.ndarray, path=None) -> tuple[int, int, int, int]:  # noqa: ANN001 - Path | None
    """The square crop box ``(left, top, right, bottom)`` of a photo with object ``mask`` ``(H, W)``.

    The centre square when it keeps most of the mask (at least :data:`MIN_KEPT_MASK`); otherwise
    the square position along the long side that keeps the most mask pixels (the nearest to the
    centre among equals): a 4000×50 photo with its object at the left edge kept 0 of its 5,700
    object pixels under a plain centre crop, and the run trained on background. An object that no
    square keeps most of is an error naming the photo, never a silent loss of the subject.
    """
    h, w = mask.shape
    side = min(w, h)
    centre = ((w - side) // 2, (h - side) // 2)
    total = float(mask.sum())
    counts = (mask.sum(axis=0) if w > h else mask.sum(axis=1)).astype(np.float64)
    sums = np.concatenate([[0.0], np.cumsum(counts)])
    kept = sums[side:] - sums[: len(counts) - side + 1]  # mask pixels of the window starting at each offset
    start = centre[0] if w > h else centre[1]
    if total > 0 and kept[start] < MIN_KEPT_MASK * total:
        best = kept.max()
        candidates = np.flatnonzero(kept == best)
        start = int(candidates[np.argmin(np.abs(candidates - start))])
        if best < MIN_KEPT_MASK * total:
            raise DreamMixError(
                f"no square crop keeps most of the object ({best / total:.0%} of its mask at best in a {w}x{h} photo); "
                "crop the photo closer to the object", str(path) if path else "subject image",
            )
    left, top = (start, 0) if w > h else (0, start)
    return left, top, left + side, top + side


def square_crop_resize(example: MaskedImage, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crop (:func:`object_square`), resize to ``resolution``: image in [-1, 1] ``(3,R,R)``, mask ``(R,R)``.

    Subject photos are square in DreamBench; a square crop keeps the object for other aspect
    ratios better than squashing it. The mask is resized with nearest neighbour and stays binary.
    """
    image = example.image
    box = object_square(example.mask, getattr(example, "path", None))
    image = image.crop(box).resize((resolution, resolution), Image.BICUBIC)
    mask_img = Image.fromarray((example.mask * 255).astype(np.uint8), mode="L").crop(box)
    mask_img = mask_img.resize((resolution, resolution), Image.NEAREST)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    mask = torch.from_numpy((np.asarray(mask_img) >= 128).astype(np.float32))
    return pixels, mask


def random_crop_resize(example: MaskedImage, resolution: int, generator: torch.Generator):
    """Short side resized to ``resolution``, then a uniformly placed ``resolution²`` crop.

    Returns pixels in [-1, 1] ``(3,R,R)``, the binary mask ``(R,R)`` and the SDXL time ids
    ``(orig_h, orig_w, top, left, R, R)``: original size before resizing, crop offset in the
    resized image (what the public code and diffusers' SDXL training script pass as
    ``original_size`` / ``crops_coords_top_left``). A square photo (all of DreamBench) has offset
    (0, 0); on a long photo the crop may, as in the public code, leave the object out.
    """
    image = example.image
    w, h = image.size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    top = int(torch.randint(0, rh - resolution + 1, (), generator=generator))
    left = int(torch.randint(0, rw - resolution + 1, (), generator=generator))
    box = (left, top, left + resolution, top + resolution)
    resized = image.resize((rw, rh), Image.BICUBIC).crop(box)
    mask_img = Image.fromarray((example.mask * 255).astype(np.uint8), mode="L").resize((rw, rh), Image.NEAREST).crop(box)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    mask = torch.from_numpy((np.asarray(mask_img) >= 128).astype(np.float32))
    time_ids = torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32)
    return pixels, mask, time_ids


class FrozenInputEncoder:
    """Wraps the frozen parts of an SDXL inpainting pipeline (VAE encoder, two text encoders)."""

    def __init__(self, pipe, device: torch.device | str = "cpu", batch_size: int = 4):
        self.pipe = pipe
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 77, D1+D2)`` penultimate token states of both encoders, ``(N, P)`` pooled."""
        embeds, pooled = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            e, _, p, _ = self.pipe.encode_prompt(
                prompt=chunk, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            embeds.append(e.float().cpu())
            pooled.append(p.float().cpu())
        return torch.cat(embeds), torch.cat(pooled)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of ``(N, 3, R, R)`` images in [-1, 1]: the posterior's mean, or
        with ``sample`` one draw ``mean + std·ε`` (``ε`` from ``generator``)."""
        vae = self.pipe.vae
        out = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size].to(self.device, vae.dtype)
            posterior = vae.encode(chunk).latent_dist
            latents = posterior.sample(generator) if sample else posterior.mode()
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            out.append(((latents - shift) * vae.config.scaling_factor).float().cpu())
        return torch.cat(out)

    @staticmethod
    def time_ids(resolution: int) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop top-left, target size (6 numbers)."""
        return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


@dataclass
class CachedInpaintSet(torch.utils.data.Dataset):
    """Encoded training items: everything the UNet needs, nothing that needs another model.

    Item ``i`` uses image ``image_index[i]`` and prompt ``prompt_index[i]``; masks are per item
    (several augmented variants of one image share its clean latents).
    """

    latents: torch.Tensor  # (n_images, 4, r, r)
    masked_latents: torch.Tensor  # (n_items, 4, r, r)
    masks: torch.Tensor  # (n_items, 1, r, r), latent resolution, max-pooled
    image_index: torch.Tensor  # (n_items,)
    prompt_embeds: torch.Tensor  # (n_prompts, 77, D)
    pooled_embeds: torch.Tensor  # (n_prompts, P)
    prompt_index: torch.Tensor  # (n_items,)
    time_ids: torch.Tensor  # (6,) shared, or (n_items, 6) per item (random crops)

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(torch.tensor([i])).items()}

    def batch(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """The items ``items`` stacked into a batch by tensor indexing (no per-item collation)."""
        images, prompts = self.image_index[items], self.prompt_index[items]
        return {
            "latents": self.latents[images],
            "masked_latents": self.masked_latents[items],
            "mask": self.masks[items],
            "prompt_embeds": self.prompt_embeds[prompts],
            "pooled_embeds": self.pooled_embeds[prompts],
            "time_ids": self.time_ids[items] if self.time_ids.dim() == 2 else self.time_ids.expand(len(items), -1),
        }


def encode_examples(
    examples: list[MaskedImage],
    prompts: list[str],
    encoder: FrozenInputEncoder,
    resolution: int,
    variants: int = 1,
    augmentation: MaskAugmentation | None = None,
    seed: int = 0,
    options: InputOptions = InputOptions(),
) -> CachedInpaintSet:
    """Encode images, ``variants`` masks per image and prompts.

    ``prompts`` holds one prompt per example, or a single shared prompt. With the default
    ``options`` variant 0 is the mask as given and the others are augmented, sharing the image's
    clean latents. ``options.mask_mode="blob"`` makes every variant a Bézier blob;
    ``options.crop="random"`` gives every variant its own crop and time ids;
    ``options.vae_latents="sample"`` its own posterior draw (the public code's 10 cached repeats
    per photo, each cropped, blob-masked and encoded anew).
    """
    if len(prompts) not in (1, len(examples)):
        raise ValueError("need one prompt per example or a single shared prompt")
    generator = torch.Generator().manual_seed(seed)
    centred = [square_crop_resize(e, resolution) for e in examples] if options.crop == "center" else None
    item_images, item_masks, item_pixels, item_time_ids, image_index = [], [], [], [], []
    for i, example in enumerate(examples):
        for v in range(variants):
            if centred is not None:
                pixels, mask = centred[i]
                time_ids = FrozenInputEncoder.time_ids(resolution)
            else:
                pixels, mask, time_ids = random_crop_resize(example, resolution, generator)
            if options.mask_mode == "blob":
                m = bezier_blob_mask(mask, options.blob_grow, generator)
            elif v == 0 or augmentation is None:
                m = mask
            else:
                m = augment_mask(mask, augmentation, generator)
            item_images.append(pixels)
            item_masks.append(m)
            item_pixels.append(pixels * (1.0 - m))  # masked image: region to fill set to 0 (mid-grey)
            item_time_ids.append(time_ids)
            image_index.append(i)
    unique_prompts = list(dict.fromkeys(prompts))
    prompt_embeds, pooled = encoder.encode_prompts(unique_prompts)
    prompt_of_example = [unique_prompts.index(prompts[0] if len(prompts) == 1 else prompts[i]) for i in range(len(examples))]
    factor = encoder.vae_scale_factor
    sample = options.vae_latents == "sample"
    # A generator of its own: sampling the posterior does not shift the crop / mask draws above.
    vae_generator = torch.Generator().manual_seed(seed + 1_000_033) if sample else None
    if options.per_item_latents:
        latents = encoder.encode_images(torch.stack(item_images), sample=sample, generator=vae_generator)
        latent_index = torch.arange(len(image_index))
    else:
        latents = encoder.encode_images(torch.stack([c[0] for c in centred]))
        latent_index = torch.tensor(image_index)
    return CachedInpaintSet(
        latents=latents,
        masked_latents=encoder.encode_images(torch.stack(item_pixels), sample=sample, generator=vae_generator),
        masks=latent_mask(torch.stack(item_masks)[:, None], factor=factor),
        image_index=latent_index,
        prompt_embeds=prompt_embeds,
        pooled_embeds=pooled,
        prompt_index=torch.tensor([prompt_of_example[i] for i in image_index]),
        time_ids=torch.stack(item_time_ids) if options.crop == "random" else FrozenInputEncoder.time_ids(resolution),
    )
