"""Multi-subject inpainting: several regions, each with its own mask, prompt and subject LoRA.

The paper (§5) names multi-subject inpainting as future work. This module extends DIF (§3.2) to R
regions on the pipeline's own internals, with one UNet and one peft adapter per subject (each LoRA
folder loaded once, then switched per region with ``set_adapters``):

1. **LCG per region** (steps ``0 … k-1`` with its adapter and prompt, Eq. 3–5): each region's
   enlarged crop m'_r is inpainted and pasted through its own feathered mask → x^G (all regions).
   Region r's crop is cut from x^G as it stands after regions ``< r`` were pasted, so a subject
   whose crop overlaps an earlier one sees it.
2. **GCH per region, sequentially** (steps ``k … T-1``, Eq. 6, its adapter and prompt): region r is
   harmonised over the whole image with the Eq. 6 blend against *its own* mask; every other pixel,
   including the other subjects, is the known image noised to the current level. The result is
   composited into the image through region r's feathered mask, and region r+1 is harmonised on that.

Why sequential GCH rather than one pass with a masked combination of per-adapter predictions: both
cost one UNet call per region per step (a LoRA changes the UNet, so R subjects need R forward passes
per step either way), but here each region's pass *is* the single-subject pipeline's GCH with that
subject's adapter alone — no adapter ever denoises another subject's pixels (they are outside its
blend mask), so identities cannot leak through a shared latent, and a single region gives exactly
``DreamMixInpaintPipeline.__call__``'s result. The price is one VAE encode/decode of the whole image
per region instead of one in total.

Cost for T steps and λ: R·k LCG + R·(T − k) GCH = **R·T UNet calls** (batched CFG each), one text
encoder call per region. Overlapping masks are refused (a pixel belongs to one subject); where two
regions' feather bands meet, the later region in the list is composited last.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from dreammix.crop import Box, composite, feather, lcg_crop_box, paste, processing_size, resize_mask
from dreammix.errors import DreamMixError
from dreammix.pipeline_inputs import STAGES, _as_binary_mask, _as_rgb_array, _resize, split_steps
from dreammix.tas import IDENTIFIER, clean_eliminate_words

#: Attribute on the pipeline: resolved LoRA folder → its peft adapter name (each loaded once).
_ADAPTERS_ATTR = "_dreammix_region_adapters"


@dataclass(frozen=True)
class Region:
    """One subject to inpaint: ``mask`` (1 = fill, image-sized), ``prompt``, its LoRA folder (None =
    the base model), the adapter weight, and the TAS words of its prompt (Eq. 9; None = no TAS)."""

    mask: Any
    prompt: str
    lora: str | Path | None = None
    lora_scale: float = 1.0
    eliminate: Sequence[str] | None = None

    @classmethod
    def from_mapping(cls, data: Any, index: int) -> "Region":
        """A region from a dict (``{mask, prompt, lora, lora_scale, eliminate}``) or a Region."""
        if isinstance(data, Region):
            return data
        if not hasattr(data, "keys"):
            raise DreamMixError(f"region {index} must be a mapping with mask and prompt", f"regions[{index}]")
        unknown = set(data.keys()) - {"mask", "prompt", "lora", "lora_scale", "eliminate"}
        if unknown:
            raise DreamMixError(f"unknown keys {sorted(unknown)} (mask, prompt, lora, lora_scale, eliminate)", f"regions[{index}]")
        for key in ("mask", "prompt"):
            if data.get(key) is None:
                raise DreamMixError(f"region {index} has no {key}", f"regions[{index}].{key}")
        eliminate = data.get("eliminate")
        return cls(
            mask=data["mask"], prompt=data["prompt"], lora=data.get("lora"),
            lora_scale=float(data.get("lora_scale", 1.0) if data.get("lora_scale") is not None else 1.0),
            eliminate=[eliminate] if isinstance(eliminate, str) else (list(eliminate) if eliminate else None),
        )  # fmt: skip


@dataclass
class MultiRegionOutput:
    """``images``: final images at the input's size; ``lcg_images``: x^G with every region's LCG
    result pasted (None when λ = 0); ``crop_boxes``: each region's m' (None when λ = 0);
    ``lcg_steps``: k; ``adapters``: each region's peft adapter name (None = base model)."""

    images: list[PIL.Image.Image]
    lcg_images: list[PIL.Image.Image] | None
    crop_boxes: list[tuple[int, int, int, int]] | None
    lcg_steps: int
    adapters: list[str | None] = field(default_factory=list)


