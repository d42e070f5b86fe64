"""The public code's training knobs (`experiment=reference`), each against hand-computed values,
and the reference preset end to end on the tiny Fooocus base.

Each knob is a named config value that defaults to the paper text's behaviour and switches alone:
`loss.weighting`, `trainer.accumulate_grad_batches` / `max_steps`, `data.mask_mode` (+`blob_grow`),
`data.crop`, `data.vae_latents`, `lora.target_modules`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreammix.data.frozen import FrozenInputEncoder, InputOptions, encode_examples, random_crop_resize
from dreammix.data.masks import bezier_blob_mask, bounding_box, box_mask, quadratic_bezier
from dreammix.data.subjects import MaskedImage
from dreammix.errors import DreamMixError
from dreammix.losses import reweighted_mse

pytestmark = pytest.mark.usefixtures("one_thread")

#: The knobs of experiment=reference and what the paper-text defaults are.
PAPER = {"loss.weighting": "squared_error", "trainer.accumulate_grad_batches": 1, "data.mask_mode": "augment",
         "data.crop": "center", "data.vae_latents": "mean", "lora.target_modules": ["to_k", "to_v"],
         "loss.tau_out": 0.7, "data.mask_variants": 4, "data.regular_mask_variants": 1}  # fmt: skip
REFERENCE = {"loss.weighting": "pred_and_target", "trainer.accumulate_grad_batches": 4, "data.mask_mode": "blob",
             "data.crop": "random", "data.vae_latents": "sample", "lora.target_modules": ["to_k", "to_v", "to_out.0"],
             "loss.tau_out": 0.6, "data.mask_variants": 10, "data.regular_mask_variants": 3}  # fmt: skip


def _get(cfg, key):
    from omegaconf import ListConfig, OmegaConf

    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


# ---- configs ----------------------------------------------------------------------------------


def test_reference_experiment_sets_every_knob_and_defaults_are_the_paper_text(compose):
    paper = compose("train", ["run_dir=/tmp/x"])
    reference = compose("train", ["experiment=reference", "run_dir=/tmp/x"])
    for key in PAPER:
        assert _get(paper, key) == PAPER[key], key
        assert _get(reference, key) == REFERENCE[key], key
    assert reference.trainer.max_steps == 1000 and reference.loss.regular_mode == "sampled" and reference.loss.regular_prob == 0.3
    assert list(reference.data.blob_grow) == [0.1, 1.0] and reference.lora.alpha == reference.lora.rank == 4
    # the public code's optimizer: AdamW, decoupled weight decay 1e-4 (the paper text: Adam)
    assert (reference.optim.name, reference.optim.weight_decay) == ("adamw", 1e-4) and paper.optim.name == "adam"
    # each knob alone: one override changes that value and nothing else of the reference set
    for key, value in (("data.crop", "random"), ("data.vae_latents", "sample"), ("data.mask_mode", "blob")):
        alone = compose("train", [f"{key}={value}", "run_dir=/tmp/x"])
        assert _get(alone, key) == value
        assert all(_get(alone, k) == PAPER[k] for k in PAPER if k != key)
    assert compose("train", ["loss=reference", "run_dir=/tmp/x"]).loss.weighting == "pred_and_target"
    assert reference.data.require_regular and reference.data.regular_dir.endswith("can_t2i_segment")
    # the DreamBooth variant of the public code keeps every data knob, unit weights, no regular data
    db = compose("train", ["experiment=reference_dreambooth", "run_dir=/tmp/x"])
    assert (db.loss.tau_in, db.loss.tau_out, db.loss.beta) == (1.0, 1.0, 0.0) and db.data.mask_mode == "blob"


@pytest.mark.parametrize(
    "override,message",
    [("data.crop=middle", "crop must be one of"), ("data.vae_latents=mode", "vae_latents must be one of"),
     ("data.mask_mode=box", "mask_mode must be one of"), ("data.blob_grow=[1.0,0.1]", "blob_grow"),
     ("loss.weighting=squared", "weighting must be one of"), ("data.regular_mask_variants=0", "regular_mask_variants")],
)  # fmt: skip
def test_bad_reference_knobs_are_one_line_errors(compose, override, message):
    from dreammix.train import train_specs

    with pytest.raises(DreamMixError, match=message):
        train_specs(compose("train", ["model=tiny", override, "run_dir=/tmp/x", "subject.image_dir=/"]))


# ---- loss ------------------------------------------------------------------------------------


def test_reference_loss_is_mean_of_weighted_prediction_minus_weighted_target_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # w = 1.5, 0.6, 0.6, 1.5; (w·p − w·t)² = (1.5)², (0.6)², (1.2)², (3)² = 2.25, 0.36, 1.44, 9
    expected = (2.25 + 0.36 + 1.44 + 9.0) / 4
    assert reweighted_mse(pred, target, mask, 1.5, 0.6, weighting="pred_and_target").item() == pytest.approx(expected)
    # the paper's Eq. 7 on the same numbers: w·(p − t)² = 1.5, 0.6, 2.4, 6
    assert reweighted_mse(pred, target, mask, 1.5, 0.6).item() == pytest.approx((1.5 + 0.6 + 2.4 + 6.0) / 4)
    with pytest.raises(ValueError, match="weighting"):
        reweighted_mse(pred, target, mask, weighting="nope")


def test_training_step_uses_the_configured_weighting(tiny_model_dir):
    """The module's source loss under loss=reference values, recomputed from the UNet's own input and
    output: ε from x_t = sqrt(ᾱ)x0 + sqrt(1−ᾱ)ε, then mean((w·ε̂ − w·ε)²) with w = 1.5 / 0.6."""
    from test_train import _module_and_batch

    from dreammix.module import LossSpec

    spec = LossSpec(tau_in=1.5, tau_out=0.6, beta=0.0, weighting="pred_and_target")
    module, batch = _module_and_batch(tiny_model_dir, spec)
    seen = []
    handle = module.unet.register_forward_hook(lambda _m, args, _k, out: seen.append((args[0].double(), args[1], out[0].double())), with_kwargs=True)
    with torch.no_grad():
        losses = module.compute_losses(batch)
    handle.remove()
    ((sample, t, pred),) = seen
    cfg = module.noise_scheduler.config
    betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=np.float64) ** 2
    abar = torch.from_numpy(np.cumprod(1.0 - betas))[t.long()].view(-1, 1, 1, 1)
    eps = (sample[:, :4] - abar.sqrt() * batch["source"]["latents"].double()) / (1 - abar).sqrt()
    w = torch.where(batch["source"]["mask"] > 0.5, 1.5, 0.6).double()
    expected = ((w * pred - w * eps) ** 2).mean().item()
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["loss"].item() != pytest.approx((w * (pred - eps) ** 2).mean().item(), rel=1e-3)


# ---- Bézier blobs ----------------------------------------------------------------------------


def _disc(h=64, w=64, cy=30, cx=25, r=10):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).float()


def test_quadratic_bezier_by_hand():
    p0, p1, p2 = torch.tensor([0.0, 0.0]), torch.tensor([2.0, 4.0]), torch.tensor([4.0, 0.0])
    # t = 0, 0.5, 1: p0, 0.25·p0 + 0.5·p1 + 0.25·p2 = (2, 2), p2
    assert quadratic_bezier(p0, p1, p2, 3).tolist() == [[0.0, 0.0], [2.0, 2.0], [4.0, 0.0]]


def test_blob_masks_cover_the_box_stay_in_the_grown_box_and_differ_from_the_silhouette():
    silhouette = _disc()
    top, left, bottom, right = bounding_box(silhouette)
    h, w = bottom - top, right - left
    g = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(40):
        blob = bezier_blob_mask(silhouette, (0.1, 1.0), g)
        assert set(blob.unique().tolist()) <= {0.0, 1.0}
        assert blob[top:bottom, left:right].min() == 1  # the whole box
        assert (blob * silhouette).sum() == silhouette.sum()  # so the whole object
        assert (blob - silhouette).sum() > 0.25 * silhouette.sum()  # not the silhouette
        # inside the box grown by the largest ratio (1.0 · box size per side)
        bt, bl, bb, br = bounding_box(blob)
        assert bt >= top - h and bl >= left - w and bb <= bottom + h and br <= right + w
        sizes.add(int(blob.sum()))
    assert len(sizes) > 30  # random: no two alike (almost)


def test_blob_growth_follows_blob_grow():
    silhouette = _disc()
    top, left, bottom, right = bounding_box(silhouette)
    g = torch.Generator().manual_seed(1)
    # no growth: every control point on the box, the blob is exactly the box
    assert torch.equal(bezier_blob_mask(silhouette, (0.0, 0.0), g), box_mask(silhouette, 0))
    # growth 1.0: each side's curve is pulled to the grown side, so reaches at least half way out
    h = bottom - top
    for _ in range(10):
        bt, bl, bb, br = bounding_box(bezier_blob_mask(silhouette, (1.0, 1.0), g))
        assert bt <= top - h // 2 + 1 and bb >= bottom + h // 2 - 1
    assert bezier_blob_mask(torch.zeros(16, 16), (0.1, 1.0), g).sum() == 0  # no object, no blob


def test_blob_mode_masks_every_cached_variant(tmp_path, tiny_fooocus_pipe):
    """mask_mode=blob: no variant is the silhouette (variant 0 included), each covers the box."""
    from dreammix.losses import latent_mask

    disc = _disc()
    example = MaskedImage(image=Image.new("RGB", (64, 64), (90, 120, 30)), mask=disc.numpy(), path=tmp_path / "x.png")
    encoder = FrozenInputEncoder(tiny_fooocus_pipe)
    cached = encode_examples([example], ["a photo of sks thing"], encoder, 64, variants=3, options=InputOptions(mask_mode="blob"))
    plain = encode_examples([example], ["a photo of sks thing"], encoder, 64, variants=3)
    silhouette = latent_mask(disc[None, None])[0]
    box = latent_mask(box_mask(disc, 0)[None, None])[0]
    assert torch.equal(plain.masks[0], silhouette)
    for m in cached.masks:
        assert not torch.equal(m, silhouette) and (m * box).sum() == box.sum()


# ---- random crops and time ids ----------------------------------------------------------------


def test_random_crop_time_ids_carry_the_crop_offset_and_original_size(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)  # H 64, W 128
    mask = np.zeros((64, 128), np.float32)
    mask[20:40, 50:90] = 1
    example = MaskedImage(image=Image.fromarray(pixels), mask=mask, path=tmp_path / "x.png")
    g = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(12):
        crop, cmask, time_ids = random_crop_resize(example, 32, g)
        # short side 64 → 32: the image is resized to 64 × 32, the crop is 32 × 32 at (0, left)
        top, left = int(time_ids[2]), int(time_ids[3])
        assert time_ids.tolist() == [64.0, 128.0, top, left, 32.0, 32.0] and top == 0 and 0 <= left <= 32
        resized = Image.fromarray(pixels).resize((64, 32), Image.BICUBIC).crop((left, 0, left + 32, 32))
        assert torch.equal(crop, torch.from_numpy(np.asarray(resized, np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
        expected_mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((64, 32), Image.NEAREST))[:, left : left + 32]
        assert torch.equal(cmask, torch.from_numpy((expected_mask >= 128).astype(np.float32)))
        offsets.add(left)
    assert len(offsets) > 4


def test_cached_items_carry_their_own_time_ids(tmp_path, tiny_fooocus_pipe):
    rng = np.random.default_rng(1)
    mask = np.zeros((64, 128), np.float32)
    mask[16:48, 40:80] = 1
    example = MaskedImage(image=Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)), mask=mask, path=tmp_path / "x.png")
    encoder = FrozenInputEncoder(tiny_fooocus_pipe)
    cached = encode_examples([example], ["a photo of sks thing"], encoder, 64, variants=6, options=InputOptions(crop="random"))
    batch = cached.batch(torch.arange(6))
    lefts = batch["time_ids"][:, 3]
    assert batch["time_ids"][:, [0, 1, 2, 4, 5]].tolist() == [[64.0, 128.0, 0.0, 64.0, 64.0]] * 6
    assert len(set(lefts.tolist())) > 1
    # each item's clean latents are its own crop's: two items with different offsets differ
    other = int(torch.nonzero(lefts != lefts[0])[0])
    assert not torch.allclose(batch["latents"][0], batch["latents"][other])
    centre = encode_examples([example], ["a photo of sks thing"], encoder, 64, variants=2)
    assert centre.batch(torch.arange(2))["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2


# ---- sampled VAE latents ----------------------------------------------------------------------


def test_sampled_latents_are_posterior_draws(tiny_fooocus_pipe):
    """sample = mean + std·ε, scaled like the mean: (sample − mean)/(std·scale) is standard normal,
    with mean and std read from the VAE's own posterior (diffusers' DiagonalGaussianDistribution)."""
    encoder = FrozenInputEncoder(tiny_fooocus_pipe)
    vae = tiny_fooocus_pipe.vae
    pixels = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = encoder.encode_images(pixels)
    sample = encoder.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(5))
    again = encoder.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(5))
    other = encoder.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    scale = vae.config.scaling_factor
    assert torch.allclose(mean, posterior.mean * scale, atol=1e-5)
    z = (sample - mean) / (posterior.std * scale)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1.0) < 0.1 and z.numel() >= 2000
    assert torch.equal(sample, again) and not torch.allclose(sample, other)


def test_sampled_latents_give_each_cached_item_its_own_draw(tmp_path, tiny_fooocus_pipe):
    example = MaskedImage(image=Image.new("RGB", (64, 64), (10, 200, 90)), mask=_disc().numpy(), path=tmp_path / "x.png")
    encoder = FrozenInputEncoder(tiny_fooocus_pipe)
    cached = encode_examples([example], ["p"], encoder, 64, variants=3, options=InputOptions(vae_latents="sample"))
    batch = cached.batch(torch.arange(3))
    assert not torch.allclose(batch["latents"][0], batch["latents"][1])
    plain = encode_examples([example], ["p"], encoder, 64, variants=3).batch(torch.arange(3))
    assert torch.equal(plain["latents"][0], plain["latents"][1])  # the mean: shared by the variants


# ---- accumulation + end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_fooocus_pipe(_session_cache):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR
    from dreammix.models.loading import load_pipeline, model_spec_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["model=tiny_fooocus", "run_dir=/tmp/x"])
    return load_pipeline(model_spec_from_config(cfg.model))


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from test_data import make_subject

    return make_subject(tmp_path_factory.mktemp("subject"), n=2)


def _train_overrides(tmp_path, subject, *extra):
    return [
        "model=tiny_fooocus", "logger=none", "subject=custom", f"run_dir={tmp_path / 'run'}",
        "subject.name=thing", "subject.class_noun=thing", f"subject.image_dir={subject.image_dir}",
        f"subject.mask_dir={subject.mask_dir}", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "validation.every_n_steps=0", "checkpoint.every_n_steps=0", *extra,
    ]


def test_reference_training_accumulates_four_micro_batches_per_step_then_inpaints(compose, tmp_path, subject, monkeypatch):
    """experiment=reference on the tiny Fooocus base: 2 optimizer steps = 8 micro-batches (Lightning's
    max_steps counts optimizer steps, so the preset's 1,000 are 4,000 micro-batches), every knob in
    the run's inputs, then the LoRA (with to_out.0) inpaints through src/inpaint.py's run_inpaint."""
    from test_data import make_regular

    import dreammix.module as module_mod
    from dreammix.train import train

    steps, positions = [], []  # per micro-batch: optimizer steps done before it, its stream position
    real_step = module_mod.DreamMixLoRAModule.training_step

    def training_step(self, batch, batch_idx):
        steps.append(self.trainer.global_step)
        positions.append(int(batch["source"]["position"][0]))
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(module_mod.DreamMixLoRAModule, "training_step", training_step)
    reg = make_regular(tmp_path / "reg", n=2)
    cfg = compose("train", _train_overrides(tmp_path, subject, "experiment=reference", "trainer.max_steps=2",
                                            f"data.regular_dir={reg}", "data.mask_variants=3"))  # fmt: skip
    assert cfg.trainer.accumulate_grad_batches == 4
    run_dir = train(cfg)
    assert steps == [0, 0, 0, 0, 1, 1, 1, 1]  # an optimizer step after every 4th micro-batch
    assert positions == list(range(8))  # 8 distinct micro-batches of the stream
    info = json.loads((run_dir / "lora" / "dreammix_run.json").read_text())
    assert info["steps"] == 2 and info["lora"]["target_modules"] == ["to_k", "to_v", "to_out.0"]
    assert info["loss"]["weighting"] == "pred_and_target" and info["accumulate_grad_batches"] == 4
    assert info["inputs"] == {"crop": "random", "vae_latents": "sample", "mask_mode": "blob", "blob_grow": [0.1, 1.0],
                              "mask_variants": 3, "regular_mask_variants": 3}  # fmt: skip
    from safetensors.torch import load_file

    weights = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert any(".to_out.0.lora" in k for k in weights) and any(".to_k.lora" in k for k in weights)

    from dreammix.inpaint import run_inpaint

    image = tmp_path / "bg.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    icfg = compose("inpaint", ["model=tiny_fooocus", f"image={image}", f"mask={tmp_path / 'm.png'}", "prompt=a sks red thing",
                               f"lora={run_dir / 'lora'}", "steps=2", "device=cpu", "progress=false", "tas.eliminate=[blue]",
                               f"run_dir={tmp_path / 'inpaint'}", "dif.lambda_=0.6667", "tas.stages=[local]"])  # fmt: skip
    (out,) = run_inpaint(icfg)
    result = np.asarray(Image.open(out))
    assert result.shape == (64, 64, 3)
    assert np.array_equal(result[:4], np.asarray(Image.open(image))[:4])  # far from the mask: the input


# ---- the benchmark's reference preset ---------------------------------------------------------


def test_unknown_preset_is_one_line_error(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(REPO_ROOT / "src" / "benchmark.py"), "bench=tiny", f"bench.root={tmp_path / 'bench'}", "preset=nope"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Could not find 'preset/nope'" in lines[0], result.stderr


@pytest.mark.parametrize(
    "args,message",
    [(["preset=reference", "bench.overrides=['model=tiny','logger=none']"], "preset 'reference' needs a Fooocus base"),
     (["preset=reference", "preset.train_experiments.dif=nope"], "unknown training experiment 'nope' for row 'dif'")],
)  # fmt: skip
def test_preset_that_cannot_run_is_refused_before_any_work(compose, tmp_path, args, message):
    """The reference preset on a base without the Fooocus patch, or naming a missing experiment:
    a DreamMixError (one line, exit 2 from src/benchmark.py) before anything is built or written."""
    from dreammix.benchmark.run import run_benchmark

    cfg = compose("benchmark_run", ["bench=tiny", f"bench.root={tmp_path / 'bench'}", f"run_dir={tmp_path / 'r'}", *args])
    with pytest.raises(DreamMixError, match=message):
        run_benchmark(cfg)
    assert not (tmp_path / "bench").exists()


TINY_TRAIN = ["trainer.max_steps=1", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
              "validation.every_n_steps=0", "checkpoint.every_n_steps=0", "data.mask_variants=2", "data.regular_mask_variants=1"]


def _hydra_list(items):
    return "[" + ",".join(f"'{item}'" for item in items) + "]"


@pytest.mark.slow
def test_tiny_benchmark_reference_preset_end_to_end(compose, shared_data, tmp_path):
    """`make benchmark BENCH=tiny PRESET=reference`: the public code's training for every row (its
    DreamBooth variant for Baseline/+DIF/++TAS, experiment=reference for ++ADM) on the tiny Fooocus
    base, its own folder and tables, naming base and preset, beside the paper's numbers."""
    from dreammix.benchmark.run import run_benchmark

    root = tmp_path / "bench"
    cfg = compose("benchmark_run", ["bench=tiny", "preset=reference", f"bench.shared_data={shared_data}", f"bench.root={root}",
                                    f"run_dir={tmp_path / 'r'}", "bench.subjects=[can]", "bench.real_images=false",
                                    "bench.train_overrides=" + _hydra_list(TINY_TRAIN)])  # fmt: skip
    result = run_benchmark(cfg)
    assert result.out_dir == root / "reference"
    assert sorted(result.trained) == ["tau1-1_beta0_pred_and_target/can", "tau1.5-0.6_beta1_sampled0.3_pred_and_target/can"]
    info = json.loads((root / "reference" / "loras" / "tau1.5-0.6_beta1_sampled0.3_pred_and_target" / "can" / "lora"
                       / "dreammix_run.json").read_text())  # fmt: skip
    assert info["lora"]["target_modules"] == ["to_k", "to_v", "to_out.0"]
    # its regular set: the public code's route (text-to-image + segmentation), in its own folder
    from dreammix.adm import read_manifest

    regular = read_manifest(root / "adm" / "can_t2i_segment")
    assert regular and all(e["route"] == "t2i_segment" for e in regular) and result.adm_built == ["can"]
    results = json.loads(result.results.read_text())
    assert results["preset"] == "reference" and results["train_experiments"]["dif_tas_adm"] == "reference"
    settings = json.loads((root / "reference" / "eval" / "dif_tas" / "can" / "settings.json").read_text())
    assert settings["generation"]["tas"]["stages"] == ["local"]  # the public code's TAS
    # ... and its sampling (sampler=reference): guidance 4, DPM++ 2M SDE Karras, the base tail
    generation = settings["generation"]
    assert generation["sampler"]["name"] == "reference" and generation["guidance_scale"] == 4.0
    assert generation["scheduler"] == "dpmpp_2m_sde_karras" and generation["sampler"]["base_switch"] == 0.8
    table3 = result.table3.read_text()
    assert "preset `reference`" in table3 and "Base model `tiny_fooocus`" in table3
    assert any(line.startswith("| ++ADM |") and "| 0.285 |" in line for line in table3.splitlines())


