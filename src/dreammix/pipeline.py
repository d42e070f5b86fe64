"""DreamMixInpaintPipeline: disentangled inpainting (LCG → GCH, paper §3.2, Eq. 3–6) with TAS (§3.4).

A subclass of diffusers' ``StableDiffusionXLInpaintPipeline``: it reuses its components,
``from_pretrained``/``from_pipe``, LoRA loading, ``encode_prompt``, ``_get_add_time_ids``,
``prepare_mask_latents``, ``prepare_extra_step_kwargs`` and image processors, and replaces only
``__call__`` (and ``check_inputs``, which raises :class:`DreamMixError`).

One denoising schedule of T steps is split at ``k = round(λ·T)`` (DESIGN.md §3):

1. **LCG** (steps ``0 … k-1``): the enlarged square crop m' (:func:`dreammix.crop.lcg_crop_box`) is
   resized to the model resolution, encoded (Eq. 3) and denoised from pure noise (strength 1) with
   the blend of Eq. 5 — outside the crop-mapped mask the latent is replaced by the crop's own
   latent noised to the current level. At the switch, the step's x₀ prediction (blended with the
   clean crop latent, Eq. 5 at t = 0) is decoded and pasted through the feathered mask into the
   input → x^G.
2. **GCH** (steps ``k … T-1``): x^G at its own aspect ratio and the model's area is encoded,
   noised to the level of step k with fresh noise (the schedule continues; the solver's history is
   reset since the latent changed space), and denoised with the blend of Eq. 6 against the
   user mask m. λ = 0 is plain SDXL inpainting of the whole image; λ = 1 is LCG alone.
3. The final image is the input outside the feathered mask and the generated pixels inside, at the
   input's size: pixels farther than ``2·feather_radius`` from the mask are bit-identical to it.

Cost equals diffusers' pipeline at the same T: one UNet call (batched CFG) per step in total,
one text-encoder call each (the prompt and TAS's eliminated words share a batch), VAE work only at
the stage start (masked image + blending target, one encoder call below 1024²), switch and end, no
host↔device copies in the loop beyond what the scheduler itself does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    rescale_noise_cfg,
    retrieve_latents,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from dreammix.crop import Box, composite, feather, lcg_crop_box, paste, processing_size, resize_mask
from dreammix.errors import DreamMixError
from dreammix.losses import latent_mask
from dreammix.pipeline_inputs import STAGES, _as_binary_mask, _as_rgb_array, _resize, split_steps
from dreammix import sampling
from dreammix.sampling import SamplerSpec
from dreammix.tas import (
    IDENTIFIER,
    check_identifier,
    clean_eliminate_words,
    count_text_tokens,
    decompose_prompt_embeds,
)

LORA_ADAPTER = "subject"
# Pixels per VAE encoder call. Below it, the masked image and the blending target share one call
# (per-call overhead dominates small images); at SDXL's 1024² each image gets its own call: the fp32
# encoder's activations for one 1024² image are ~2.5 GiB, two in one call ~5 GiB, which would lift
# the inference peak past 10 GB for no gain on a GPU that one image already fills
# (``python -m dreammix.perf --model sdxl_arch --sdxl-costs``).
VAE_ENCODE_PIXELS_PER_CALL = 1024 * 1024


@dataclass
class DreamMixPipelineOutput(BaseOutput):
    """``images``: final images at the input's size as ``output_type`` asked (PIL list, np/pt arrays,
    or final-stage latents for ``"latent"``);
    ``lcg_images``: x^G, the LCG result pasted into the input (None when λ = 0);
    ``crop_box``: m' as ``(left, top, right, bottom)`` (None when λ = 0); ``lcg_steps``: k."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    lcg_images: list[PIL.Image.Image] | None
    crop_box: tuple[int, int, int, int] | None
    lcg_steps: int


@dataclass
class _Cond:
    """Text conditioning of one stage, already CFG-batched and on the device."""

    embeds: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class PromptConditions:
    """Text conditioning encoded ahead of the calls that use it
    (:meth:`DreamMixInpaintPipeline.encode_conditions`): a caller with many images per prompt (the
    benchmark) encodes each prompt once and can take the text encoders off the GPU meanwhile.
    ``key`` records what it was encoded from, so a call for another prompt refuses it."""

    key: tuple
    stages: dict[str, _Cond]


def _conditions_key(prompt, negative_prompt, eliminate, tas_stages, num_images: int, guided: bool, tas_context=None) -> tuple:
    return (prompt, negative_prompt, tuple(eliminate), tuple(tas_stages), num_images, guided, tas_context)


@contextlib.contextmanager
def text_encoders_parked(pipe, enabled: bool = True):
    """Text encoders in CPU memory for the block when the pipeline runs on a GPU (their outputs
    were encoded ahead), back on the GPU afterwards: the benchmark chain reuses the pipeline."""
    encoders = [te for te in (pipe.text_encoder, pipe.text_encoder_2) if te is not None]
    devices = [te.device for te in encoders]
    park = enabled and any(d.type == "cuda" for d in devices)
    if park:
        for te in encoders:
            te.to("cpu")
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if park:
            for te, device in zip(encoders, devices):
                te.to(device)


