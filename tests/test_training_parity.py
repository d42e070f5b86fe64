"""Training sees what inference sees: the training step's UNet input and target, checked against
diffusers' own ``StableDiffusionXLInpaintPipeline`` and against the DDPM forward process itself.

A LoRA learns whatever its input/target pairs say. If training fed the UNet another channel
order, unscaled latents or an unmasked image than the inpainting pipeline does at inference, or
regressed onto anything but ε (or v), every test that compares the code with itself would still
pass while the LoRA learned the wrong thing. Expected values here come from diffusers' pipeline
(with its randomness pinned) and from ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` with ᾱ computed
by hand, never from ``dreammix.module``'s helpers.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

PROMPT = "a photo of sks can"
SIZE = 64  # the tiny model's resolution: encode_examples neither crops nor resizes


class _FirstUNetCall(Exception):
    """Raised by the capture hook to stop a pipeline after its first UNet call."""


def alphas_cumprod_by_hand(config) -> torch.Tensor:
    """ᾱ_t = prod_{s<=t} (1 - β_s) for SDXL's "scaled_linear" schedule, in float64."""
    assert config.beta_schedule == "scaled_linear"
    betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas))


def eps_from_noisy(noisy: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Invert the forward process: ε = (x_t - sqrt(ᾱ_t) x_0) / sqrt(1 - ᾱ_t), per item."""
    a = abar[t.long()].view(-1, 1, 1, 1)
    return ((noisy.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()


@contextmanager
def unet_calls(unet, stop: bool = False):
    """Record (sample, timestep, conditioning) of every UNet call with a forward pre-hook;
    ``stop`` raises :class:`_FirstUNetCall` after the first one (nothing after it is needed)."""
    calls: list[dict] = []

    def hook(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        added = kwargs["added_cond_kwargs"]
        calls.append({"sample": sample.detach().clone(), "t": torch.as_tensor(timestep).detach().clone(),
                      "embeds": kwargs["encoder_hidden_states"].detach().clone(),
                      "pooled": added["text_embeds"].detach().clone(), "time_ids": added["time_ids"].detach().clone()})
        if stop:
            raise _FirstUNetCall

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if stop:
            with pytest.raises(_FirstUNetCall):
                yield calls
        else:
            yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """diffusers' own SDXL inpainting pipeline over the tiny weights (no dreammix loading code)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    p = StableDiffusionXLInpaintPipeline.from_pretrained(str(tiny_model_dir))
    p.set_progress_bar_config(disable=True)
    return p


def _image_and_mask(box: tuple[int, int, int, int]) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth-ish colours plus pixel noise
    pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8)).astype(np.int16) + rng.integers(-20, 21, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    mask = np.zeros((SIZE, SIZE), dtype=np.float32)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 1.0
    return image, mask


def _encode(pipe, image, mask):
    """Our real training-data path: encode_examples through FrozenInputEncoder."""
    from dreammix.data.frozen import FrozenInputEncoder, encode_examples
    from dreammix.data.subjects import MaskedImage

    return encode_examples([MaskedImage(image, mask, Path("item.png"))], [PROMPT], FrozenInputEncoder(pipe), SIZE)


def _ddpm(pipe, prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)  # as train.py builds it


@pytest.fixture(scope="module")
def module(pipe):
    """The training module (seed 0) on a copy of the tiny UNet, with a fresh LoRA."""
    from dreammix.models.lora import LoraSpec
    from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

    return DreamMixLoRAModule(copy.deepcopy(pipe.unet), _ddpm(pipe), LoraSpec(), LossSpec(), OptimSpec(), seed=0)


class _RecordingStubUNet(torch.nn.Module):
    """Stands in for the UNet where only its input matters: a 9-channel config, a zero prediction."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(in_channels=9)

    def forward(self, sample, timestep, **kwargs):
        return (torch.zeros_like(sample[:, :4]),)


def _batch(dataset, items: list[int], position: int) -> dict:
    part = dataset.batch(torch.tensor(items))
    return {"source": {**part, "position": torch.arange(position, position + len(items))}}


def _clean_latents_by_diffusers(pipe, image) -> torch.Tensor:
    """x_0 = VAE posterior mean × scaling_factor, with diffusers' own image preprocessing."""
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image, height=SIZE, width=SIZE).float()
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@pytest.fixture(scope="module")
def on_grid(pipe):
    """An image with a mask on the 8-px latent grid, and its encoded training set."""
    image, mask = _image_and_mask((16, 24, 40, 56))
    return image, mask, _encode(pipe, image, mask)


