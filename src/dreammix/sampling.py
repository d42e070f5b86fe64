"""Sampling knobs of the authors' public code that the paper does not describe (``conf/sampler/``).

The paper (§3.2, §4.1) says only "Fooocus inpainting model" and the DIF/TAS method. The public code
(``mycfhs/DreamMix``: ``FooocusSDXLInpaintAllInOnePipeline.py`` run by ``infer.ipynb``) samples with
a handful of Fooocus tricks on top. Each one is a named value of the ``sampler`` config group,
defaulting to the paper-text behaviour (= off); ``sampler=reference`` turns all of them on with the
notebook's values. This module holds their logic so that :class:`dreammix.pipeline.DreamMixInpaintPipeline`
only calls a few hooks inside its loop:

- :class:`BaseTail` — Fooocus' inpaint "switch" (its *synthetic refiner*): after step ``⌊T·s⌋`` the
  remaining steps run on the **unpatched** SDXL base UNet, without the inpaint head and with the
  subject LoRA disabled. The patch is subtracted in place (no second UNet) and restored bit-exactly.
- :func:`sharpen_noise_pred` — Fooocus' "sharpness": the positive prediction's noise is blended with
  an anisotropic (joint bilateral) filtered copy guided by the positive x₀, weight
  ``0.001·sharpness·(1 − t/999)`` (Fooocus ``modules/patch.py`` + ``modules/anisotropic.py``).
- :func:`size_scaled_step` — Fooocus' "ADM scaler": the positive prompt's SDXL size conditioning
  (original size) ×1.5, the negative's ×0.8, during the first steps.
- :func:`fill_noise_latents` / :func:`fill_hole` — start from the *filled* image plus noise
  (Fooocus/ComfyUI's full-denoise start) instead of pure noise.
- :func:`context_token_span` — TAS words encoded inside ``"a photo of a sks <words>"``.
- :class:`CropUpscaler` — a learned ×N super-resolution of small LCG crops before they are resized
  to the model's resolution (the code uses Fooocus's ESRGAN; here any transformers Swin2SR).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

STARTS = ("noise", "fill_noise")
#: Fooocus's fill (``inpaint_worker.fooocus_fill``): (box-blur radius at ~1024², repeats), coarse to fine.
FILL_SCHEDULE = ((512, 2), (256, 2), (128, 4), (64, 4), (33, 8), (15, 8), (5, 16), (3, 16))
#: Fooocus's anisotropic filter: 13×13 window, σ_color = σ_space = 3, L1 colour distance, reflect border.
FILTER_KERNEL, FILTER_SIGMA_COLOR, FILTER_SIGMA_SPACE = 13, 3.0, 3.0


@dataclass(frozen=True)
class SamplerSpec:
    """The pipeline-side knobs of ``conf/sampler/<name>.yaml`` (scheduler and guidance scale are
    applied by the caller: ``set_scheduler`` and ``guidance_scale``). Defaults = the paper text."""

    name: str = "default"
    base_switch: float = 1.0
    sharpness: float = 0.0
    size_positive: float = 1.0
    size_negative: float = 1.0
    size_end: float = 0.0
    start: str = "noise"
    tas_context: str | None = None
    upscale_model: str | None = None
    upscale_revision: str | None = None

    def __post_init__(self) -> None:
        def number(key: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DreamMixError(f"expected a number, got {value!r}", f"sampler.{key}")
            if value < low or (low_open and value == low) or (high is not None and value > high):
                bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}{']' if high is not None else ')'}"
                raise DreamMixError(f"must be in {bounds}, got {value}", f"sampler.{key}")

        number("base_switch", self.base_switch, 0.0, 1.0)
        number("sharpness", self.sharpness, 0.0)
        number("size_scale.positive", self.size_positive, 0.0, low_open=True)
        number("size_scale.negative", self.size_negative, 0.0, low_open=True)
        number("size_scale.end", self.size_end, 0.0, 1.0)
        if self.start not in STARTS:
            raise DreamMixError(f"unknown start {self.start!r}; choose from {', '.join(STARTS)}", "sampler.start")
        for key, value in (("tas_context", self.tas_context), ("upscale.model", self.upscale_model)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DreamMixError(f"expected a non-empty string or null, got {value!r}", f"sampler.{key}")

    @classmethod
    def from_config(cls, node: Mapping | None) -> "SamplerSpec":
        """Build from ``cfg.sampler`` (a missing group = the paper-text defaults)."""
        if node is None:
            return cls()
        size = node.get("size_scale") or {}
        upscale = node.get("upscale") or {}
        return cls(
            name=str(node.get("name", "custom")),
            base_switch=_float(node.get("base_switch", 1.0)),
            sharpness=_float(node.get("sharpness", 0.0)),
            size_positive=_float(size.get("positive", 1.0)),
            size_negative=_float(size.get("negative", 1.0)),
            size_end=_float(size.get("end", 0.0)),
            start=str(node.get("start", "noise")),
            tas_context=node.get("tas_context"),
            upscale_model=upscale.get("model"),
            upscale_revision=upscale.get("revision"),
        )

    @property
    def needs_unpatched_base(self) -> bool:
        return self.base_switch < 1.0

    def check_model(self, model_cfg: Mapping) -> None:
        """A knob the base cannot honour is an error before any loading: the base-UNet tail needs a
        base that has an unpatched form (``model=fooocus``/``tiny_fooocus``: SDXL base + patch)."""
        if self.needs_unpatched_base and not model_cfg.get("patch_file"):
            raise DreamMixError(
                f"sampler.base_switch={self.base_switch} runs the last steps on the unpatched SDXL base, but "
                f"model={model_cfg.get('name')} has no unpatched base (use model=fooocus, or sampler.base_switch=1.0)",
                "sampler.base_switch",
            )


def _float(value: Any) -> Any:
    """Numbers as float; anything else unchanged so ``__post_init__`` names it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# ------------------------------------------------------------------------------------------------
