"""A tiny model that learns (issue 11, part 1): fine-tune the tiny inpainting UNet on ONE
(image, mask) pair with our training code, then inpaint the same mask with our pipeline.

Why: the training step's noise, timesteps, target, VAE scaling and UNet input layout can each be
wrong while every unit test passes — the model then learns something the inference pipeline never
asks for. A diffusion model fitted to one sample denoises every start towards that sample, so here
the trained model must *reproduce* its training image inside the mask; any training/inference
disagreement shows up as a generation far from it.

Training goes through our code only: ``encode_examples`` / ``FrozenInputEncoder`` build the cached
inputs, ``DreamMixLoRAModule.compute_losses`` draws noise and timesteps, builds the target and the
9-channel UNet input and computes the Eq. 7 loss; the test only owns the optimizer loop (a full
fine-tune of the UNet: fastest to memorise one image). Expected values come from diffusers alone:
the training latents are ``vae.encode(image_processor.preprocess(image)).latent_dist.mean ·
scaling_factor``, the expected switch image ``image_processor.postprocess(vae.decode(latents /
scaling_factor))``.

Set-up decisions (on a private copy of the tiny model folder):

* The tiny VAE is random: its posterior std (~0.9) dwarfs the spread of its means (~0.17), so
  diffusers' posterior *sample* of the masked image (what the pipeline feeds the UNet) would be
  nearly pure noise, unlike a real, nearly deterministic SDXL VAE. The copy's ``quant_conv`` logvar
  rows are set to log σ² = −30: encoding becomes deterministic, as for a trained VAE.
* Its ``scaling_factor`` is set as Stable Diffusion's was chosen, 1 / std of the latents (here of
  our image): unit-variance latents against unit-variance noise. With the tiny model's 0.13025 they
  would have std 0.02, far below what a short fine-tune resolves.
* The scheduler config gets SDXL's ``clip_sample: false`` / ``set_alpha_to_one: false`` (in the real
  ``scheduler_config.json``, absent from the tiny one): otherwise the DDIM swap clips x₀ to [−1, 1],
  which unit-variance latents exceed.
* Guidance scale 1 (no CFG): training conditions on the prompt only, the unconditional branch is
  never trained, so CFG would extrapolate along an untrained direction.
* A 32 px square mask on the 8 px latent grid, ``crop_scale=2``: the LCG crop m' is the whole
  image, so λ = 1's crop latents are aligned with the image latents.
* λ = 0.7 passes the random VAE's decode → encode round trip at the LCG → GCH switch; for an
  untrained VAE that loses the image (``encode(decode(z*))`` is farther from z* than a flat fill),
  so no UNet could bring the *final* λ = 0.7 latents near z*. For λ = 0.7 the test checks the LCG
  result instead: the switch image x^G (decoded, pasted) against ``decode(z*)`` inside the mask.
  GCH's own denoising is what λ = 0 checks.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from dreammix.inpaint import SCHEDULERS

PROMPT = "a photo of sks toy"
SIZE = 64
MASK_BOX = (16, 48)  # rows = cols: a 32 px square on the 8 px latent grid -> latent cells 2..5
CROP_SCALE = 2.0  # m' side = 2 x 32 = 64: the LCG crop is the whole image
INFERENCE_STEPS = 10
TRAIN_STEPS = 150
BATCH = 8
LR = 2e-3
# Pass thresholds as fractions of the spread of the expected values (_spread). Measured over 5
# training seeds: trained 0.016-0.039 (latents) and 0.10-0.25 (switch image); the weakest of the
# issue's training mutations (the same noise and timestep every step) 0.17-1.8 and 0.55-1.9.
LATENT_TOLERANCE = 0.08
SWITCH_TOLERANCE = 0.4

LATENT_INSIDE = slice(MASK_BOX[0] // 8, MASK_BOX[1] // 8)
PIXEL_INSIDE = slice(MASK_BOX[0] + 8, MASK_BOX[1] - 8)  # clear of the paste feathering


def _blobs_image() -> PIL.Image.Image:
    """Smooth colour blobs: clear structure inside and outside the mask, no pixel noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1.0)
    img = np.zeros((SIZE, SIZE, 3))
    blobs = [((0.3, 0.3), 0.18, (1.0, 0.2, 0.1)), ((0.6, 0.7), 0.2, (0.1, 0.3, 1.0)),
             ((0.75, 0.3), 0.15, (0.2, 0.9, 0.2)), ((0.45, 0.5), 0.12, (1.0, 1.0, 0.2))]  # fmt: skip
    for (cy, cx), s, colour in blobs:
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None] * np.array(colour)
    return PIL.Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


