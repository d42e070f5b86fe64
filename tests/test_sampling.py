"""``sampler`` config group (dreammix.sampling): each knob of the public code's inference against
hand-computed values, its wiring into the pipeline, and the presets end to end on the tiny models."""

from __future__ import annotations

import gc
import logging
import math
import subprocess
import sys
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, make_real_lora
from dreammix.errors import DreamMixError
from dreammix.sampling import SamplerSpec

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 64, 96


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "room.png")
    mask = np.zeros((H, W), np.uint8)
    mask[20:44, 30:60] = 255
    Image.fromarray(mask).save(tmp_path / "room_mask.png")
    return tmp_path


def _cfg(compose, files, *overrides):
    return compose("inpaint", [
        f"image={files / 'room.png'}", f"mask={files / 'room_mask.png'}", "prompt=a photo of sks red can",
        "model=tiny", "steps=2", f"run_dir={files / 'run'}", "progress=false", *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    """The tiny SDXL inpainting pipeline (Euler), shared by the tests that load nothing into it."""
    from dreammix.pipeline import DreamMixInpaintPipeline

    pipe = DreamMixInpaintPipeline.from_pretrained(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image_and_mask(h=64, w=64):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.float32)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    return image, mask


class UnetSpy:
    """Records each UNet call's inputs (forward pre-hook with kwargs)."""

    def __init__(self, unet, extra=None):
        self.calls = []
        self.extra = extra
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        record = {"sample": args[0].detach().clone(), "time_ids": kwargs["added_cond_kwargs"]["time_ids"].clone()}
        if self.extra is not None:
            record.update(self.extra(module))
        self.calls.append(record)

    def remove(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------
# Sharpness: Fooocus's anisotropic guidance against a loop-by-loop computation of its formula
# ------------------------------------------------------------------------------------------------


def _naive_joint_bilateral(x, g, k=13, sigma_color=3.0, sigma_space=3.0):
    """kornia's joint bilateral filter (L1 colour distance, reflect border), pixel by pixel."""
    b, c, h, w = x.shape
    r = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    gp = np.pad(g, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    g1 = np.exp(-(np.arange(k) - r) ** 2 / (2 * sigma_space**2))
    g1 /= g1.sum()
    out = np.zeros_like(x)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                num, den = np.zeros(c), 0.0
                for di in range(k):
                    for dj in range(k):
                        dist = np.abs(gp[n, :, i + di, j + dj] - g[n, :, i, j]).sum()
                        wgt = g1[di] * g1[dj] * math.exp(-0.5 * dist**2 / sigma_color**2)
                        num += wgt * xp[n, :, i + di, j + dj]
                        den += wgt
                out[n, :, i, j] = num / den
    return out


def test_sharpness_is_fooocus_anisotropic_blend_of_the_positive_x0():
    from dreammix.sampling import sharpen_noise_pred, sharpness_weight

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64) * 3  # VE latent x = x0 + σ·ε
    eps = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    sigma, t, sharpness = 2.5, 300.0, 40.0
    x0 = x - sigma * eps

    # Fooocus (modules/patch.py + anisotropic.py), by hand: guide standardised per sample with the
    # unbiased std + 1e-5; α = 0.001 · sharpness · (1 − t/999); new x0 = x − (α·A(x−x0) + (1−α)(x−x0))
    g = x0.numpy()
    mean = g.mean(axis=(1, 2, 3), keepdims=True)
    std = g.std(axis=(1, 2, 3), ddof=1, keepdims=True)
    guide = (g - mean) / (std + 1e-5)
    e_k = (x - x0).numpy()
    alpha = 0.001 * sharpness * (1 - t / 999)
    expected_x0 = x.numpy() - (alpha * _naive_joint_bilateral(e_k, guide) + (1 - alpha) * e_k)

    got_eps = sharpen_noise_pred(eps, x0, t, sharpness, num_train_timesteps=1000)
    got_x0 = (x - sigma * got_eps).numpy()
    np.testing.assert_allclose(got_x0, expected_x0, rtol=0, atol=1e-5)
    assert not np.allclose(got_x0, x0.numpy(), atol=1e-3)  # it did something
    assert sharpness_weight(999, 1.0) == 0.0 and sharpness_weight(0, 1.0) == pytest.approx(0.001)
    assert torch.equal(sharpen_noise_pred(eps, x0, 999, 5.0), eps)  # α = 0 at the noisiest step


def test_sharpness_acts_on_the_positive_half_every_step(tiny_pipe, monkeypatch):
    import dreammix.sampling as sampling

    seen = []
    real = sampling.sharpen_noise_pred
    monkeypatch.setattr(sampling, "sharpen_noise_pred", lambda eps, x0, t, s, n: seen.append((eps.shape[0], s)) or real(eps, x0, t, s, n))
    image, mask = _image_and_mask()
    args = dict(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=4, lambda_=0.5,
                guidance_scale=3.0, output_type="latent")  # fmt: skip
    plain = tiny_pipe(**args, generator=torch.Generator().manual_seed(0)).images
    assert not seen
    sharp = tiny_pipe(**args, generator=torch.Generator().manual_seed(0), sampler=SamplerSpec(sharpness=300.0)).images
    assert seen == [(1, 300.0)] * 4  # the positive half of the CFG batch, at each of the 4 steps
    assert not torch.allclose(plain, sharp)


@pytest.mark.parametrize("scheduler,guidance", [("euler", 3.0), ("euler", 1.0), ("ddim", 3.0)])
def test_sharpness_gets_the_text_half_and_its_x0_from_the_unet_call(tiny_model_dir, monkeypatch, scheduler, guidance):
    """Inside the loop: the blend gets the UNet's *text* half of the CFG batch (the whole output
    without CFG) and the x₀ of that half in the VE form, x₀ = x − σ·ε with x = model input ·
    sqrt(1 + σ²): σ is Euler's own ``sigmas[i]``, and sqrt((1 − ᾱ_t)/ᾱ_t) at the step's t for a
    scheduler without σs (DDIM, whose model input is the VP x_t = x / sqrt(1 + σ²))."""
    import dreammix.sampling as sampling
    from diffusers import DDIMScheduler

    from dreammix.pipeline import DreamMixInpaintPipeline

    pipe = DreamMixInpaintPipeline.from_pretrained(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    seen, outs, steps = [], [], []
    real = sampling.sharpen_noise_pred
    monkeypatch.setattr(sampling, "sharpen_noise_pred", lambda eps, x0, t, s, n: seen.append((eps, x0)) or real(eps, x0, t, s, n))
    spy = UnetSpy(pipe.unet)
    hook = pipe.unet.register_forward_hook(lambda m, a, out: outs.append(out[0].detach().clone()))
    step_hook = pipe.unet.register_forward_pre_hook(lambda m, a: steps.append(float(a[1])))
    image, mask = _image_and_mask()
    try:
        pipe(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=3, lambda_=0.0, guidance_scale=guidance,
             output_type="latent", generator=torch.Generator().manual_seed(0), sampler=SamplerSpec(sharpness=300.0))  # fmt: skip
    finally:
        spy.remove()
        hook.remove()
        step_hook.remove()
    assert len(seen) == len(outs) == 3
    for i, ((eps, x0), out, call, t) in enumerate(zip(seen, outs, spy.calls, steps)):
        if guidance > 1:
            uncond, text = out.chunk(2)  # CFG batch = [negative, positive]
            assert not torch.allclose(text, uncond)
            sample = call["sample"][1:, :4]
        else:
            text, sample = out, call["sample"][:, :4]
        assert torch.equal(eps, text)
        if scheduler == "euler":
            sigma = float(pipe.scheduler.sigmas[i])
        else:
            a = float(pipe.scheduler.alphas_cumprod[int(t)])
            sigma = math.sqrt((1 - a) / a)
        x = sample * math.sqrt(1 + sigma**2)
        torch.testing.assert_close(x0, x - sigma * text, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Size conditioning scaler (Fooocus's ADM scaler)
# ------------------------------------------------------------------------------------------------


def test_size_scale_multiplies_the_original_size_on_the_first_steps(tiny_pipe):
    image, mask = _image_and_mask()
    spy = UnetSpy(tiny_pipe.unet)
    try:
        tiny_pipe(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=10, lambda_=0.0,
                  guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0),
                  sampler=SamplerSpec(size_positive=1.5, size_negative=0.8, size_end=0.3))  # fmt: skip
    finally:
        spy.remove()
    # λ = 0: the whole 64×64 image; SDXL ids = (orig h, orig w, crop top, crop left, target h, target w);
    # CFG batch = [negative, positive]; the code's rule: steps i <= int(10 · 0.3) = 3
    scaled = torch.tensor([[0.8 * 64, 0.8 * 64, 0, 0, 64, 64], [1.5 * 64, 1.5 * 64, 0, 0, 64, 64]])
    plain = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    assert len(spy.calls) == 10
    for i, call in enumerate(spy.calls):
        assert torch.allclose(call["time_ids"].float(), scaled if i <= 3 else plain), i

    # across the LCG → GCH switch (λ = 0.2: LCG steps 0–1, GCH 2–9) the rule counts the schedule's
    # steps, not each stage's: original size / target size = (0.8, 1.5) on steps 0–3, then 1
    spy = UnetSpy(tiny_pipe.unet)
    try:
        tiny_pipe(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=10, lambda_=0.2,
                  guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0),
                  sampler=SamplerSpec(size_positive=1.5, size_negative=0.8, size_end=0.3))  # fmt: skip
    finally:
        spy.remove()
    ratios = torch.stack([c["time_ids"][:, 0] / c["time_ids"][:, 4] for c in spy.calls]).float()
    assert torch.allclose(ratios, torch.tensor([[0.8, 1.5]] * 4 + [[1.0, 1.0]] * 6), atol=1e-6)


def test_step_rules_follow_the_public_code():
    from dreammix.sampling import first_base_step, size_scaled_step

    assert first_base_step(30, 0.8) == 25  # code: fooocus_unet for i <= int(30·0.8) = 24
    assert first_base_step(10, 0.8) == 9 and first_base_step(30, 1.0) == 31 and first_base_step(30, 0.0) == 1
    assert [i for i in range(30) if size_scaled_step(i, 30, 0.3)] == list(range(10))
    assert not any(size_scaled_step(i, 30, 0.0) for i in range(30))


# ------------------------------------------------------------------------------------------------
# Unpatched-base tail (Fooocus's inpaint switch)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fooocus_pipe(compose, files, tiny_model_dir):
    """The tiny Fooocus base (SDXL base + synthetic patch + head) with a subject LoRA."""
    from dreammix.inpaint import load_pipeline

    cfg = _cfg(compose, files, "model=tiny_fooocus")
    pipe = load_pipeline(cfg, torch.device("cpu"))
    pipe.load_subject_lora(make_real_lora(tiny_model_dir, files / "lora"))
    return pipe, cfg


def test_base_tail_runs_the_last_steps_on_the_unpatched_base_without_adapter(fooocus_pipe):
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from dreammix.models.fooocus import _patchable_parameters

    pipe, cfg = fooocus_pipe
    unet = pipe.unet
    base = load_file(f"{cfg.model.pretrained}/unet/diffusion_pytorch_model.safetensors")  # the SDXL base as saved
    params = _patchable_parameters(unet)
    assert set(base) == set(params)
    patched = {k: p.detach().clone() for k, p in unet.state_dict().items()}
    lora_layer = next(m for m in unet.modules() if isinstance(m, BaseTunerLayer))
    unets_before = sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())

    def state(module):
        unpatched = all(torch.allclose(params[k], base[k], rtol=0, atol=1e-6) for k in base)
        record = {"unpatched": unpatched, "adapter_off": lora_layer.disable_adapters,
                  "patched": all(torch.equal(p, patched[n]) for n, p in module.state_dict().items())}
        if unpatched and not checked_memory:  # once, in the tail: gc.get_objects() is slow
            checked_memory.append(sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects()))
        return record

    checked_memory, heads = [], []
    spy = UnetSpy(unet, state)
    hook = unet.conv_in.head.register_forward_hook(lambda *a: heads.append(len(spy.calls) - 1))
    image, mask = _image_and_mask()
    run = dict(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=30, lambda_=0.7, guidance_scale=2.0,
               output_type="latent", sampler=SamplerSpec(base_switch=0.8))  # fmt: skip
    try:
        first = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    finally:
        spy.remove()
        hook.remove()
    second = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    calls = spy.calls
    # calls 0–24 (i <= int(30·0.8)): the patched UNet with its head and the LoRA; 25–29: the base
    assert [c["unpatched"] for c in calls] == [False] * 25 + [True] * 5
    assert [c["patched"] for c in calls] == [True] * 25 + [False] * 5
    assert [c["adapter_off"] for c in calls] == [False] * 25 + [True] * 5
    assert heads == list(range(25))  # the inpaint head ran for calls 0–24 only
    assert checked_memory == [unets_before]  # no second UNet during the tail
    # restored exactly: same weights, adapter and head on, same result when run again
    assert all(torch.equal(p, patched[n]) for n, p in unet.state_dict().items())
    assert not lora_layer.disable_adapters and unet.conv_in.head_enabled
    assert torch.equal(first, second)

    # a run that fails inside the tail leaves the UNet patched too
    def fail(pipe_, i, t, kwargs):
        if i == 7:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pipe(**{**run, "num_inference_steps": 10, "sampler": SamplerSpec(base_switch=0.5)}, callback_on_step_end=fail)
    assert all(torch.equal(p, patched[n]) for n, p in unet.state_dict().items())
    assert not lora_layer.disable_adapters and unet.conv_in.head_enabled


def test_base_tail_restores_bf16_weights_exactly_with_sparse_cpu_fixups(fooocus_pipe):
    """In bf16, re-adding a delta does not always round back to the patched weight; those weights
    are kept (on the CPU, few) so that leaving the tail is still bit-exact."""
    from dreammix.models.fooocus import _patchable_parameters, fooocus_patch_deltas
    from dreammix.sampling import BaseTail

    pipe, _ = fooocus_pipe
    unet = pipe.unet.to(torch.bfloat16)
    patched = {k: p.detach().clone() for k, p in unet.state_dict().items()}
    params = _patchable_parameters(unet)
    tail = BaseTail(unet, first=0)
    tail.before_step(0)
    try:
        total = sum(p.numel() for p in params.values())
        kept = sum(index.numel() for index, _ in tail._fixups.values())
        assert 0 < kept < 0.2 * total and all(i.device.type == "cpu" for i, _ in tail._fixups.values())
        for key, delta in fooocus_patch_deltas(unet):  # the base: patched − delta, to bf16 rounding
            expected = patched[_state_key(unet, key)].float() - delta
            assert torch.allclose(params[key].float(), expected, rtol=1e-2, atol=1e-3), key
    finally:
        tail.close()
    assert all(torch.equal(p, patched[n]) for n, p in unet.state_dict().items())


def _state_key(unet, key):
    """The state-dict name of a plain diffusers weight name (head wrapper / LoRA base layer)."""
    names = set(unet.state_dict())
    for candidate in (key, key.replace("conv_in.", "conv_in.conv."), key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]):
        if candidate in names:
            return candidate
    raise KeyError(key)


def test_base_tail_needs_the_fooocus_base(compose, files, tiny_pipe, monkeypatch):
    import dreammix.inpaint as inpaint

    image, mask = _image_and_mask()
    with pytest.raises(DreamMixError, match="unpatched-base tail needs a UNet built by model=fooocus"):
        tiny_pipe(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=5, sampler=SamplerSpec(base_switch=0.5))
    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: pytest.fail("model loaded before the sampler was checked"))
    for overrides in (["sampler=reference"], ["sampler.base_switch=0.8"]):
        with pytest.raises(DreamMixError, match="model=tiny has no unpatched base") as err:
            inpaint.run_inpaint(_cfg(compose, files, *overrides))
        assert err.value.where == "sampler.base_switch" and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("sampler.start=pure", "sampler.start"),
        ("sampler.base_switch=1.5", "sampler.base_switch"),
        ("sampler.sharpness=-1", "sampler.sharpness"),
        ("sampler.size_scale.positive=0", "sampler.size_scale.positive"),
        ("sampler.size_scale.end=abc", "sampler.size_scale.end"),
        ("sampler.tas_context=''", "sampler.tas_context"),
        ("sampler.scheduler=heun", "scheduler"),
    ],
)
def test_bad_sampler_values_are_one_line_errors_before_loading(compose, files, monkeypatch, override, where):
    import dreammix.inpaint as inpaint

    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: pytest.fail("model loaded before input was checked"))
    with pytest.raises(DreamMixError) as err:
        inpaint.run_inpaint(_cfg(compose, files, override))
    assert err.value.where == where and "\n" not in str(err.value)


