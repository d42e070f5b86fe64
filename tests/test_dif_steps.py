"""DIF's denoising loop (paper Eq. 3–6) replayed step by step with diffusers' own schedulers.

The pipeline runs on the tiny model while the UNet's inputs/outputs, the latents after each step
(``callback_on_step_end``) and the latents handed to the VAE decoder are recorded. An independent
reference then redoes every step from the recorded UNet outputs alone: a fresh scheduler of the
same class and config, its ``step``, and the Eq. 5/6 blend against
``scheduler.add_noise(clean, noise, t_next)``, with the clean latents encoded here by diffusers'
image processor and VAE (posterior mean × scaling factor) and the noise drawn from a generator in
diffusers' order (the stage's noise, then the masked image's posterior sample, then whatever the
scheduler draws per step). The latent cells *outside* the mask are compared too: the final
composite hides them, the blend does not.
"""

from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import pytest
import torch

from dreammix.inpaint import SCHEDULERS, set_scheduler
from dreammix.pipeline import DreamMixInpaintPipeline

PROMPT = "a photo of sks red can"
GUIDANCE = 5.0
SIZE = 64  # = the tiny model's resolution: GCH runs on the input as it is, LCG on the crop × 2
FACTOR = 8  # VAE down-scale factor
# user mask on the 8-px latent grid: rows 24..40, columns 16..40 (bounding box 16 × 24 px)
ROWS, COLS = (24, 40), (16, 40)
# m' (DESIGN.md §3): side max(1.15 · 24, 0.5 · 64) = 32, centred on the box centre (28, 32)
CROP_BOX = (12, 16, 44, 48)
SEED = 3
TOL = dict(rtol=1e-4, atol=1e-4)  # float reordering only; every mutation moves latents by ≫ 1e-2


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _inputs():
    rng = np.random.default_rng(7)
    image = PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[ROWS[0] : ROWS[1], COLS[0] : COLS[1]] = 1
    return image, mask


def _label(what: str):
    return lambda message: f"{what}: {message}"


def _latent_mask(mask: np.ndarray) -> torch.Tensor:
    """1 where any pixel of the 8×8 cell is masked (DESIGN.md §3), as a (1, 1, h, w) tensor."""
    h, w = mask.shape
    cells = mask.reshape(h // FACTOR, FACTOR, w // FACTOR, FACTOR).max(axis=(1, 3))
    return torch.from_numpy(cells.astype(np.float32))[None, None]


def _record(pipe, image, mask, steps, lambda_, monkeypatch):
    """Run the pipeline; return its output and what the loop did at each step."""
    rec = {"unet_in": [], "unet_out": [], "decoded": [], "steps": []}

    def pre_hook(module, args, kwargs):
        rec["unet_in"].append(args[0].detach().clone())

    def hook(module, args, kwargs, output):
        rec["unet_out"].append(output[0].detach().clone())

    def on_step(p, i, t, kw):
        rec["steps"].append((kw["stage"], i, kw["latents"].detach().clone()))
        return {}

    decode = pipe.vae.decode

    def spy_decode(z, *args, **kwargs):
        rec["decoded"].append(z.detach().clone())
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", spy_decode)
    handles = [
        pipe.unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        pipe.unet.register_forward_hook(hook, with_kwargs=True),
    ]
    try:
        out = pipe(
            image, mask, PROMPT, num_inference_steps=steps, lambda_=lambda_, guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(SEED), callback_on_step_end=on_step,
        )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
        monkeypatch.undo()
    return out, rec


def _encode(pipe, image: PIL.Image.Image, pixel_mask: np.ndarray, generator):
    """Eq. 3 with diffusers' image processor and VAE at the model size: the clean latents
    (posterior mean) and the masked image's latents (posterior sample, ``generator``'s next draw)."""
    from diffusers.image_processor import VaeImageProcessor

    pixels = VaeImageProcessor(vae_scale_factor=FACTOR).preprocess(image, height=SIZE, width=SIZE).float()
    masked = pixels * torch.from_numpy(pixel_mask < 0.5)  # diffusers: init_image * (mask < 0.5)
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        clean = pipe.vae.encode(pixels).latent_dist.mean * sf
        dist = pipe.vae.encode(masked).latent_dist
    masked_latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)) * sf
    return clean, masked_latents


def _scheduler_x0(scheduler, out) -> torch.Tensor:
    """The x₀ the scheduler itself derived from this step's model output."""
    if getattr(out, "pred_original_sample", None) is not None:  # Euler, Euler a, DDIM
        return out.pred_original_sample
    # the multistep solvers keep their converted model output: the x₀ prediction for
    # DPM-Solver++ (also its SDE variant) and for UniPC's default (predict_x0)
    assert getattr(scheduler.config, "algorithm_type", "dpmsolver++") in ("dpmsolver++", "sde-dpmsolver++")
    assert getattr(scheduler.config, "predict_x0", True)
    return scheduler.model_outputs[-1]