def _mask() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.float32)
    m[MASK_BOX[0] : MASK_BOX[1], MASK_BOX[0] : MASK_BOX[1]] = 1
    return m


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: the tiny model's ops are too small to gain from more, and on a busy
    machine a second thread only contends (measured: several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _make_learnable_copy(src: Path, dst: Path, image: PIL.Image.Image) -> None:
    """Copy the tiny model; deterministic VAE with unit-variance latents, SDXL's scheduler flags."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    shutil.copytree(src, dst)
    vae = AutoencoderKL.from_pretrained(dst / "vae")
    with torch.no_grad():
        logvar_rows = slice(vae.config.latent_channels, None)  # quant_conv -> (mean, logvar)
        vae.quant_conv.weight[logvar_rows] = 0.0
        vae.quant_conv.bias[logvar_rows] = -30.0
        pixels = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=SIZE, width=SIZE)
        std = vae.encode(pixels).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(dst / "vae", safe_serialization=True)
    sched_file = dst / "scheduler" / "scheduler_config.json"
    config = json.loads(sched_file.read_text())
    config.update(clip_sample=False, set_alpha_to_one=False)
    sched_file.write_text(json.dumps(config))


def _load(model_dir: Path):
    from dreammix.pipeline import DreamMixInpaintPipeline

    pipe = DreamMixInpaintPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _probe(unet) -> torch.Tensor:
    """The UNet's output on a fixed input (checks that the saved UNet is the trained one)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(
            torch.randn(1, 9, 8, 8, generator=g), torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
            added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                               "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
        ).sample  # fmt: skip