def test_cli_unknown_preset_exits_2_with_one_line(files):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # full tracebacks off
    env.update(PYTHONPATH=str(REPO_ROOT / "src"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "src" / "inpaint.py"), "image=a.png", "mask=b.png", "prompt=a sks can", "sampler=bogus"],
        cwd=files, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sampler/bogus" in errors[0]


# ------------------------------------------------------------------------------------------------
# Start latents: filled image plus noise
# ------------------------------------------------------------------------------------------------


def test_fill_hole_takes_the_surrounding_colours_and_keeps_known_pixels():
    from dreammix.sampling import fill_hole

    mask = torch.zeros(1, 1, 40, 50)
    mask[..., 10:30, 15:35] = 1
    flat = torch.full((1, 3, 40, 50), 0.25)
    flat[..., 10:30, 15:35] = -1.0  # whatever was in the hole: its trace fades to < 1 % of the jump
    assert torch.allclose(fill_hole(flat, mask), torch.full_like(flat, 0.25), atol=0.0125)
    assert not torch.allclose(fill_hole(flat, mask), flat, atol=0.5)

    left_right = torch.where(torch.arange(50) < 25, -0.5, 0.5).expand(1, 3, 40, 50).clone()
    filled = fill_hole(left_right, mask)
    known = mask.expand_as(filled) < 0.5
    assert torch.equal(filled[known], left_right[known])
    hole = filled[0, 0, 10:30, 15:35]
    assert hole.min() >= -0.5 - 1e-6 and hole.max() <= 0.5 + 1e-6
    assert hole[:, 0].mean() < -0.2 and hole[:, -1].mean() > 0.2  # each side takes its neighbour's colour