def check_disjoint(masks: Sequence[np.ndarray]) -> None:
    """Refuse overlapping masks: a pixel can hold one subject only."""
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            both = int(np.count_nonzero((masks[i] > 0.5) & (masks[j] > 0.5)))
            if both:
                raise DreamMixError(
                    f"masks of regions {i} and {j} overlap in {both} pixels; each pixel may belong to one "
                    "subject (erase the overlap from one of them)", "regions",
                )  # fmt: skip


def region_adapter(pipe, lora: str | Path | None) -> str | None:
    """The peft adapter name of ``lora`` on ``pipe``'s one UNet, loading the folder the first time
    it is asked for (``region_<i>``); None for the base model."""
    if lora is None or str(lora) == "":
        return None
    loaded: dict[str, str] = pipe.__dict__.setdefault(_ADAPTERS_ATTR, {})
    key = str(Path(lora).expanduser().resolve())
    if key not in loaded:
        name = f"region_{len(loaded)}"
        pipe.load_subject_lora(key, adapter_name=name)
        loaded[key] = name
    return loaded[key]


@contextlib.contextmanager
def adapter_active(pipe, adapter: str | None, scale: float):
    """Inside the block the UNet runs with ``adapter`` alone at ``scale`` (None: all adapters off)."""
    if adapter is None:
        with pipe.adapter_disabled():
            yield
        return
    pipe.unet.enable_adapters()
    pipe.set_adapters([adapter], adapter_weights=[scale])
    yield


@dataclass
class _Prepared:
    mask: np.ndarray
    alpha: np.ndarray
    adapter: str | None
    scale: float
    conds: dict
    box: Box | None = None
    patches: list[np.ndarray] | None = None  # LCG results at box size, one per image