# ---- DreamBooth with class-prior preservation (Eq. 2) -----------------------------------------


def test_dreambooth_prior_generates_class_images_then_trains_with_the_prior_term(compose, tmp_path, subject, monkeypatch):
    """experiment=dreambooth_prior: ADM writes class-prompt images with exact masks into their own
    cache (no attribute dictionary needed), training pairs every source batch with a class batch and
    L = L_source + β·L_class with the configured β."""
    import dreammix.module as module_mod
    from dreammix.adm import read_manifest, run_adm
    from dreammix.train import train

    adm_dir = tmp_path / "adm"
    acfg = compose("adm", ["model=tiny_fooocus", "logger=none", "subject=custom", "subject.name=thing", "subject.class_noun=thing",
                           f"subject.image_dir={subject.image_dir}", "experiment=dreambooth_prior", f"paths.adm_dir={adm_dir}",
                           "adm.num_prompts=2", "adm.resolution=64", "adm.num_inference_steps=2", "adm.guidance_scale=1.0",
                           "adm.device=cpu", f"run_dir={tmp_path / 'adm_run'}"])  # fmt: skip
    assert acfg.subject.attributes == {}  # a custom subject without a dictionary: fine for class images
    out = run_adm(acfg)
    assert out == adm_dir / "thing_class_prior"
    entries = read_manifest(out)
    assert [e["prompt"] for e in entries] == ["a photo of thing"] * 2
    for e in entries:
        mask = np.asarray(Image.open(out / e["mask"]))
        assert mask.any() and Image.open(out / e["image"]).size == mask.shape[::-1]

    seen = []
    real = module_mod.DreamMixLoRAModule.compute_losses
    monkeypatch.setattr(module_mod.DreamMixLoRAModule, "compute_losses",
                        lambda self, batch: seen.append(real(self, batch)) or seen[-1])  # fmt: skip
    cfg = compose("train", _train_overrides(tmp_path, subject, "experiment=dreambooth_prior", f"paths.adm_dir={adm_dir}",
                                            "trainer.max_steps=2", "loss.beta=0.5", "data.mask_variants=1"))  # fmt: skip
    assert cfg.data.regular_dir == str(out) and (cfg.loss.tau_in, cfg.loss.tau_out) == (1.0, 1.0)
    train(cfg)
    assert len(seen) == 2
    for losses in seen:
        assert set(losses) == {"loss", "loss_source", "loss_regular"}
        assert losses["loss"].item() == pytest.approx(losses["loss_source"].item() + 0.5 * losses["loss_regular"].item(), rel=1e-5)