# Step rules (the public code's, which Fooocus shares)
# ------------------------------------------------------------------------------------------------


def first_base_step(num_inference_steps: int, base_switch: float) -> int:
    """First step index run on the unpatched base. The code keeps the inpaint model for
    ``i <= int(T·fooocus_time)`` (Fooocus: refiner swapped in the callback after step
    ``int(T·0.8)``), so with T = 30 and 0.8 the base runs steps 25–29. ``T`` or more = never."""
    return int(math.floor(num_inference_steps * base_switch + 1e-9)) + 1


def size_scaled_step(i: int, num_inference_steps: int, end: float) -> bool:
    """Whether step ``i`` uses the scaled size conditioning: the code's ``i <= int(T·adm_scaler_end)``
    (steps 0–9 of 30 for 0.3); ``end = 0`` = never (Fooocus: ``t > 999·(1 − end)``)."""
    return end > 0 and i <= int(math.floor(num_inference_steps * end + 1e-9))


# ------------------------------------------------------------------------------------------------
# Noise levels of a diffusers scheduler at step i
# ------------------------------------------------------------------------------------------------


def ve_sigma(scheduler: Any, i: int, t: torch.Tensor | float) -> float:
    """σ of step ``i`` in the variance-exploding form ``x = x₀ + σ·ε`` (k-diffusion's, which Fooocus
    uses): the scheduler's own ``sigmas[i]`` where it keeps them (Euler, DPM-Solver, UniPC — Karras
    σs included), else ``sqrt((1 − ᾱ_t)/ᾱ_t)``."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > i:
        return float(sigmas[i])
    a = float(scheduler.alphas_cumprod[int(t)])
    return math.sqrt((1.0 - a) / a)


# ------------------------------------------------------------------------------------------------
# Sharpness (Fooocus's anisotropic guidance)
# ------------------------------------------------------------------------------------------------


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``F.pad(x, (pad,) * 4, mode="reflect")`` that also works when a side is not longer than
    ``pad`` (small latents of the tiny model, thin crops): the mirror repeats periodically, like
    ``numpy.pad(mode="reflect")``."""
    for dim in (2, 3):
        n = x.shape[dim]
        j = torch.arange(-pad, n + pad, device=x.device)
        if n == 1:
            idx = torch.zeros_like(j)
        else:
            m = j.remainder(2 * (n - 1))
            idx = torch.where(m < n, m, 2 * (n - 1) - m)
        x = x.index_select(dim, idx)
    return x