def test_fill_hole_at_1024_is_fooocus_fill_with_pil_box_blurs():
    """At 1024² the radii are Fooocus's own; its ``fooocus_fill`` is PIL ``BoxBlur`` on uint8 with the
    known pixels put back after each blur. Ours runs in float: equal up to PIL's per-blur rounding."""
    from PIL import ImageFilter

    from dreammix.sampling import fill_hole

    yy, xx = np.mgrid[0:1024, 0:1024]
    image = ((np.sin(xx / 37.0) * np.cos(yy / 53.0) * 0.5 + 0.5) * 255).round().astype(np.uint8)
    mask = np.zeros((1024, 1024), np.uint8)
    mask[300:700, 0:560] = 255  # touching the left border: the blur's edge handling counts
    known, expected = mask < 127, image.copy()
    for radius, repeats in [(512, 2), (256, 2), (128, 4), (64, 4), (33, 8), (15, 8), (5, 16), (3, 16)]:  # Fooocus's
        for _ in range(repeats):
            expected = np.array(Image.fromarray(expected).filter(ImageFilter.BoxBlur(radius)))
            expected[known] = image[known]
    pixels = torch.from_numpy(image / 127.5 - 1.0)[None, None].float()
    got = (fill_hole(pixels, torch.from_numpy(mask / 255.0)[None, None].float())[0, 0].double().numpy() + 1.0) * 127.5
    assert np.abs(got - expected).max() < 3.0  # uint8 rounding; another radius or border mode: > 10
    assert np.abs(got - image).max() > 50  # the hole really changed