class UnsupportedArgument(DreamMixError, ValueError):
    """An argument of ``StableDiffusionXLInpaintPipeline.__call__`` that DIF cannot honour: a
    ``ValueError`` for diffusers users, a one-line :class:`DreamMixError` for the CLI."""


#: Tensors a ``callback_on_step_end`` may ask for (``callback_on_step_end_tensor_inputs``), under
#: diffusers' SDXL names, so its callbacks (e.g. ``SDXLCFGCutoffCallback``) work unchanged.
CALLBACK_TENSOR_INPUTS = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents"]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _to_output_type(images: list[PIL.Image.Image], output_type: str):
    """diffusers' conventions: ``np`` = float32 [N, H, W, 3] in [0, 1], ``pt`` = float32 [N, 3, H, W]
    in [0, 1]; both are the PIL images' pixels / 255 (the final composite is 8-bit by construction)."""
    if output_type == "pil":
        return images
    arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return arrays if output_type == "np" else torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


class DreamMixInpaintPipeline(StableDiffusionXLInpaintPipeline):
    """Subject-driven SDXL inpainting with DIF (LCG → GCH) and TAS; see the module docstring."""

    _callback_tensor_inputs = CALLBACK_TENSOR_INPUTS

    @classmethod
    def from_base(cls, pipe: StableDiffusionXLInpaintPipeline) -> "DreamMixInpaintPipeline":
        """Wrap an already loaded SDXL inpainting pipeline, sharing its modules as they are.

        (diffusers' ``from_pipe`` casts every module to float32 unless told otherwise, which would
        undo bf16 weights on the GPU.) No invisible watermark: it would alter the pixels that the
        final composite promises to keep.
        """
        new = cls(
            **{k: v for k, v in pipe.components.items()},
            requires_aesthetics_score=pipe.config.requires_aesthetics_score,
            force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        name = getattr(pipe.config, "_name_or_path", None)
        if name:
            new.register_to_config(_name_or_path=name)
        return new

    # ------------------------------------------------------------------ LoRA (one UNet, peft adapter)
    def load_subject_lora(self, path: str | Path, scale: float = 1.0, adapter_name: str = LORA_ADAPTER) -> None:
        """Load a trained subject LoRA (a folder written by ``dreammix.models.lora.save_lora``) as a
        peft adapter on the one UNet; code that needs the base model uses :meth:`adapter_disabled`."""
        from dreammix.models.lora import LORA_WEIGHTS_NAME

        path = Path(path).expanduser()
        if not path.is_dir():
            raise DreamMixError("LoRA folder not found", str(path))
        if not (path / LORA_WEIGHTS_NAME).is_file():
            raise DreamMixError(f"LoRA folder has no {LORA_WEIGHTS_NAME}", str(path))
        from dreammix.validation import check_lora_file

        check_lora_file(path / LORA_WEIGHTS_NAME, str(path))  # unreadable or NaN weights: refused
        try:
            self.load_lora_weights(str(path), adapter_name=adapter_name)
        # RuntimeError: a LoRA of another base (size mismatch); IndexError / TypeError / AttributeError:
        # diffusers' converters on malformed files (a lora_A without its lora_B, 1-d "matrices")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, OSError, RuntimeError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            if isinstance(exc, (IndexError, TypeError, AttributeError)):
                message = f"malformed LoRA weights ({exc.__class__.__name__}: {message})"
            if "size mismatch" in str(exc):
                message = "its tensor shapes do not fit this base model (a LoRA trained on another model?)"
            raise DreamMixError(f"cannot load LoRA: {message}", str(path)) from exc
        self.set_adapters([adapter_name], adapter_weights=[scale])

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the base (un-adapted) UNet inside the block by toggling the peft adapters — never a
        second UNet copy (DESIGN.md §6)."""
        has_adapters = bool(getattr(self.unet, "peft_config", None))
        if has_adapters:
            self.unet.disable_adapters()
        try:
            yield
        finally:
            if has_adapters:
                self.unet.enable_adapters()

    # ------------------------------------------------------------------ inputs
    def check_inputs(  # noqa: D417 - different contract from the parent's
        self,
        image: np.ndarray,
        mask: np.ndarray,
        prompt: Any,
        num_inference_steps: int,
        guidance_scale: float,
        lambda_: float,
        num_images_per_prompt: int,
        output_type: str,
        eliminate: list[str],
        tas_stages: Sequence[str],
        identifier: str,
        generator: Any,
        feather_radius: int | None,
    ) -> None:
        """Raise :class:`DreamMixError` (one line, naming the argument) on any bad input."""
        self._check_text_inputs(prompt, eliminate, tas_stages, identifier)
        if mask.shape != image.shape[:2]:
            raise DreamMixError(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]} "
                "(resize it, or load it with dreammix.data.images.load_mask(path, size=image.size))",
                "mask_image",
            )
        if not mask.any():
            raise DreamMixError("mask is empty: no pixel is marked to fill (1 = fill, 0 = keep)", "mask_image")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise DreamMixError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}", "steps")
        if not 0.0 <= float(lambda_) <= 1.0:
            raise DreamMixError(f"lambda must be in [0, 1], got {lambda_}", "dif.lambda_")
        if guidance_scale < 0:
            raise DreamMixError(f"guidance_scale must be >= 0, got {guidance_scale}", "guidance_scale")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise DreamMixError(f"num_images must be a positive integer, got {num_images_per_prompt!r}", "num_images")
        if output_type not in OUTPUT_TYPES:
            raise UnsupportedArgument(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}", "output_type")
        if isinstance(generator, list) and len(generator) != num_images_per_prompt:
            raise DreamMixError(
                f"{len(generator)} generators for {num_images_per_prompt} images", "generator"
            )
        if feather_radius is not None and feather_radius < 0:
            raise DreamMixError(f"feather_radius must be >= 0, got {feather_radius}", "dif.feather_radius")
        if getattr(self.scheduler, "order", 1) != 1:
            raise DreamMixError(
                f"{self.scheduler.__class__.__name__} is a second-order scheduler; DIF splits the schedule "
                "between steps, use a first-order or multistep one (euler, ddim, dpmpp_2m, unipc)",
                "scheduler",
            )

    @staticmethod
    def _check_text_inputs(prompt: Any, eliminate: list[str], tas_stages: Sequence[str], identifier: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise DreamMixError("prompt must be a non-empty string", "prompt")
        bad = [s for s in tas_stages if s not in STAGES]
        if bad:
            raise DreamMixError(f"TAS stages must be among {list(STAGES)}, got {bad}", "tas.stages")
        if eliminate:
            check_identifier(prompt, identifier)

    # ------------------------------------------------------------------ text conditioning
    def encode_conditions(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        eliminate: Sequence[str] | None = None,
        tas_stages: Sequence[str] = STAGES,
        identifier: str = IDENTIFIER,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        tas_context: str | None = None,
    ) -> PromptConditions:
        """The prompt's text conditioning (+ TAS, Eq. 9) for later calls with ``conditions=``;
        the arguments mean what they mean in :meth:`__call__` and must match the call's
        (``tas_context``: the call's ``sampler.tas_context``)."""
        eliminate = clean_eliminate_words(eliminate, identifier)
        tas_stages = tuple(tas_stages or ())
        self._check_text_inputs(prompt, eliminate, tas_stages, identifier)
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._clip_skip = None
        stages = self._encode_conditions(
            prompt, negative_prompt, eliminate, tas_stages, num_images_per_prompt, self._execution_device, self.unet.dtype,
            tas_context,
        )
        key = _conditions_key(
            prompt, negative_prompt, eliminate, tas_stages, num_images_per_prompt, self.do_classifier_free_guidance, tas_context
        )
        return PromptConditions(key, stages)

    # ------------------------------------------------------------------ helpers
    def _size_multiple(self) -> int:
        """Pixel multiple the UNet can down-sample without padding: VAE factor × 2^(levels − 1)."""
        levels = len(self.unet.config.block_out_channels)
        return self.vae_scale_factor * 2 ** (levels - 1)

    def _vae_encode(self, pixels: torch.Tensor, generator: Any, sample: bool, dtype: torch.dtype) -> torch.Tensor:
        """Scaled VAE latents of ``pixels`` in [-1, 1]. ``sample=True`` draws from the posterior
        with ``generator`` like diffusers' ``_encode_vae_image`` (same random stream, so λ = 0 runs
        match diffusers' pipeline); ``sample=False`` takes its mean (no randomness), used for the
        blending targets z^L, z^G."""
        x = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        mode = "sample" if sample else "argmax"
        if sample and isinstance(generator, list):
            latents = torch.cat(
                [retrieve_latents(self.vae.encode(x[i : i + 1]), generator=generator[i], sample_mode=mode) for i in range(x.shape[0])]
            )
        else:
            latents = retrieve_latents(self.vae.encode(x), generator=generator, sample_mode=mode)
        return (self.vae.config.scaling_factor * latents).to(dtype)

    def _vae_encode_masked_and_clean(
        self, masked: torch.Tensor, pixels: torch.Tensor, generator: Any, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_vae_encode` of ``masked`` (posterior sample) and of ``pixels`` (mean) in as few
        encoder calls as ``VAE_ENCODE_PIXELS_PER_CALL`` allows (one for small images). Only the
        masked half is sampled, drawing exactly the noise that ``retrieve_latents(vae.encode(masked),
        generator)`` draws (same shape, generator(s), device and dtype as
        ``DiagonalGaussianDistribution.sample``), so the random stream is unchanged."""
        b = masked.shape[0]
        x = torch.cat([masked, pixels]).to(device=self.vae.device, dtype=self.vae.dtype)
        per_call = max(1, VAE_ENCODE_PIXELS_PER_CALL // (x.shape[-2] * x.shape[-1]))
        dists = [getattr(self.vae.encode(chunk), "latent_dist", None) for chunk in x.split(per_call)]
        if not all(isinstance(d, DiagonalGaussianDistribution) for d in dists):  # other posteriors: plain calls
            return (
                self._vae_encode(masked, generator, sample=True, dtype=dtype),
                self._vae_encode(pixels, None, sample=False, dtype=dtype),
            )
        dist = dists[0] if len(dists) == 1 else DiagonalGaussianDistribution(torch.cat([d.parameters for d in dists]))
        mean, std, params = dist.mean, dist.std, dist.parameters
        if isinstance(generator, list):
            eps = torch.cat(
                [randn_tensor(mean[i : i + 1].shape, generator=generator[i], device=params.device, dtype=params.dtype) for i in range(b)]
            )
        else:
            eps = randn_tensor(mean[:b].shape, generator=generator, device=params.device, dtype=params.dtype)
        sampled = mean[:b] + std[:b] * eps
        scale = self.vae.config.scaling_factor
        return (scale * sampled).to(dtype), (scale * mean[b:]).to(dtype)

    def _vae_decode(self, latents: torch.Tensor) -> list[PIL.Image.Image]:
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        if not bool(torch.isfinite(x).all()):  # PIL conversion would turn NaN into black pixels, silently
            raise DreamMixError("the model produced NaN/infinite pixels (a diverged LoRA, lora_scale or guidance?)", "output")
        return self.image_processor.postprocess(x, output_type="pil")

    def _predict_x0(self, step_output: Any, scaled_input: torch.Tensor, noise_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x₀ at the LCG → GCH switch: the scheduler's own prediction when it reports one (Euler,
        DDIM, …), else from the VP-scaled model input: ε-, v- or sample-prediction, at the noise
        level the step used: the scheduler's own σ where it keeps one (DPM-Solver, UniPC; Karras σs
        lie between the integer timesteps, where ᾱ[t] is off), else ᾱ[t]."""
        x0 = getattr(step_output, "pred_original_sample", None)
        if x0 is not None:
            return x0
        scheduler = self.scheduler
        index = getattr(scheduler, "step_index", None)
        if index is not None and hasattr(scheduler, "sigmas") and hasattr(scheduler, "_sigma_to_alpha_sigma_t"):
            # step() has advanced the index: this step's σ is the previous entry
            alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[index - 1])
        else:
            a = scheduler.alphas_cumprod[int(t)]
            alpha, sigma = a.sqrt(), (1 - a).sqrt()
        alpha = torch.as_tensor(alpha, device=scaled_input.device, dtype=torch.float32)
        sigma = torch.as_tensor(sigma, device=scaled_input.device, dtype=torch.float32)
        x, pred = scaled_input.float(), noise_pred.float()
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            x0 = (x - sigma * pred) / alpha
        elif kind == "v_prediction":
            x0 = alpha * x - sigma * pred
        else:
            x0 = pred
        return x0.to(scaled_input.dtype)

    def _encode_conditions(
        self,
        prompt: str,
        negative_prompt: str | None,
        eliminate: list[str],
        tas_stages: Sequence[str],
        num_images: int,
        device: torch.device,
        dtype: torch.dtype,
        tas_context: str | None = None,
    ) -> dict[str, _Cond]:
        """Encode the prompt once; TAS (Eq. 9) makes the decomposed variant for the stages that use it.
        With ``tas_context`` the words are encoded inside ``"<context> <words>"`` and their
        contextual token embeddings are the directions (the public code's ``decompose_prefix_prompt``)."""
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        text = sampling.context_text(tas_context, " ".join(eliminate)) if eliminate and tas_stages else None
        # the eliminated words ride in the same text-encoder batch as the prompt (CLIP's causal
        # mask and fixed 77-token padding keep every row independent of the others)
        pe, npe, pooled, npooled = self.encode_prompt(
            prompt=prompt if text is None else [prompt, text],
            device=device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            lora_scale=lora_scale,
        )
        if text is not None:  # rows: [prompt] * n + [eliminated words] * n
            epe, epooled = pe[num_images : num_images + 1], pooled[num_images : num_images + 1]
            pe, pooled = pe[:num_images], pooled[:num_images]
            if npe is not None:
                npe, npooled = npe[:num_images], npooled[:num_images]
        variants = {"raw": (pe, pooled)}
        if text is not None:
            tokenizer = self.tokenizer if self.tokenizer is not None else self.tokenizer_2
            start, count = sampling.context_token_span(tokenizer, tas_context, " ".join(eliminate))
            variants["tas"] = decompose_prompt_embeds(
                pe, pooled, epe, epooled, count_text_tokens(tokenizer, prompt), count, eliminate_start=start
            )

        def batched(key: str) -> _Cond:
            embeds, pool = variants[key]
            if self.do_classifier_free_guidance:
                embeds, pool = torch.cat([npe, embeds]), torch.cat([npooled, pool])
            return _Cond(embeds.to(device, dtype), pool.to(device, dtype))

        conds = {stage: batched("tas" if stage in tas_stages and "tas" in variants else "raw") for stage in STAGES}
        return conds

    def _time_ids(self, size: tuple[int, int], pooled_dim: int, num_images: int, device, dtype,
                  scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """SDXL's size conditioning; ``scale`` = (positive, negative) factors on the original size
        (``sampler.size_scale``, Fooocus's ADM scaler)."""
        w, h = size
        sp, sn = scale
        add, neg = self._get_add_time_ids(
            (h * sp, w * sp), (0, 0), (h, w), 6.0, 2.5, (h * sn, w * sn), (0, 0), (h, w), dtype=dtype,
            text_encoder_projection_dim=pooled_dim,
        )
        add = add.repeat(num_images, 1)
        if self.do_classifier_free_guidance:
            add = torch.cat([neg.repeat(num_images, 1), add])
        return add.to(device)

    def _reset_schedule(self, num_inference_steps: int, start: int, device) -> torch.Tensor:
        """The same T-step schedule for both stages; ``start`` positions the scheduler at step k.
        Re-setting clears multistep solvers' history, which belongs to the previous stage's latent."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps

    def _sharpen(self, noise_pred: torch.Tensor, scaled: torch.Tensor, i: int, t: torch.Tensor, sharpness: float,
                 cfg: bool) -> torch.Tensor:
        """``sampler.sharpness`` on the positive (text) half of the ε-prediction, guided by its x₀
        (:func:`dreammix.sampling.sharpen_noise_pred`); ``scaled`` is the VP model input x·α."""
        if self.scheduler.config.prediction_type != "epsilon":
            raise DreamMixError("sharpness needs an epsilon-prediction model", "sampler.sharpness")
        sigma = sampling.ve_sigma(self.scheduler, i, t)
        alpha = 1.0 / math.sqrt(1.0 + sigma**2)
        n = scaled.shape[0]
        text = noise_pred[n:] if cfg else noise_pred
        x0 = (scaled.float() / alpha) - sigma * text.float()
        text = sampling.sharpen_noise_pred(text, x0, t, sharpness, self.scheduler.config.num_train_timesteps)
        return torch.cat([noise_pred[:n], text]) if cfg else text

    def _denoise_stage(
        self,
        *,
        stage: str,
        images: list[PIL.Image.Image],
        mask: np.ndarray,
        size: tuple[int, int],
        start: int,
        stop: int,
        num_inference_steps: int,
        num_images: int,
        generator: Any,
        cond: _Cond,
        blend: bool,
        device: torch.device,
        dtype: torch.dtype,
        eta: float,
        callback_on_step_end: Callable | None,
        progress_bar: Any,
        callback_tensor_inputs: Sequence[str] = ("latents",),
        sampler: SamplerSpec = SamplerSpec(),
        tail: sampling.BaseTail | None = None,
    ) -> torch.Tensor:
        """Denoise ``images`` (1 shared or ``num_images``) at ``size`` over steps ``[start, stop)``.

        Returns the final latents when the stage ends the schedule, else the blended x₀
        prediction of its last step (what the next stage is built from).
        """
        w, h = size
        if not self.do_classifier_free_guidance and cond.embeds.shape[0] == 2 * num_images:
            cond = _Cond(cond.embeds[num_images:], cond.pooled[num_images:])  # a callback switched CFG off
        timesteps = self._reset_schedule(num_inference_steps, start, device)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # a. image, pixel mask and latent mask (max-pool: the object is never under-covered, DESIGN §3)
        pixels = self.image_processor.preprocess(images, height=h, width=w).to(device=device, dtype=torch.float32)
        pmask = torch.from_numpy(mask).to(device=device, dtype=torch.float32)[None, None]
        lmask = latent_mask(pmask, self.vae_scale_factor).to(dtype)

        # b. noise first, then the masked image posterior sample (diffusers' random order)
        shape = (num_images, self.vae.config.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        # c. with the blending target z^L / z^G (Eq. 3, posterior mean) when the stage needs it:
        #    both images in one encoder call where they are small (VAE_ENCODE_PIXELS_PER_CALL)
        masked = pixels * (pmask < 0.5)
        image_latents = None
        if blend or start > 0:
            masked_latents, image_latents = self._vae_encode_masked_and_clean(masked, pixels, generator, dtype)
            if image_latents.shape[0] != num_images:
                image_latents = image_latents.repeat(num_images // image_latents.shape[0], 1, 1, 1)
        else:
            masked_latents = self._vae_encode(masked, generator, sample=True, dtype=dtype)
        if masked_latents.shape[0] != num_images:
            masked_latents = masked_latents.repeat(num_images // masked_latents.shape[0], 1, 1, 1)
        mask_c, masked_c = self.prepare_mask_latents(
            lmask, masked_latents, num_images, h, w, dtype, device, generator, self.do_classifier_free_guidance
        )

        # d. the start latent: pure noise at step 0 (strength 1; or the filled image plus noise,
        #    sampler.start=fill_noise), else the stage image noised to step k's level (schedule continues)
        if start == 0 and sampler.start == "fill_noise":
            filled = sampling.fill_hole(pixels, pmask)
            fill_latents = self._vae_encode(filled, None, sample=False, dtype=dtype)
            latents = sampling.fill_noise_latents(self.scheduler, noise, fill_latents, timesteps[0])
        elif start == 0:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(image_latents, noise, timesteps[start : start + 1])

        time_ids = self._time_ids(size, cond.pooled.shape[-1], num_images, device, dtype)
        added_cond = {"text_embeds": cond.pooled, "time_ids": time_ids}
        scaled_cond = {"text_embeds": cond.pooled, "time_ids": self._time_ids(
            size, cond.pooled.shape[-1], num_images, device, dtype, (sampler.size_positive, sampler.size_negative)
        )}  # fmt: skip
        nine_channels = self.unet.config.in_channels == 9
        # the latent mask is binary, so Eq. 5/6's (1 − m)·target + m·latents is a select (one op)
        inside = lmask > 0.5
        # loop invariants read once, not per step (CFG on/off is fixed by the batched embeddings;
        # the guidance scale itself is read per step, as in diffusers, for callbacks that change it)
        scheduler, unet = self.scheduler, self.unet
        cfg, cross_attention_kwargs = self.do_classifier_free_guidance, self.cross_attention_kwargs

        result = latents
        for i in range(start, stop):
            t = timesteps[i]
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            scaled = model_input[:num_images]
            if nine_channels:
                model_input = torch.cat([model_input, mask_c, masked_c], dim=1)
            if tail is not None:
                tail.before_step(i)
            noise_pred = unet(
                model_input,
                t,
                encoder_hidden_states=cond.embeds,
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=scaled_cond if sampling.size_scaled_step(i, num_inference_steps, sampler.size_end) else added_cond,
                return_dict=False,
            )[0]
            if sampler.sharpness > 0:
                noise_pred = self._sharpen(noise_pred, scaled, i, t, sampler.sharpness, cfg)
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + self.guidance_scale * (text - uncond)
                if self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale=self.guidance_rescale)
            out = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=True)
            latents = out.prev_sample.to(dtype)

            if i == stop - 1 and stop < num_inference_steps:
                # switch: x₀ of this step, Eq. 5 at t = 0 (clean latent outside the mask)
                x0 = self._predict_x0(out, scaled, noise_pred, t).to(dtype)
                result = torch.where(inside, x0, image_latents) if blend else x0
            elif blend:
                # Eq. 5 (LCG) / Eq. 6 (GCH): known region = stage image noised to the next level
                if i + 1 < num_inference_steps:
                    target = scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                else:
                    target = image_latents
                latents = torch.where(inside, latents, target)

            if callback_on_step_end is not None:
                tensors = {"latents": latents, "prompt_embeds": cond.embeds, "add_text_embeds": cond.pooled,
                           "add_time_ids": time_ids, "mask": mask_c, "masked_image_latents": masked_c}
                outputs = callback_on_step_end(self, i, t, {"stage": stage, **{k: tensors[k] for k in callback_tensor_inputs}}) or {}
                latents = outputs.pop("latents", latents)
                cond = _Cond(outputs.pop("prompt_embeds", cond.embeds), outputs.pop("add_text_embeds", cond.pooled))
                time_ids = outputs.pop("add_time_ids", time_ids)
                added_cond = {"text_embeds": cond.pooled, "time_ids": time_ids}
                scaled_cond = {"text_embeds": cond.pooled, "time_ids": scaled_cond["time_ids"][-time_ids.shape[0]:]}
                mask_c, masked_c = outputs.pop("mask", mask_c), outputs.pop("masked_image_latents", masked_c)
                if cfg and not self.do_classifier_free_guidance:  # e.g. SDXLCFGCutoffCallback: conditional half only
                    cfg = False
                    mask_c, masked_c = mask_c[-num_images:], masked_c[-num_images:]
            progress_bar.update()
        if stop == num_inference_steps:
            result = latents
        return result

    # ------------------------------------------------------------------ main entry
    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | np.ndarray | list,
        mask_image: PIL.Image.Image | np.ndarray | list,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        lambda_: float = 0.7,
        eliminate: Sequence[str] | None = None,
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
        cross_attention_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        conditions: PromptConditions | None = None,
        strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        sampler: SamplerSpec | None = None,
        **unsupported: Any,
    ) -> DreamMixPipelineOutput | tuple:
        """Inpaint ``mask_image`` (1 = fill) of ``image`` following ``prompt``.

        Args:
            lambda_: share of the T steps run as LCG (first ``round(λ·T)`` steps); 1 = LCG only,
                0 = GCH only (plain SDXL inpainting of the whole image).
            eliminate: attribute words whose direction TAS removes from the prompt (Eq. 9); the
                prompt must then contain ``identifier``. Empty/None = no TAS.
            tas_stages: where the decomposed embedding is used: ``("local", "global")`` (paper) or
                ``("local",)`` (public reference code).
            resolution: model side in pixels (default: the UNet's sample size × VAE factor).
            crop_scale, min_crop_frac: the LCG crop m' (see :func:`dreammix.crop.lcg_crop_box`).
            blend: latent blending of Eq. 5/6 (off = the model's own inpainting, diffusers' behaviour).
            feather_radius: pixels of the paste feathering at the input's size (default: half a
                latent cell, ``vae_scale_factor/2 × input/processing size``).
            output_type: ``"pil"`` or ``"latent"`` (final stage latents, for tests/chaining).
            conditions: the text conditioning from :meth:`encode_conditions` for this call's prompt,
                negative prompt, eliminate, tas_stages, guidance and image count (no text encoder
                runs in the call; anything else is refused).
            sampler: the public code's sampling knobs (:class:`dreammix.sampling.SamplerSpec`;
                None = the paper text: none of them).

        diffusers' ``StableDiffusionXLInpaintPipeline.__call__`` conventions, where DIF can honour them:
        ``prompt`` may be a list (``image``/``mask_image`` one per prompt, or one shared by all; the
        outputs are in prompt order, ``num_images_per_prompt`` each); ``output_type`` pil / np / pt /
        latent; ``callback_on_step_end`` may be a diffusers ``PipelineCallback`` (its
        ``tensor_inputs``) or a function with ``callback_on_step_end_tensor_inputs`` among
        :data:`CALLBACK_TENSOR_INPUTS` (the kwargs also carry ``stage``); ``height``/``width``
        resize the input (and so the output) first. ``strength`` must be 1: DIF denoises the crop
        from pure noise. Other arguments of diffusers' call (``denoising_start``, ``latents``,
        ``padding_mask_crop``, ``ip_adapter_image``, ...) raise :class:`UnsupportedArgument`.
        """
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        self._check_call_conventions(strength, height, width, tensor_inputs, unsupported)
        if isinstance(prompt, (list, tuple)):
            return self._call_prompt_list(locals())
        if height is not None or width is not None:
            image, mask_image = self._resized_inputs(image, mask_image, height, width)
        sampler = sampler or SamplerSpec()
        # 1. Normalise and check inputs (one-line DreamMixError on anything wrong)
        x = _as_rgb_array(image)
        mask = _as_binary_mask(mask_image)
        eliminate = clean_eliminate_words(eliminate, identifier)
        tas_stages = tuple(tas_stages or ())
        self.check_inputs(
            x, mask, prompt, num_inference_steps, guidance_scale, lambda_, num_images_per_prompt,
            output_type, eliminate, tas_stages, identifier, generator, feather_radius,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._clip_skip = None
        self._denoising_start = self._denoising_end = None
        self._interrupt = False
        self._num_timesteps = num_inference_steps

        device = self._execution_device
        dtype = self.unet.dtype
        if self.vae.dtype == torch.float16 and self.vae.config.force_upcast:
            self.vae.to(dtype=torch.float32)  # fp16 SDXL VAE overflows; once, not per call
        height, width = mask.shape
        resolution = resolution or self.unet.config.sample_size * self.vae_scale_factor
        multiple = self._size_multiple()
        n = num_images_per_prompt

        # 2. Split the schedule: k LCG steps, T − k GCH steps
        k = split_steps(lambda_, num_inference_steps)

        # 3. Encode the prompt once (+ TAS decomposition), unless the caller already did
        if conditions is None:
            conds = self._encode_conditions(prompt, negative_prompt, eliminate, tas_stages, n, device, dtype, sampler.tas_context)
        elif conditions.key != _conditions_key(
            prompt, negative_prompt, eliminate, tas_stages, n, self.do_classifier_free_guidance, sampler.tas_context
        ):
            raise DreamMixError(
                "conditions were encoded for another prompt, negative prompt, eliminate, tas_stages, "
                "guidance, image count or tas_context than this call's", "conditions",
            )
        else:
            conds = {stage: _Cond(c.embeds.to(device, dtype), c.pooled.to(device, dtype)) for stage, c in conditions.stages.items()}

        # 4. Sizes and feathering at the input's own aspect ratio
        full_size = processing_size(width, height, resolution, multiple)
        if feather_radius is None:
            ratio = max(width / full_size[0], height / full_size[1])
            feather_radius = max(1, int(math.ceil(self.vae_scale_factor * ratio / 2)))
        alpha = feather(mask, feather_radius)
        x_pil = PIL.Image.fromarray(x)

        first_base = sampling.first_base_step(num_inference_steps, sampler.base_switch)
        tail = sampling.BaseTail(self.unet, first_base) if first_base < num_inference_steps else None
        # the tail puts the Fooocus patch back when the call ends, also on an error
        tail_closed = contextlib.closing(tail) if tail is not None else contextlib.nullcontext()
        with self.progress_bar(total=num_inference_steps) as progress_bar, tail_closed:
            common = dict(
                num_inference_steps=num_inference_steps, num_images=n, generator=generator, blend=blend,
                device=device, dtype=dtype, eta=eta, callback_on_step_end=callback_on_step_end,
                progress_bar=progress_bar, callback_tensor_inputs=tensor_inputs, sampler=sampler, tail=tail,
            )  # fmt: skip

            # 5. LCG (Eq. 3–5) on the enlarged crop m', pasted back → x^G
            box: Box | None = None
            x_g = [x] * n
            if k > 0:
                box = lcg_crop_box(mask, crop_scale, min_crop_frac)
                crop_size = processing_size(box.width, box.height, resolution, multiple)
                crop_mask = resize_mask(mask[box.slices()], crop_size)
                crop = x_pil.crop(box.as_tuple())
                upscaler = sampling.crop_upscaler(self, sampler)
                if upscaler is not None and sampling.needs_upscale(box.width, box.height, resolution):
                    crop = upscaler(crop)  # then resized to crop_size like any crop
                latents = self._denoise_stage(
                    stage="local", images=[crop], mask=crop_mask, size=crop_size,
                    start=0, stop=k, cond=conds["local"], **common,
                )  # fmt: skip
                if k == num_inference_steps and output_type == "latent":
                    return self._finish(latents, None, box, k, return_dict)
                patches = self._vae_decode(latents)
                x_g = [paste(x, np.asarray(_resize(p, (box.width, box.height))), box, alpha) for p in patches]

            # 6. GCH (Eq. 6) on the whole x^G, remaining steps of the same schedule
            if k < num_inference_steps:
                stage_images = [x_pil] if k == 0 else [PIL.Image.fromarray(a) for a in x_g]
                latents = self._denoise_stage(
                    stage="global", images=stage_images, mask=resize_mask(mask, full_size), size=full_size,
                    start=k, stop=num_inference_steps, cond=conds["global"], **common,
                )  # fmt: skip
                if output_type == "latent":
                    return self._finish(latents, None, box, k, return_dict)
                generated = self._vae_decode(latents)
                finals = [composite(x, np.asarray(_resize(g, (width, height))), alpha) for g in generated]
            else:
                finals = x_g

        # 7. Outputs at the input's size
        images = _to_output_type([PIL.Image.fromarray(f) for f in finals], output_type)
        lcg_images = [PIL.Image.fromarray(a) for a in x_g] if k > 0 else None
        return self._finish(images, lcg_images, box, k, return_dict)

    def _check_call_conventions(self, strength, height, width, tensor_inputs, unsupported: dict) -> None:
        """Refuse, with a ValueError naming it, what DIF cannot honour of diffusers' call."""
        import inspect

        parent = inspect.signature(StableDiffusionXLInpaintPipeline.__call__).parameters
        for name in unsupported:
            if name not in parent:
                raise TypeError(f"{type(self).__name__}.__call__() got an unexpected keyword argument {name!r}")
        set_ = [k for k, v in unsupported.items() if v is not None and v is not False]
        if set_:
            raise UnsupportedArgument(
                f"{set_[0]!r} is not supported by DreamMix's DIF inpainting (it generates the masked region "
                "from pure noise in a local crop, then harmonises the whole image)", set_[0],
            )
        if float(strength) != 1.0:
            raise UnsupportedArgument(
                f"strength must be 1.0 (DIF denoises the local crop from pure noise), got {strength}", "strength"
            )
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value < 8):
                raise UnsupportedArgument(f"{name} must be an integer >= 8, got {value!r}", name)
        bad = [k for k in tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise UnsupportedArgument(
                f"callback tensor inputs must be among {CALLBACK_TENSOR_INPUTS}, got {bad}", "callback_on_step_end_tensor_inputs"
            )

    @staticmethod
    def _resized_inputs(image, mask_image, height: int | None, width: int | None):
        """diffusers resizes the input to ``height`` x ``width`` (either defaults to the input's);
        the output then has that size."""
        rgb = PIL.Image.fromarray(_as_rgb_array(image))
        size = (width or rgb.width, height or rgb.height)
        mask = PIL.Image.fromarray((_as_binary_mask(mask_image) * 255).astype(np.uint8))
        return _resize(rgb, size), _resize(mask, size)

    def _call_prompt_list(self, args: dict):
        """One DIF run per prompt (each its own crop and schedule), outputs concatenated in prompt order."""
        prompts = list(args["prompt"])
        if not prompts:
            raise UnsupportedArgument("prompt list is empty", "prompt")
        if args["conditions"] is not None:
            raise UnsupportedArgument("conditions= takes one prompt; encode each prompt and call once per prompt", "conditions")

        def per_prompt(value, name):
            if isinstance(value, (list, tuple)):
                if len(value) != len(prompts):
                    raise UnsupportedArgument(f"{len(value)} {name}s for {len(prompts)} prompts (give one, or one per prompt)", name)
                return list(value)
            return [value] * len(prompts)

        images, masks = per_prompt(args["image"], "image"), per_prompt(args["mask_image"], "mask_image")
        n, generator = args["num_images_per_prompt"], args["generator"]
        if isinstance(generator, list) and len(generator) != n * len(prompts):
            raise UnsupportedArgument(f"{len(generator)} generators for {n * len(prompts)} images", "generator")
        keep = {k: v for k, v in args.items() if k not in ("self", "args", "unsupported", "tensor_inputs", "MultiPipelineCallbacks", "PipelineCallback")}
        outs = []
        for i, (prompt, image, mask) in enumerate(zip(prompts, images, masks)):
            gen = generator[i * n : (i + 1) * n] if isinstance(generator, list) else generator
            outs.append(self(**{**keep, "prompt": prompt, "image": image, "mask_image": mask, "generator": gen, "return_dict": True}))
        if args["output_type"] in ("pil",):
            all_images = [im for o in outs for im in o.images]
        else:
            shapes = {tuple(o.images.shape[1:]) for o in outs}
            if len(shapes) > 1:
                raise UnsupportedArgument(f"outputs of different sizes {sorted(shapes)} cannot be stacked; use output_type='pil'", "output_type")
            all_images = np.concatenate([o.images for o in outs]) if args["output_type"] == "np" else torch.cat([o.images for o in outs])
        lcg = [im for o in outs for im in (o.lcg_images or [])] or None
        boxes = [o.crop_box for o in outs]
        if not args["return_dict"]:
            return (all_images, lcg, boxes, outs[0].lcg_steps)
        return DreamMixPipelineOutput(images=all_images, lcg_images=lcg, crop_box=boxes, lcg_steps=outs[0].lcg_steps)

    def inpaint_regions(self, image, regions, **kwargs):
        """Multi-subject inpainting: each region its own mask, prompt and LoRA adapter (LCG per
        region, then GCH per region); see :mod:`dreammix.multi_region`."""
        from dreammix.multi_region import inpaint_regions

        return inpaint_regions(self, image, regions, **kwargs)

    def _finish(self, images, lcg_images, box: Box | None, k: int, return_dict: bool):
        self.maybe_free_model_hooks()
        crop = box.as_tuple() if box is not None else None
        if not return_dict:
            return (images, lcg_images, crop, k)
        return DreamMixPipelineOutput(images=images, lcg_images=lcg_images, crop_box=crop, lcg_steps=k)