def test_training_unet_input_matches_diffusers_inpaint_pipeline(pipe, module, on_grid, monkeypatch):
    """Channel by channel (noisy 0-3, mask 4, masked-image latents 5-8) plus the conditioning, the
    training step's UNet input equals what diffusers' SDXL inpainting pipeline feeds its UNet for the
    same image, mask, prompt, noise and timestep: the LoRA trains on the input it will see at inference.

    Randomness pinned without our code: diffusers' posterior sample returns the mean (training uses
    the posterior mean), its ``randn_tensor`` returns a fixed ε; training's ``torch.randn`` /
    ``torch.randint`` return the same ε and diffusers' first timestep. strength < 1, so diffusers'
    first input is Euler's ``(x0 + σ ε) / sqrt(σ² + 1)`` = DDPM's ``sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε``.
    """
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as sdxl_inpaint
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    image, mask, dataset = on_grid
    eps = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(123))

    def fixed_noise(shape, *args, **kwargs):
        assert tuple(shape) == tuple(eps.shape)
        return eps.clone()

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    monkeypatch.setattr(sdxl_inpaint, "randn_tensor", fixed_noise)
    mask_image = Image.fromarray((mask * 255).astype(np.uint8), "L")
    with unet_calls(pipe.unet, stop=True) as calls:
        pipe(PROMPT, image=image, mask_image=mask_image, strength=0.75, num_inference_steps=4, guidance_scale=1.0,
             height=SIZE, width=SIZE, output_type="latent")
    ref = calls[0]
    t = int(ref["t"].reshape(-1)[0])
    assert float(ref["t"].reshape(-1)[0]) == t and 0 < t < 999  # an intermediate training timestep (501)

    real_randn, real_randint = torch.randn, torch.randint
    with monkeypatch.context() as m, unet_calls(module.unet) as train_calls, torch.no_grad():
        m.setattr(torch, "randn", lambda shape, *a, **k: fixed_noise(shape).to(k.get("dtype") or torch.float32))
        m.setattr(torch, "randint", lambda low, high, size, *a, **k: torch.full(tuple(size), t, dtype=torch.long))
        module.compute_losses(_batch(dataset, [0], position=0))
    assert torch.randn is real_randn and torch.randint is real_randint
    ours = train_calls[0]

    assert ours["sample"].shape == ref["sample"].shape == (1, 9, SIZE // 8, SIZE // 8)
    assert int(ours["t"].reshape(-1)[0]) == t
    torch.testing.assert_close(ours["sample"][:, :4], ref["sample"][:, :4], rtol=0, atol=1e-5)  # noisy latents
    assert torch.equal(ours["sample"][:, 4:5], ref["sample"][:, 4:5])  # latent mask
    assert 0 < ref["sample"][:, 4].sum() < ref["sample"][:, 4].numel()
    torch.testing.assert_close(ours["sample"][:, 5:], ref["sample"][:, 5:], rtol=0, atol=1e-5)  # masked-image latents
    torch.testing.assert_close(ours["embeds"], ref["embeds"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["pooled"], ref["pooled"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["time_ids"].float(), ref["time_ids"].float())
    # and the noisy channels are the forward process from first principles (ᾱ by hand)
    abar = alphas_cumprod_by_hand(pipe.scheduler.config)[t]
    x0 = _clean_latents_by_diffusers(pipe, image)
    torch.testing.assert_close(ours["sample"][:, :4], (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float(),
                               rtol=0, atol=1e-5)


def test_off_grid_mask_training_and_dreammix_pipeline_share_the_max_pooled_latent_mask(pipe, module, monkeypatch):
    """A mask edge inside a latent cell: diffusers would take a nearest sample, DESIGN §3 takes the
    max over the 8×8 pixels (the object is never under-covered), and training and our inference
    pipeline must agree on it — and on the masked-image latents — or the LoRA learns another mask."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from dreammix.pipeline import DreamMixInpaintPipeline

    image, mask = _image_and_mask((13, 19, 37, 46))
    dataset = _encode(pipe, image, mask)
    with unet_calls(module.unet) as train_calls, torch.no_grad():
        module.compute_losses(_batch(dataset, [0], position=0))

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    ours = DreamMixInpaintPipeline.from_base(pipe)
    with unet_calls(ours.unet, stop=True) as calls:  # λ = 0: one stage on the full 64-px image
        ours(image, Image.fromarray((mask * 255).astype(np.uint8), "L"), PROMPT, num_inference_steps=2,
             guidance_scale=1.0, lambda_=0.0, blend=False, generator=torch.Generator().manual_seed(0))
    by_hand = torch.from_numpy(mask.reshape(SIZE // 8, 8, SIZE // 8, 8).max(axis=(1, 3)))  # any pixel of the cell
    assert torch.equal(train_calls[0]["sample"][0, 4], by_hand)
    assert torch.equal(calls[0]["sample"][0, 4], by_hand)
    torch.testing.assert_close(train_calls[0]["sample"][:, 5:], calls[0]["sample"][:, 5:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_follows_prediction_type(pipe, module, on_grid, monkeypatch, prediction_type):
    """The regression target is the DDPM noise ε (``epsilon``) or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0
    (``v_prediction``), as in diffusers' training examples; ε is recovered from the UNet's noisy
    input with x0 = VAE mean × scaling_factor computed by diffusers and ᾱ computed by hand."""
    import dreammix.module as module_mod

    image, _, dataset = on_grid
    monkeypatch.setattr(module, "noise_scheduler", _ddpm(pipe, prediction_type))
    targets = []
    real_loss = module_mod.reweighted_mse

    def spy(pred, target, *args, **kwargs):
        targets.append(target.detach().clone())
        return real_loss(pred, target, *args, **kwargs)

    monkeypatch.setattr(module_mod, "reweighted_mse", spy)
    with unet_calls(module.unet) as calls, torch.no_grad():
        module.compute_losses(_batch(dataset, [0, 0, 0, 0], position=8))  # one image, 4 noise draws

    noisy, t = calls[0]["sample"][:, :4], calls[0]["t"].long()
    assert len(set(t.tolist())) == 4
    abar = alphas_cumprod_by_hand(pipe.scheduler.config)
    x0 = _clean_latents_by_diffusers(pipe, image).expand_as(noisy)
    eps = eps_from_noisy(noisy, x0, t, abar)
    assert 0.7 < eps.std() < 1.3  # a plausible N(0, 1) draw, not an artefact of a wrong x0
    if prediction_type == "epsilon":
        expected = eps
    else:
        a = abar[t].view(-1, 1, 1, 1)
        expected = (a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()).float()
    (target,) = targets
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)


def test_noise_and_timesteps_vary_across_micro_batches_and_steps(pipe, module, monkeypatch):
    """Over 64 micro-batches of the real data stream (sampler + positioned items), the timesteps
    cover [0, 1000) uniformly (Kolmogorov-Smirnov) and the noise is a fresh N(0, 1) draw for every
    item and micro-batch — so also for consecutive steps and the micro-batches of one accumulation
    window — yet the same for the same stream position (what makes resuming exact)."""
    from torch.utils.data import DataLoader

    from dreammix.data.datamodule import PositionedItems, StepIndexedSampler
    from dreammix.data.frozen import CachedInpaintSet

    g = torch.Generator().manual_seed(5)
    n_items, batch_size, n_micro = 3, 2, 64
    dataset = CachedInpaintSet(
        latents=torch.randn(n_items, 4, 8, 8, generator=g), masked_latents=torch.randn(n_items, 4, 8, 8, generator=g),
        masks=(torch.rand(n_items, 1, 8, 8, generator=g) > 0.5).float(), image_index=torch.arange(n_items),
        prompt_embeds=torch.randn(1, 77, 64, generator=g), pooled_embeds=torch.randn(1, 32, generator=g),
        prompt_index=torch.zeros(n_items, dtype=torch.long), time_ids=torch.tensor([64.0, 64, 0, 0, 64, 64]),
    )
    loader = DataLoader(PositionedItems(dataset), batch_size=batch_size, sampler=StepIndexedSampler(n_items, batch_size, seed=0),
                        collate_fn=lambda b: b)
    monkeypatch.setattr(module, "unet", _RecordingStubUNet())  # only the UNet's input is looked at
    abar = alphas_cumprod_by_hand(pipe.scheduler.config)
    noises, timesteps, batches = [], [], []
    with unet_calls(module.unet) as calls, torch.no_grad():
        for part in itertools.islice(loader, n_micro):
            module.compute_losses({"source": part})
            call = calls[-1]
            t = call["t"].long()
            noises.append(eps_from_noisy(call["sample"][:, :4], part["latents"], t, abar))
            timesteps.append(t)
            batches.append(part)
        module.compute_losses({"source": batches[5]})  # the same stream position again

    assert [int(b["position"][0]) for b in batches[:3]] == [0, 2, 4]
    t = torch.cat(timesteps).numpy()
    assert t.min() < 100 and t.max() >= 900 and len(set(t.tolist())) > 100
    ts = np.sort(t)
    n = len(ts)
    u = (ts + 0.5) / 1000.0  # uniform on {0, ..., 999}, as a continuous variable on [0, 1)
    ks = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(0, n) / n))
    assert ks < 0.2, f"timesteps not uniform on [0, 1000): KS distance {ks:.3f}"

    noise = torch.stack(noises)  # (micro-batch, item, 4, 8, 8)
    assert abs(noise.mean().item()) < 0.03 and 0.97 < noise.std().item() < 1.03
    flat = noise.reshape(n_micro * batch_size, -1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
    corr = flat @ flat.T / (flat.shape[1] - 1) - torch.eye(len(flat))
    assert corr.abs().max() < 0.4, "two items/micro-batches share (part of) their noise"
    assert torch.equal(calls[-1]["sample"], calls[5]["sample"]) and torch.equal(calls[-1]["t"], calls[5]["t"])