@pytest.mark.parametrize("kind", ["euler", "dpmpp_2m_sde_karras"])
def test_fill_noise_start_is_fooocus_full_denoise_start(kind):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from dreammix.sampling import fill_noise_latents

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
    if kind == "euler":
        scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **common)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **common)
    scheduler.set_timesteps(30)
    gen = torch.Generator().manual_seed(0)
    n, z = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    got = fill_noise_latents(scheduler, n, z, scheduler.timesteps[0])
    # the code (ComfyUI EPS noise_scaling, max denoise): x = z + sqrt(1 + σ_max²)·n in the VE form
    if kind == "euler":  # Euler holds VE latents; SDXL's σ_max at "leading" t = 951
        a = scheduler.alphas_cumprod[int(scheduler.timesteps[0])]
        sigma = float(((1 - a) / a).sqrt())
        expected = z + math.sqrt(1 + sigma**2) * n
    else:  # DPM-Solver holds VP latents x/sqrt(1 + σ²); Karras σ_max = Fooocus's constant 14.6146
        sigma = 14.6146
        expected = (z + math.sqrt(1 + sigma**2) * n) / math.sqrt(1 + sigma**2)
    assert torch.allclose(got, expected, atol=2e-4)


def test_ve_sigma_of_a_scheduler_without_sigmas_is_eulers_sigma_at_that_timestep():
    """DDIM keeps no σs: its VE σ must be the one Euler (which does) holds for the same timestep."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from dreammix.sampling import ve_sigma

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, timestep_spacing="leading")  # fmt: skip
    ddim, euler = DDIMScheduler(**common), EulerDiscreteScheduler(**common)
    ddim.set_timesteps(10)
    euler.set_timesteps(10)
    assert getattr(ddim, "sigmas", None) is None and torch.equal(ddim.timesteps, euler.timesteps)
    got = [ve_sigma(ddim, i, t) for i, t in enumerate(ddim.timesteps)]
    assert got == pytest.approx(euler.sigmas[:-1].tolist(), rel=1e-5)


def test_fill_noise_start_reaches_the_first_unet_call(tiny_pipe):
    from dreammix.sampling import fill_hole

    image, mask = _image_and_mask()
    firsts = []
    for start in ("noise", "fill_noise"):
        spy = UnetSpy(tiny_pipe.unet)
        try:
            tiny_pipe(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=3, lambda_=0.0,
                      guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0),
                      sampler=SamplerSpec(start=start))  # fmt: skip
        finally:
            spy.remove()
        firsts.append(spy.calls[0]["sample"][:, :4])
    # Euler model input = x / sqrt(1 + σ₀²): the fill start adds z / sqrt(1 + σ₀²) to the same noise
    pixels = tiny_pipe.image_processor.preprocess(Image.fromarray(image), height=64, width=64)
    filled = fill_hole(pixels, torch.from_numpy(mask)[None, None])
    z = tiny_pipe.vae.encode(filled).latent_dist.mean * tiny_pipe.vae.config.scaling_factor
    sigma0 = float(tiny_pipe.scheduler.sigmas[0])
    assert torch.allclose(firsts[1] - firsts[0], z / math.sqrt(1 + sigma0**2), atol=1e-5)

    # only the schedule's first step starts from the fill: GCH after LCG starts from x^G noised to step k
    import dreammix.sampling as sampling

    starts = []
    real = sampling.fill_noise_latents
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "fill_noise_latents", lambda *a: starts.append(a[3]) or real(*a))
        tiny_pipe(image=image, mask_image=mask, prompt="a sks can", num_inference_steps=2, lambda_=0.5, guidance_scale=1.0,
                  output_type="latent", generator=torch.Generator().manual_seed(0), sampler=SamplerSpec(start="fill_noise"))  # fmt: skip
    assert len(starts) == 1


# ------------------------------------------------------------------------------------------------
# TAS words inside the context prompt
# ------------------------------------------------------------------------------------------------


def test_tas_in_context_uses_the_words_token_embeddings_of_the_context_prompt(tiny_pipe):
    from dreammix.sampling import context_token_span

    context, words, prompt = "a photo of a sks", ["red", "silver"], "a photo of sks blue can"
    text = f"{context} {' '.join(words)}"
    tok = tiny_pipe.tokenizer
    ids = tok(text).input_ids
    word_ids = tok(" ".join(words)).input_ids[1:-1]
    # the words' tokens found in the context prompt's ids, by hand: after BOS and the context
    found = [p for p in range(len(ids)) if ids[p : p + len(word_ids)] == word_ids]
    assert found and context_token_span(tok, context, " ".join(words)) == (found[-1], len(word_ids))
    start = found[-1]

    tiny_pipe._guidance_scale = 1.0  # no CFG batch: rows are the prompt only
    with torch.no_grad():
        embeds_ctx, _, pooled_ctx, _ = tiny_pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        embeds_alone, _, _, _ = tiny_pipe.encode_prompt(" ".join(words), device="cpu", do_classifier_free_guidance=False)
    in_context = embeds_ctx[0, start : start + len(word_ids)]  # the contextual embeddings
    alone = embeds_alone[0, 1 : 1 + len(word_ids)]
    assert not torch.allclose(in_context, alone, atol=1e-3)  # context changes them (causal attention)

    with torch.no_grad():
        conds = tiny_pipe._encode_conditions(prompt, None, words, ("local", "global"), 1, torch.device("cpu"), torch.float32, context)
    n_prompt = len(tok(prompt).input_ids) - 2
    out = conds["local"].embeds[0, 1 : 1 + n_prompt].double()
    # Eq. 9 against those directions: every prompt token orthogonal to each in-context embedding …
    cos = torch.nn.functional.cosine_similarity(out[:, None], in_context.double()[None], dim=-1)
    assert cos.abs().max() < 1e-5
    # … not to the words encoded alone (those are what sampler.tas_context=null uses)
    cos_alone = torch.nn.functional.cosine_similarity(out[:, None], alone.double()[None], dim=-1)
    assert cos_alone.abs().max() > 1e-3
    pooled = conds["local"].pooled[0].double()
    assert abs(float(pooled @ pooled_ctx[0].double())) / float(pooled.norm() * pooled_ctx[0].double().norm()) < 1e-5


# ------------------------------------------------------------------------------------------------
# Small-crop upscaling
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_upscaler(tmp_path_factory):
    """A tiny random transformers Swin2SR ×2, saved like a hub folder."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    folder = tmp_path_factory.mktemp("swin2sr")
    torch.manual_seed(0)
    config = Swin2SRConfig(image_size=16, embed_dim=8, depths=[1], num_heads=[1], window_size=4, upscale=2, mlp_ratio=1.0)
    Swin2SRForImageSuperResolution(config).save_pretrained(folder)
    Swin2SRImageProcessor(size_divisor=4).save_pretrained(folder)
    return folder