@torch.no_grad()
def inpaint_regions(
    pipe,
    image: PIL.Image.Image | np.ndarray,
    regions: Sequence[Region | dict],
    negative_prompt: str | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    lambda_: float = 0.7,
    tas_stages: Sequence[str] = STAGES,
    identifier: str = IDENTIFIER,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    resolution: int | None = None,
    crop_scale: float = 1.15,
    min_crop_frac: float = 0.5,
    blend: bool = True,
    feather_radius: int | None = None,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    callback_on_step_end: Callable | None = None,
) -> MultiRegionOutput:
    """Inpaint every region of ``image`` with its own prompt and LoRA (see the module docstring);
    the arguments mean what they mean in :meth:`DreamMixInpaintPipeline.__call__`. The last region's
    adapter stays active afterwards: a later plain ``pipe(...)`` call selects its own with
    ``pipe.set_adapters`` (or ``load_subject_lora``)."""
    if not regions:
        raise DreamMixError("at least one region is needed", "regions")
    regions = [Region.from_mapping(r, i) for i, r in enumerate(regions)]
    x = _as_rgb_array(image)
    masks = [_as_binary_mask(r.mask) for r in regions]
    tas_stages = tuple(tas_stages or ())
    words = [clean_eliminate_words(r.eliminate, identifier) for r in regions]
    for r, (region, mask) in enumerate(zip(regions, masks)):
        try:
            pipe.check_inputs(
                x, mask, region.prompt, num_inference_steps, guidance_scale, lambda_, num_images_per_prompt,
                "pil", words[r], tas_stages, identifier, generator, feather_radius,
            )  # fmt: skip
        except DreamMixError as exc:
            raise DreamMixError(exc.what, f"regions[{r}]" + (f".{exc.where}" if exc.where else "")) from exc
    check_disjoint(masks)
    adapters = [region_adapter(pipe, region.lora) for region in regions]

    # the pipeline's per-call state, as its __call__ sets it
    pipe._guidance_scale = guidance_scale
    pipe._guidance_rescale = guidance_rescale
    pipe._cross_attention_kwargs = None
    pipe._clip_skip = None
    pipe._denoising_start = pipe._denoising_end = None
    pipe._interrupt = False
    pipe._num_timesteps = num_inference_steps
    device, dtype = pipe._execution_device, pipe.unet.dtype
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(dtype=torch.float32)
    height, width = x.shape[:2]
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    multiple = pipe._size_multiple()
    n, T = num_images_per_prompt, num_inference_steps
    k = split_steps(lambda_, T)
    full_size = processing_size(width, height, resolution, multiple)
    if feather_radius is None:  # the pipeline's default: half a latent cell at the input's size
        ratio = max(width / full_size[0], height / full_size[1])
        feather_radius = max(1, int(math.ceil(pipe.vae_scale_factor * ratio / 2)))

    prepared = []
    for region, mask, adapter, eliminate in zip(regions, masks, adapters, words):
        conds = pipe._encode_conditions(region.prompt, negative_prompt, eliminate, tas_stages, n, device, dtype)
        prepared.append(_Prepared(mask, feather(mask, feather_radius), adapter, region.lora_scale, conds))

    def with_patches(base: np.ndarray, i: int, regions_from: int) -> np.ndarray:
        """``base`` with the LCG results of regions ``regions_from…`` pasted in order (image i)."""
        out = base
        for p in prepared[regions_from:]:
            if p.patches is not None:
                out = paste(out, p.patches[i], p.box, p.alpha)
        return out

    x_pil = PIL.Image.fromarray(x)
    try:
        with pipe.progress_bar(total=len(regions) * T) as progress_bar:
            common = dict(
                num_inference_steps=T, num_images=n, generator=generator, blend=blend, device=device,
                dtype=dtype, eta=eta, callback_on_step_end=callback_on_step_end, progress_bar=progress_bar,
            )  # fmt: skip
            # 1. LCG per region (Eq. 3–5), each pasted into x^G
            if k > 0:
                for r, p in enumerate(prepared):
                    p.box = lcg_crop_box(p.mask, crop_scale, min_crop_frac)
                    crop_size = processing_size(p.box.width, p.box.height, resolution, multiple)
                    if r == 0:  # nothing pasted yet: one shared crop (the single-region random stream)
                        crops = [x_pil.crop(p.box.as_tuple())]
                    else:
                        crops = [PIL.Image.fromarray(with_patches(x, i, 0)[p.box.slices()]) for i in range(n)]
                    with adapter_active(pipe, p.adapter, p.scale):
                        latents = pipe._denoise_stage(
                            stage="local", images=crops, mask=resize_mask(p.mask[p.box.slices()], crop_size),
                            size=crop_size, start=0, stop=k, cond=p.conds["local"], **common,
                        )  # fmt: skip
                    p.patches = [np.asarray(_resize(im, (p.box.width, p.box.height))) for im in pipe._vae_decode(latents)]
            x_g = [with_patches(x, i, 0) for i in range(n)]

            # 2. GCH per region (Eq. 6), sequentially: region r on the image with regions < r final
            #    and regions > r still at their LCG result
            finals = [x] * n
            if k < T:
                for r, p in enumerate(prepared):
                    stages = [with_patches(finals[i], i, r) for i in range(n)]
                    untouched = k == 0 and r == 0
                    images = [x_pil] if untouched else [PIL.Image.fromarray(a) for a in stages]
                    with adapter_active(pipe, p.adapter, p.scale):
                        latents = pipe._denoise_stage(
                            stage="global", images=images, mask=resize_mask(p.mask, full_size), size=full_size,
                            start=k, stop=T, cond=p.conds["global"], **common,
                        )  # fmt: skip
                    generated = pipe._vae_decode(latents)
                    finals = [composite(finals[i], np.asarray(_resize(g, (width, height))), p.alpha) for i, g in enumerate(generated)]
            else:
                finals = x_g
    finally:
        pipe.maybe_free_model_hooks()

    return MultiRegionOutput(
        images=[PIL.Image.fromarray(f) for f in finals],
        lcg_images=[PIL.Image.fromarray(a) for a in x_g] if k > 0 else None,
        crop_boxes=[p.box.as_tuple() for p in prepared] if k > 0 else None,
        lcg_steps=k,
        adapters=adapters,
    )