def _replay(pipe, stage, image, pixel_mask, generator, start, stop, total, rec):
    """Redo steps [start, stop) of a ``total``-step schedule with a fresh scheduler, asserting the
    pipeline's UNet inputs and latents at each one. Returns the Eq. 5 blended x₀ at a switch
    (stop < total), else the final latents."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(total)
    ts = scheduler.timesteps
    lmask = _latent_mask(pixel_mask)
    noise = torch.randn((1, 4, SIZE // FACTOR, SIZE // FACTOR), generator=generator)  # stage noise first
    clean, masked_latents = _encode(pipe, image, pixel_mask, generator)  # then the posterior sample
    params = inspect.signature(scheduler.step).parameters  # diffusers' prepare_extra_step_kwargs
    extra = {"generator": generator} if "generator" in params else {}
    if "eta" in params:
        extra["eta"] = 0.0

    if start == 0:
        latents = noise * scheduler.init_noise_sigma  # strength 1: pure noise
    else:  # the schedule continues: the stage image noised to step `start`'s level
        latents = scheduler.add_noise(clean, noise, ts[start : start + 1])
    for i in range(start, stop):
        t = ts[i]
        model_input = rec["unet_in"][i][:1]  # CFG batch: [uncond, text], same input
        scaled = scheduler.scale_model_input(latents, t)
        torch.testing.assert_close(model_input[:, :4], scaled, **TOL, msg=_label(f"{stage}: UNet latents, step {i}"))
        torch.testing.assert_close(model_input[:, 4:5], lmask, msg=_label(f"{stage}: UNet mask channel"))
        torch.testing.assert_close(model_input[:, 5:], masked_latents, **TOL, msg=_label(f"{stage}: masked latents"))
        uncond, text = rec["unet_out"][i].chunk(2)
        out = scheduler.step(uncond + GUIDANCE * (text - uncond), t, latents, **extra)
        latents = out.prev_sample
        name, index, got = rec["steps"][i]
        assert (name, index) == (stage, i)
        if i == stop - 1 and stop < total:
            # the switch (Eq. 5 at t = 0): x₀ inside the mask, the clean crop latent outside
            x0 = _scheduler_x0(scheduler, out)
            return lmask * x0 + (1 - lmask) * clean
        # Eq. 5 / 6: outside the mask, the stage image noised to the *next* step's level
        target = scheduler.add_noise(clean, noise, ts[i + 1 : i + 2]) if i + 1 < total else clean
        latents = lmask * latents + (1 - lmask) * target
        torch.testing.assert_close(got, latents, **TOL, msg=_label(f"{stage}: latents after step {i}"))
    return latents


def _check_against_reference(pipe, name, steps, lambda_, monkeypatch):
    original = pipe.scheduler
    set_scheduler(pipe, name)
    try:
        image, mask = _inputs()
        out, rec = _record(pipe, image, mask, steps, lambda_, monkeypatch)
        k = int(np.floor(lambda_ * steps + 0.5))
        assert out.lcg_steps == k and len(rec["unet_in"]) == len(rec["unet_out"]) == len(rec["steps"]) == steps
        # one decode per stage end: the switch's x₀ (→ x^G) and/or the final latents
        assert len(rec["decoded"]) == (k > 0) + (k < steps)
        decoded = [z * pipe.vae.config.scaling_factor for z in rec["decoded"]]
        generator = torch.Generator().manual_seed(SEED)
        if k > 0:
            # LCG on the crop m' resized to the model size, the user mask mapped into it
            assert out.crop_box == CROP_BOX
            left, top, right, bottom = CROP_BOX
            crop_mask = PIL.Image.fromarray(mask[top:bottom, left:right]).resize((SIZE, SIZE), PIL.Image.NEAREST)
            lcg = _replay(pipe, "local", image.crop(CROP_BOX), np.asarray(crop_mask), generator, 0, k, steps, rec)
            torch.testing.assert_close(decoded[0], lcg, **TOL, msg=_label("LCG latents decoded into x^G"))
        if k < steps:
            # GCH on x^G (the input when λ = 0), continuing the schedule from step k
            stage_image = out.lcg_images[0] if k > 0 else image
            final = _replay(pipe, "global", stage_image, mask, generator, k, steps, steps, rec)
            torch.testing.assert_close(decoded[-1], final, **TOL, msg=_label("final latents decoded"))
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("name", ["default", *SCHEDULERS])
def test_dif_steps_match_a_reference_built_from_diffusers_scheduler_steps(pipe, name, monkeypatch):
    """LCG (Eq. 3–5) on m', the switch to x^G, GCH (Eq. 6) continuing the same schedule, for each
    offered scheduler: every step's latents, inside and outside the mask, equal the scheduler's
    own step followed by the blend with the stage image noised to the next step's level, and the
    latent decoded at the switch is the scheduler's own x₀ blended with the clean crop latent."""
    _check_against_reference(pipe, name, 4, 0.5, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("steps, lambda_", [(6, 0.0), (6, 0.7), (5, 0.2), (6, 1.0)])
@pytest.mark.parametrize("name", ["default", *SCHEDULERS])
def test_dif_steps_match_the_reference_for_other_splits(pipe, name, steps, lambda_, monkeypatch):
    """The same reference for GCH alone (λ = 0, Eq. 6 from pure noise), LCG alone (λ = 1) and other
    switch points, where multistep solvers switch with a history of several steps."""
    _check_against_reference(pipe, name, steps, lambda_, monkeypatch)