def bilateral_blur(x: torch.Tensor, guide: torch.Tensor, kernel_size: int = FILTER_KERNEL,
                   sigma_color: float = FILTER_SIGMA_COLOR, sigma_space: float = FILTER_SIGMA_SPACE) -> torch.Tensor:
    """Joint bilateral filter of ``x`` (B, C, H, W) guided by ``guide`` (B, C', H, W).

    ``out[p] = Σ_q w(p, q)·x[q] / Σ_q w(p, q)`` over the k×k window (reflect border), with
    ``w = G_space(q − p) · exp(−½ (Σ_c |g[q] − g[p]|)² / σ_color²)``, ``G_space`` the normalised
    separable Gaussian of σ_space (kornia's ``joint_bilateral_blur`` with L1 colour distance, as
    Fooocus uses it). Linear in ``x``.
    """
    pad = kernel_size // 2
    xp, gp = _reflect_pad(x, pad), _reflect_pad(guide, pad)
    ux = xp.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1).flatten(-2)  # B, C, H, W, k²
    ug = gp.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1).flatten(-2)
    distance = (ug - guide.unsqueeze(-1)).abs().sum(1, keepdim=True)
    color = torch.exp(-0.5 * distance.square() / sigma_color**2)
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    g1 = torch.exp(-offsets.square() / (2 * sigma_space**2))
    g1 = g1 / g1.sum()
    space = (g1[:, None] * g1[None, :]).flatten()
    weights = space * color
    return (ux * weights).sum(-1) / weights.sum(-1)


def anisotropic_filter(x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Fooocus's ``adaptive_anisotropic_filter``: the guide standardised per sample (mean 0,
    unbiased std + 1e-5), then :func:`bilateral_blur`."""
    std, mean = torch.std_mean(guide, dim=(1, 2, 3), keepdim=True)
    return bilateral_blur(x, (guide - mean) / (std + 1e-5))


def sharpness_weight(t: torch.Tensor | float, sharpness: float, num_train_timesteps: int = 1000) -> float:
    """``α = 0.001 · sharpness · (1 − t/999)``: zero at the noisiest step, growing as noise goes."""
    progress = 1.0 - float(t) / float(num_train_timesteps - 1)
    return 0.001 * sharpness * progress


def sharpen_noise_pred(eps: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float, sharpness: float,
                       num_train_timesteps: int = 1000) -> torch.Tensor:
    """Fooocus's sharpness on an ε-prediction: with x the VE latent and ``ε_k = x − x₀ = σ·ε``,
    Fooocus replaces the positive x₀ by ``x − (α·A(ε_k; x₀) + (1 − α)·ε_k)`` (A = :func:`anisotropic_filter`
    guided by x₀). A is linear in its input, so this is ``ε' = α·A(ε; x₀) + (1 − α)·ε``."""
    alpha = sharpness_weight(t, sharpness, num_train_timesteps)
    if alpha == 0.0:
        return eps
    e = eps.float()
    out = alpha * anisotropic_filter(e, x0.float()) + (1.0 - alpha) * e
    return out.to(eps.dtype)


# ------------------------------------------------------------------------------------------------
# Start latents: filled image plus noise
# ------------------------------------------------------------------------------------------------