def test_needs_upscale_is_fooocus_rule():
    from dreammix.sampling import needs_upscale

    # Fooocus: ceil(sqrt(h·w) / 64) · 64 < 1024 (64 = 1024 / 16)
    assert needs_upscale(960, 960, 1024) and needs_upscale(500, 1800, 1024)  # sqrt = 948.7 → 960
    assert not needs_upscale(1000, 1000, 1024) and not needs_upscale(1024, 1024, 1024)  # 1000 → 1024
    assert needs_upscale(32, 32, 64) and not needs_upscale(62, 62, 64) and not needs_upscale(96, 64, 64)


def test_upscaler_loads_upscales_small_crops_only_and_falls_back(tiny_pipe, tiny_upscaler, tmp_path, caplog):
    import dreammix.sampling as sampling

    upscaler = sampling.load_crop_upscaler(str(tiny_upscaler))
    assert upscaler.scale == 2 and upscaler(Image.new("RGB", (10, 12))).size == (20, 24)

    used = []
    real_call = sampling.CropUpscaler.__call__

    def spy(self, image):
        used.append(image.size)
        return real_call(self, image)

    image, small = _image_and_mask(64, 96)  # mask 32×48 → the crop is 55 px square, below 64
    big = np.zeros((64, 96), np.float32)
    big[2:62, 3:93] = 1  # crop = the whole 96×64 image, sqrt(area) = 78 ≥ 64
    run = dict(image=image, prompt="a sks can", num_inference_steps=2, lambda_=1.0, guidance_scale=1.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling.CropUpscaler, "__call__", spy)
        with_model = SamplerSpec(upscale_model=str(tiny_upscaler))
        up = tiny_pipe(**run, mask_image=small, sampler=with_model, generator=torch.Generator().manual_seed(0))
        assert len(used) == 1 and used[0][0] == used[0][1] < 64  # the square crop, once
        tiny_pipe(**run, mask_image=big, sampler=with_model, generator=torch.Generator().manual_seed(0))
        assert len(used) == 1  # large crop: no upscaling

    plain = tiny_pipe(**run, mask_image=small, generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(np.asarray(up.images[0]), np.asarray(plain.images[0]))
    with caplog.at_level(logging.WARNING, logger="dreammix.sampling"):
        missing = SamplerSpec(upscale_model=str(tmp_path / "no-such-upscaler"))
        fallback = tiny_pipe(**run, mask_image=small, sampler=missing, generator=torch.Generator().manual_seed(0))
    assert any("not available" in r.getMessage() and "no-such-upscaler" in r.getMessage() for r in caplog.records)
    assert np.array_equal(np.asarray(fallback.images[0]), np.asarray(plain.images[0]))


# ------------------------------------------------------------------------------------------------
# Presets end to end
# ------------------------------------------------------------------------------------------------


def test_each_knob_is_a_config_value_on_its_own(compose, files):
    from dreammix.inpaint import sampler_spec

    default = sampler_spec(_cfg(compose, files))
    assert default == SamplerSpec(name="default")  # paper text: every knob off
    for override, field, value in [
        ("sampler.base_switch=0.8", "base_switch", 0.8), ("sampler.sharpness=2", "sharpness", 2.0),
        ("sampler.size_scale.positive=1.5", "size_positive", 1.5), ("sampler.size_scale.negative=0.8", "size_negative", 0.8),
        ("sampler.size_scale.end=0.3", "size_end", 0.3), ("sampler.start=fill_noise", "start", "fill_noise"),
        ("sampler.tas_context='a photo of a sks'", "tas_context", "a photo of a sks"),
        ("sampler.upscale.model=some/upscaler", "upscale_model", "some/upscaler"),
    ]:  # fmt: skip
        spec = sampler_spec(_cfg(compose, files, "model=tiny_fooocus", override))
        assert getattr(spec, field) == value and {k: v for k, v in spec.__dict__.items() if k != field} == {
            k: v for k, v in default.__dict__.items() if k != field
        }, override
    cfg = _cfg(compose, files, "sampler.guidance_scale=4", "sampler.scheduler=dpmpp_2m_sde_karras")
    assert (cfg.guidance_scale, cfg.scheduler) == (4.0, "dpmpp_2m_sde_karras")
    assert _cfg(compose, files, "sampler=reference", "guidance_scale=6").guidance_scale == 6  # top level wins


def test_reference_preset_end_to_end_on_tiny_fooocus(compose, files, tiny_model_dir, monkeypatch, caplog):
    """``sampler=reference`` through run_inpaint: every knob at the public code's value reaches the
    pipeline, which runs DPM++ 2M SDE Karras at guidance 4 and writes the image."""
    import dreammix.inpaint as inpaint
    from dreammix.pipeline import DreamMixInpaintPipeline

    seen = {}
    real_call = DreamMixInpaintPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs, scheduler=self.scheduler)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DreamMixInpaintPipeline, "__call__", spy)
    lora = make_real_lora(tiny_model_dir, files / "lora")
    with caplog.at_level(logging.WARNING, logger="dreammix.sampling"):
        (out,) = inpaint.run_inpaint(_cfg(compose, files, "model=tiny_fooocus", "sampler=reference", f"lora={lora}",
                                          "steps=5", "tas.eliminate=[silver]"))  # fmt: skip
    assert Image.open(out).size == (W, H)
    assert seen["sampler"] == SamplerSpec(
        name="reference", base_switch=0.8, sharpness=1.0, size_positive=1.5, size_negative=0.8, size_end=0.3,
        start="fill_noise", tas_context="a photo of a sks", upscale_model="caidas/swin2SR-classical-sr-x4-64",
    )  # fmt: skip
    assert seen["guidance_scale"] == 4.0
    config = seen["scheduler"].config
    assert type(seen["scheduler"]).__name__ == "DPMSolverMultistepScheduler"
    assert config.algorithm_type == "sde-dpmsolver++" and config.use_karras_sigmas
    # offline: the upscaler's weights are absent → a warning, the plain resize
    assert any("swin2SR" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_cli_reference_preset_on_tiny_fooocus(files, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # full tracebacks off
    env.update(PYTHONPATH=str(REPO_ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               DREAMMIX_CACHE=str(tiny_model_dir.parent))  # fmt: skip
    args = [f"image={files / 'room.png'}", f"mask={files / 'room_mask.png'}", "prompt=a sks red can", "steps=5",
            f"out={files / 'cli.png'}", "progress=false"]  # fmt: skip
    result = subprocess.run([sys.executable, str(REPO_ROOT / "src" / "inpaint.py"), *args, "model=tiny_fooocus", "sampler=reference"],
                            cwd=files, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(files / "cli.png").size == (W, H)
    refused = subprocess.run([sys.executable, str(REPO_ROOT / "src" / "inpaint.py"), *args, "model=tiny", "sampler=reference"],
                             cwd=files, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        "error: sampler.base_switch=0.8 runs the last steps on the unpatched SDXL base, but model=tiny has no "
        "unpatched base (use model=fooocus, or sampler.base_switch=1.0) (sampler.base_switch)"
    ]


def test_benchmark_calls_get_the_sampler_and_resume_refuses_another(compose, tmp_path):
    """src/eval.py: the knobs reach every pipeline call and the prompt pre-encoding, are part of the
    run's settings (a resume with another sampler is refused), and a base that cannot honour them
    is refused before any model loads."""
    from test_eval import StubPipe, StubSuite, eval_cfg, make_bench, make_lora, make_subject
    from types import SimpleNamespace

    from dreammix.evaluate import evaluate

    bench = SimpleNamespace(manifest=make_bench(tmp_path / "bench"), refs=make_subject(tmp_path / "refs"),
                            lora=make_lora(tmp_path / "lora", {"tau_in": 1.5, "tau_out": 0.7, "beta": 0.4}))  # fmt: skip
    never = lambda c: pytest.fail("the model must not load")  # noqa: E731
    with pytest.raises(DreamMixError, match="model=tiny has no unpatched base"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", "sampler=reference"), pipe_factory=never)

    pipe = StubPipe()
    knobs = ["model=tiny_fooocus", "sampler.sharpness=2", "sampler.tas_context='a photo of a sks'", "sampler.base_switch=0.8"]
    evaluate(eval_cfg(compose, tmp_path, bench, "run", "tasks=[attribute]", "limit=2", *knobs),
             pipe_factory=lambda c: pipe, metric_suite=StubSuite())  # fmt: skip
    assert len(pipe.calls) == 2
    assert {(c["sampler"].sharpness, c["sampler"].tas_context, c["sampler"].base_switch) for c in pipe.calls} == {
        (2.0, "a photo of a sks", 0.8)
    }
    assert pipe.encoded and {e["tas_context"] for e in pipe.encoded} == {"a photo of a sks"}
    with pytest.raises(DreamMixError, match="cannot resume into this run_dir: sampler"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", "tasks=[attribute]", "limit=2", *knobs[:-1]), pipe_factory=never)