def test_dreambooth_prior_needs_its_class_images(compose, tmp_path, subject):
    from dreammix.train import train

    cfg = compose("train", _train_overrides(tmp_path, subject, "experiment=dreambooth_prior", f"paths.adm_dir={tmp_path / 'none'}",
                                            "trainer.max_steps=1"))  # fmt: skip
    with pytest.raises(DreamMixError, match="no regular data .*thing_class_prior"):
        train(cfg)


def test_full_benchmark_runs_on_the_fooocus_base_and_each_preset_has_its_folder(compose):
    """bench=full composes every chain step on model=fooocus (the paper's base), and the presets
    write to their own folders with their own training experiments."""
    from dreammix.benchmark.presets import BenchPreset
    from dreammix.benchmark.run import _lists, loss_variant

    for preset in ("paper", "reference"):
        cfg = compose("benchmark_run", ["bench=full", f"preset={preset}", "run_dir=/tmp/x"])
        assert cfg.bench.out_dir == f"outputs/benchmark/{preset}"
        ov = _lists(cfg.bench)
        for name in ("train", "eval", "adm"):
            extra = ["lora_dir=null"] if name == "eval" else []
            step = compose(name, [*ov["paths_overrides"], *ov["overrides"], "run_dir=/tmp/x", *extra])
            assert step.model.name == "fooocus" and step.model.patch_file == "inpaint_v26.fooocus.patch"
    reference = BenchPreset.from_config(compose("benchmark_run", ["preset=reference", "run_dir=/tmp/x"]).preset)
    assert [reference.train_experiment(r) for r in ("baseline", "dif", "dif_tas", "dif_tas_adm")] == \
        ["reference_dreambooth"] * 3 + ["reference"]  # fmt: skip
    paper = BenchPreset.from_config(compose("benchmark_run", ["run_dir=/tmp/x"]).preset)
    assert paper.name == "paper" and paper.train_experiment("dif") == "dif" and BenchPreset.from_config(None) == BenchPreset()
    # LoRA folders tell the variants apart, the public code's squared weights included
    names = {e: loss_variant(compose("train", [f"experiment={e}", "run_dir=/tmp/x"]).loss) for e in ("reference", "reference_dreambooth")}
    assert names == {"reference": "tau1.5-0.6_beta1_sampled0.3_pred_and_target", "reference_dreambooth": "tau1-1_beta0_pred_and_target"}


def test_adm_identifier_gives_the_section_3_3_template():
    """adm.identifier=sks: "a sks [attributes] [class name] [attributes]"; default: no identifier."""
    import re

    from dreammix.attributes import compose_prompts

    can = {"color": ["blue", "silver"], "material": ["aluminum"], "accessories": ["pull tab"]}
    with_id = compose_prompts(can, "can", 12, seed=0, identifier="sks")
    assert all(re.fullmatch(r"a sks( (blue|silver|aluminum))+ can( with a pull tab| with pull tab)?", p) for p in with_id), with_id
    assert not any("sks" in p for p in compose_prompts(can, "can", 12, seed=0))