def _fine_tune(model_dir: Path, image: PIL.Image.Image, mask: np.ndarray, steps: int, seed: int) -> torch.Tensor:
    """Full fine-tune of the UNet in ``model_dir`` on one (image, mask) pair through our cached
    inputs and ``DreamMixLoRAModule.compute_losses``; the trained UNet is saved back into
    ``model_dir``. Returns its :func:`_probe`."""
    from diffusers import DDPMScheduler

    from dreammix.data.frozen import FrozenInputEncoder, encode_examples
    from dreammix.data.subjects import MaskedImage
    from dreammix.models.lora import LoraSpec
    from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

    pipe = _load(model_dir)
    data = encode_examples([MaskedImage(image, mask, model_dir / "image.png")], [PROMPT], FrozenInputEncoder(pipe), SIZE)
    unet = pipe.unet
    module = DreamMixLoRAModule(  # the noise scheduler as train.py builds it
        unet, DDPMScheduler.from_config(pipe.scheduler.config), LoraSpec(), LossSpec(), OptimSpec(), seed=seed
    )
    # Full fine-tune: every base weight trains; the LoRA the module attached (an identity at
    # init) is left frozen and fused in before saving.
    params = [p for p in unet.parameters() if not p.requires_grad]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)  # linear decay
    items = torch.zeros(BATCH, dtype=torch.long)
    for step in range(steps):
        # the stream position numbers the micro-batch, as the datamodule does
        batch = {"source": {**data.batch(items), "position": torch.arange(step * BATCH, (step + 1) * BATCH)}}
        loss = module.compute_losses(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.fuse_lora()  # the adapter into the base weights, then plain diffusers layers again
    unet.unload_lora()
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    return _probe(unet)


@dataclass
class Learned:
    image: PIL.Image.Image
    mask: np.ndarray
    untrained: object  # DreamMixInpaintPipeline before training ...
    trained: object  # ... and loaded again from the same folder after it
    latents: torch.Tensor  # expected: the training image's latents (diffusers' encode)
    decoded: np.ndarray  # expected switch image: the decoded training latents, uint8 (H, W, 3)
    cache: dict = field(default_factory=dict)


def _learn(tiny_model_dir: Path, workdir: Path, steps: int = TRAIN_STEPS, seed: int = 0) -> Learned:
    image, mask = _blobs_image(), _mask()
    model_dir = workdir / "tiny-learnable"
    _make_learnable_copy(tiny_model_dir, model_dir, image)
    untrained = _load(model_dir)
    with torch.no_grad():
        vae, processor = untrained.vae, untrained.image_processor
        sf = vae.config.scaling_factor
        latents = vae.encode(processor.preprocess(image, height=SIZE, width=SIZE)).latent_dist.mean * sf
        decoded = np.asarray(processor.postprocess(vae.decode(latents / sf).sample, output_type="pil")[0])
    with _one_thread():
        probe = _fine_tune(model_dir, image, mask, steps, seed)
    trained = _load(model_dir)
    torch.testing.assert_close(_probe(trained.unet), probe)
    return Learned(image, mask, untrained, trained, latents, decoded)


@pytest.fixture(scope="module")
def learned(tiny_model_dir, tmp_path_factory) -> Learned:
    return _learn(tiny_model_dir, tmp_path_factory.mktemp("learning"))


def _sample(pipe, learned: Learned, scheduler: str, lambda_: float, seed: int = 0):
    """Inpaint the training mask: final latents (λ ∈ {0, 1}) or the switch image x^G (0 < λ < 1)."""
    from dreammix.inpaint import set_scheduler

    base = pipe.scheduler
    set_scheduler(pipe, scheduler)
    switch = 0 < lambda_ < 1
    try:
        with _one_thread():
            out = pipe(
                learned.image, learned.mask, PROMPT, num_inference_steps=INFERENCE_STEPS, guidance_scale=1.0,
                lambda_=lambda_, crop_scale=CROP_SCALE, generator=torch.Generator().manual_seed(seed),
                output_type="pil" if switch else "latent",
            )  # fmt: skip
    finally:
        pipe.scheduler = base
    if lambda_ > 0:
        assert out.crop_box == (0, 0, SIZE, SIZE)  # m' = the whole image: crop latents = image latents
    return np.asarray(out.lcg_images[0]) if switch else out.images


def _error(learned: Learned, pipe, scheduler: str, lambda_: float) -> float:
    """Mean squared error inside the mask against the expected latents (λ ∈ {0, 1}) or the
    expected switch image (uint8 levels², away from the feathered edge)."""
    key = (id(pipe), scheduler, lambda_)
    if key not in learned.cache:
        out = _sample(pipe, learned, scheduler, lambda_)
        if isinstance(out, np.ndarray):
            diff = out[PIXEL_INSIDE, PIXEL_INSIDE].astype(np.float64) - learned.decoded[PIXEL_INSIDE, PIXEL_INSIDE]
        else:
            diff = (out - learned.latents)[:, :, LATENT_INSIDE, LATENT_INSIDE]
        learned.cache[key] = float((diff**2).mean())
    return learned.cache[key]


def _spread(learned: Learned, lambda_: float) -> float:
    """Mean squared deviation of the expected values inside the mask from their per-channel mean:
    the error of a flat fill with the right average colour. Far below it = the structure was learned."""
    if 0 < lambda_ < 1:
        values = learned.decoded[PIXEL_INSIDE, PIXEL_INSIDE].astype(np.float64).transpose(2, 0, 1)
    else:
        values = learned.latents[0, :, LATENT_INSIDE, LATENT_INSIDE].numpy().astype(np.float64)
    return float(((values - values.mean(axis=(1, 2), keepdims=True)) ** 2).mean())


def _check(learned: Learned, scheduler: str, lambda_: float) -> None:
    trained = _error(learned, learned.trained, scheduler, lambda_)
    untrained = _error(learned, learned.untrained, scheduler, lambda_)
    spread = _spread(learned, lambda_)
    tolerance = SWITCH_TOLERANCE if 0 < lambda_ < 1 else LATENT_TOLERANCE
    msg = f"{scheduler} λ={lambda_}: error trained {trained:.4g}, untrained {untrained:.4g}, flat fill {spread:.4g}"
    assert trained < 0.3 * untrained, msg  # much closer than before training ...
    assert trained < tolerance * spread, msg  # ... and close in absolute terms: it learned the image


@pytest.mark.parametrize("lambda_", [0.0, 0.7, 1.0])
def test_fine_tuned_model_inpaints_its_training_image(learned, lambda_):
    """Trained on one (image, mask) by our training step, the model regenerates the image inside
    the mask through our pipeline (λ = 0: GCH, Eq. 6; 0.7: LCG, Eq. 3-5, to the switch; 1: LCG)."""
    _check(learned, "default", lambda_)


@pytest.mark.slow
@pytest.mark.parametrize("lambda_", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_fine_tuned_model_inpaints_its_training_image_every_scheduler(learned, scheduler, lambda_):
    """The same with every offered scheduler (training is scheduler-independent, sampling is not)."""
    _check(learned, scheduler, lambda_)