def _box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(2r+1)² mean filter with edge replication (PIL's ``BoxBlur``), O(1) per pixel via cumsums."""
    if radius <= 0:
        return x
    k = 2 * radius + 1
    for dim in (2, 3):
        n = x.shape[dim]
        idx = torch.arange(-radius - 1, n + radius, device=x.device).clamp(0, n - 1)
        # n + k cells: a leading one (only ever subtracted), then the window's reach on both sides
        c = x.index_select(dim, idx).double().cumsum(dim)
        x = ((c.narrow(dim, k, n) - c.narrow(dim, 0, n)) / k).to(x.dtype)
    return x


def fill_hole(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fooocus's ``fooocus_fill``: the hole (``mask > 0.5``) filled by repeated box blurs, coarse to
    fine, with the known pixels put back after each blur, so the hole takes the surrounding colours.
    Radii are Fooocus's at 1024² scaled to the image's size. Known pixels are returned unchanged."""
    known = (mask < 0.5).expand_as(pixels)
    scale = math.sqrt(pixels.shape[-2] * pixels.shape[-1]) / 1024.0
    out = pixels.clone()
    for radius, repeats in FILL_SCHEDULE:
        r = max(1, int(round(radius * scale)))
        for _ in range(repeats):
            out = torch.where(known, pixels, _box_blur(out, r))
    return out


def fill_noise_latents(scheduler: Any, noise: torch.Tensor, fill_latents: torch.Tensor, t0: torch.Tensor | float) -> torch.Tensor:
    """The start latent ``x_T`` from the filled image's latent ``z`` instead of pure noise.

    The code (ComfyUI's full-denoise ``noise_scaling``) starts at ``x = z + sqrt(1 + σ₀²)·n`` in the
    VE form, i.e. ``α₀·z + n`` with ``α₀ = 1/sqrt(1 + σ₀²)`` after the model-input scaling: the
    usual unit noise plus the image at the first step's signal level (diffusers' ``strength=1``
    ignores the image: ``n·init_noise_sigma``). In the scheduler's own units that is
    ``init_noise_sigma · (n + α₀·z)``.
    """
    sigma0 = ve_sigma(scheduler, 0, t0)
    alpha0 = 1.0 / math.sqrt(1.0 + sigma0**2)
    return (noise + alpha0 * fill_latents.to(noise.dtype)) * scheduler.init_noise_sigma


# ------------------------------------------------------------------------------------------------
# TAS words in context
# ------------------------------------------------------------------------------------------------


def context_text(context: str | None, words: str) -> str:
    return words if not context else f"{context.strip()} {words}"


def context_token_span(tokenizer: Any, context: str | None, words: str) -> tuple[int, int]:
    """``(start, count)`` of the words' tokens in the encoder output of :func:`context_text`:
    BOS, then the context's tokens, then the words'. Counted on the joined text itself, so a
    tokenizer that merges across the space would still be right."""
    from dreammix.tas import count_text_tokens

    total = count_text_tokens(tokenizer, context_text(context, words))
    before = count_text_tokens(tokenizer, context.strip()) if context else 0
    return 1 + before, max(0, total - before)


# ------------------------------------------------------------------------------------------------
# The unpatched-base tail (Fooocus's inpaint "switch")
# ------------------------------------------------------------------------------------------------


class BaseTail:
    """Run the UNet as the unpatched SDXL base from step ``first`` on, in place.

    Entering subtracts the Fooocus patch's deltas from the UNet's weights (read back, still
    quantized, from the patch file that built it), switches the inpaint head off (the base's own
    4-channel ``conv_in`` only, like Fooocus's refiner, which has no head) and disables the peft
    adapters. Leaving restores the patched weights *bit-exactly*: where re-adding a delta in the
    weight's dtype does not land on the old value (none in float32; in bf16 a few % of the
    weights, where the base's exponent is larger than the patched weight's and no base value
    rounds back), that value is kept, sparse, in CPU memory. No second UNet exists at any time.
    """

    def __init__(self, unet: torch.nn.Module, first: int):
        from dreammix.models.fooocus import is_fooocus_unet

        if not is_fooocus_unet(unet) or getattr(unet, "_dreammix_fooocus_patch_file", None) is None:
            raise DreamMixError(
                "the unpatched-base tail needs a UNet built by model=fooocus (SDXL base + Fooocus patch)",
                "sampler.base_switch",
            )
        self.unet, self.first, self.active = unet, first, False
        self._fixups: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._adapters_were_enabled = False

    def before_step(self, i: int) -> None:
        if not self.active and i >= self.first:
            self._enter()

    def _deltas(self):
        from dreammix.models.fooocus import _patchable_parameters, fooocus_patch_deltas

        params = _patchable_parameters(self.unet)
        device = next(iter(params.values())).device
        for key, delta in fooocus_patch_deltas(self.unet, device):
            yield key, params[key], delta

    @torch.no_grad()
    def _enter(self) -> None:
        for key, param, delta in self._deltas():
            w = param.data
            d = delta.to(device=w.device, dtype=torch.float32)
            base = (w.float() - d).to(w.dtype)
            back = (base.float() + d).to(w.dtype)
            wrong = (back != w).flatten().nonzero().squeeze(1)
            if wrong.numel():
                index = wrong.to(torch.int32) if w.numel() < 2**31 else wrong
                self._fixups[key] = (index.cpu(), w.flatten()[wrong].cpu())
            w.copy_(base)
        self.unet.conv_in.head_enabled = False
        if getattr(self.unet, "peft_config", None):
            self.unet.disable_adapters()
            self._adapters_were_enabled = True
        self.active = True

    @torch.no_grad()
    def close(self) -> None:
        if not self.active:
            return
        for key, param, delta in self._deltas():
            w = param.data
            w.copy_((w.float() + delta.to(device=w.device, dtype=torch.float32)).to(w.dtype))
            if key in self._fixups:
                index, values = self._fixups[key]
                w.view(-1)[index.to(device=w.device, dtype=torch.long)] = values.to(w.device)
        self._fixups.clear()
        self.unet.conv_in.head_enabled = True
        if self._adapters_were_enabled:
            self.unet.enable_adapters()
        self.active = False


# ------------------------------------------------------------------------------------------------
# Small-crop upscaling before LCG
# ------------------------------------------------------------------------------------------------


def needs_upscale(width: int, height: int, resolution: int) -> bool:
    """Fooocus's rule: upscale when the crop's side, ``sqrt(w·h)`` rounded *up* to 1/16 of the
    model resolution (64 px at 1024), is below the resolution."""
    step = resolution / 16.0
    return math.ceil(math.sqrt(width * height) / step) * step < resolution


class CropUpscaler:
    """A transformers Swin2SR super-resolution model (``from_pretrained``: hub id or folder)."""

    def __init__(self, model: Any, processor: Any):
        self.model, self.processor = model.eval(), processor
        self.scale = int(model.config.upscale)

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        w, h = image.size
        device, dtype = next(self.model.parameters()).device, next(self.model.parameters()).dtype
        inputs = self.processor(image.convert("RGB"), return_tensors="pt")["pixel_values"].to(device, dtype)
        out = self.model(pixel_values=inputs).reconstruction[0, :, : h * self.scale, : w * self.scale]
        arr = (out.float().clamp(0, 1) * 255.0 + 0.5).floor().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return PIL.Image.fromarray(np.ascontiguousarray(arr))


def load_crop_upscaler(model_id: str, revision: str | None = None, device: Any = "cpu",
                       dtype: torch.dtype = torch.float32) -> CropUpscaler | None:
    """The upscaler, or ``None`` with a warning when its weights cannot be had (optional knob:
    the crop is then resized plainly, as without it)."""
    from pathlib import Path

    from transformers import Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    from dreammix.models.loading import _looks_like_path

    try:
        if _looks_like_path(model_id) and not Path(model_id).expanduser().is_dir():
            raise OSError("folder not found")
        model = Swin2SRForImageSuperResolution.from_pretrained(str(Path(model_id).expanduser()) if _looks_like_path(model_id) else model_id, revision=revision)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("sampler.upscale.model=%s not available (%s): small LCG crops are resized without it", model_id, first)
        return None
    try:
        processor = Swin2SRImageProcessor.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError):
        processor = Swin2SRImageProcessor()
    return CropUpscaler(model.to(device=device, dtype=dtype), processor)


def crop_upscaler(pipe: Any, spec: SamplerSpec) -> CropUpscaler | None:
    """The pipeline's upscaler for ``spec`` (loaded once per model id, cached on the pipeline)."""
    if not spec.upscale_model:
        return None
    cache = pipe.__dict__.setdefault("_dreammix_upscalers", {})
    key = (spec.upscale_model, spec.upscale_revision)
    if key not in cache:
        cache[key] = load_crop_upscaler(spec.upscale_model, spec.upscale_revision, pipe._execution_device)
    return cache[key]
