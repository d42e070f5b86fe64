"""Trainer options users of diffusers' and kohya's SDXL LoRA trainers expect, on the tiny model:
DoRA, AdamW / 8-bit Adam / Prodigy, min-SNR-γ, noise offset; unknown keys are errors (issue 15)."""

import pytest
import torch

from dreammix.errors import DreamMixError
from dreammix.models.lora import LoraSpec
from dreammix.module import LossSpec, NoiseSpec, OptimSpec


def _module(tiny_model_dir, lora=LoraSpec(), noise=None, optim=OptimSpec()):
    from diffusers import DDPMScheduler

    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.module import DreamMixLoRAModule

    pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
    module = DreamMixLoRAModule(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), lora,
                                LossSpec(beta=0), optim, noise=noise)
    return module, pipe


def _batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    return {"source": {"latents": torch.randn(n, 4, 8, 8, generator=g), "masked_latents": torch.randn(n, 4, 8, 8, generator=g),
                       "mask": mask, "prompt_embeds": torch.randn(n, 77, 64, generator=g), "pooled_embeds": torch.randn(n, 32, generator=g),
                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * n), "position": torch.arange(0, n)}}


def _train(module, steps=3):
    optimizer = module.optim_spec.build(module.lora_params, "cpu")
    for step in range(steps):
        optimizer.zero_grad()
        batch = _batch(seed=step)
        module.compute_losses(batch)["loss"].backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in module.unet.named_parameters() if "lora_" in n}


def test_dora_trains_a_magnitude_vector_changes_the_weights_and_reloads(tiny_model_dir, tmp_path):
    from dreammix.export import LoraExport, write_lora_folder
    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.models.lora import lora_state_dict

    opt = OptimSpec(lr=1e-2)
    plain = _train(_module(tiny_model_dir, LoraSpec(rank=2, alpha=8), optim=opt)[0])
    module, _ = _module(tiny_model_dir, LoraSpec(rank=2, alpha=8, use_dora=True), optim=opt)
    magnitude = [n for n, p in module.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert magnitude and any(p is q for p in module.lora_params for n, q in module.named_parameters() if n == magnitude[0])
    before = {n: p.detach().clone() for n, p in module.unet.named_parameters() if "lora_magnitude_vector" in n}
    dora = _train(module)
    assert any((dora[n] - before[n]).abs().max() > 0 for n in before)  # the magnitude trains
    shared = [n for n in plain if n in dora]
    assert shared and max((plain[n] - dora[n]).abs().max().item() for n in shared) > 1e-4  # DoRA ≠ LoRA

    folder = write_lora_folder(LoraExport(lora_state_dict(module.unet), module.lora_spec, {"subject": "thing"}), tmp_path / "lora")
    assert not list(folder.glob("thing_*.safetensors"))  # no webui file for DoRA (see export.write_lora_folder)
    module.unet.eval()
    probe = _batch(1, seed=9)["source"]
    from dreammix.module import inpaint_unet_forward

    args = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([400]), probe["mask"],
            probe["masked_latents"], probe["prompt_embeds"], probe["pooled_embeds"], probe["time_ids"])
    with torch.no_grad():
        trained = inpaint_unet_forward(module.unet, *args)
        pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
        pipe.load_lora_weights(str(folder))
        assert any("lora_magnitude_vector" in n for n, _ in pipe.unet.named_parameters())
        torch.testing.assert_close(inpaint_unet_forward(pipe.unet, *args), trained, atol=1e-5, rtol=1e-5)


def test_optimizers_are_built_from_the_config(tiny_model_dir):
    from prodigyopt import Prodigy

    module, _ = _module(tiny_model_dir, optim=OptimSpec(name="adamw", weight_decay=0.5, lr=1e-3))
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 0.5
    # decoupled decay: with zero gradients AdamW still shrinks weights by lr·wd, Adam does not move them
    for spec, expected in ((OptimSpec(name="adamw", weight_decay=0.5, lr=1e-3), 1 - 1e-3 * 0.5), (OptimSpec(name="adam", weight_decay=0.0), 1.0)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = spec.build([p], "cpu")
        p.grad = torch.zeros(3)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.full((3,), expected))
    module.optim_spec = OptimSpec(name="prodigy", lr=1.0)
    optimizer = module.configure_optimizers()
    assert type(optimizer) is Prodigy
    before = [p.detach().clone() for p in module.lora_params]
    module.compute_losses(_batch())["loss"].backward()
    optimizer.step()
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(module.lora_params, before))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_kernels_only_on_cuda(name):
    p = torch.nn.Parameter(torch.ones(3))
    assert OptimSpec(name=name, fused=True).build([p], "cuda").defaults["fused"] is True
    assert not OptimSpec(name=name, fused=True).build([p], "cpu").defaults["fused"]
    assert not OptimSpec(name=name, fused=False).build([p], "cuda").defaults["fused"]


def test_warmup_is_a_per_step_linear_ramp_lightning_accepts(tiny_model_dir):
    """``optim.warmup_steps=w``: lr·min(1, (k+1)/(w+1)) at optimizer step k, stepped every
    optimizer step (Lightning's ``interval: step``, checked by Lightning's own parser); 0 = a
    constant lr and no scheduler."""
    from lightning.pytorch.core.optimizer import _configure_optimizers

    module, _ = _module(tiny_model_dir, optim=OptimSpec(lr=1e-3, warmup_steps=3))
    optimizers, schedulers, _ = _configure_optimizers(module.configure_optimizers())
    assert len(optimizers) == 1 and len(schedulers) == 1 and schedulers[0]["interval"] == "step"
    scheduler = schedulers[0]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizers[0].param_groups[0]["lr"])
        optimizers[0].step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3 * min(1.0, (k + 1) / 4) for k in range(6)])
    constant, _ = _module(tiny_model_dir, optim=OptimSpec(lr=1e-3))
    optimizers, schedulers, _ = _configure_optimizers(constant.configure_optimizers())
    assert schedulers == [] and optimizers[0].param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim=adam8bit", "8-bit Adam needs the bitsandbytes package"),
        ("optim.name=sgd", "optimizer must be one of"),
        ("+optim.momentum=0.9", "unknown option 'momentum'"),
        ("+lora.use_dorra=true", "unknown option 'use_dorra'"),
        ("+noise.pyramid=0.1", "unknown option 'pyramid'"),
        ("noise.snr_gamma=-1", "snr_gamma must be >= 0"),
    ],
)
def test_bad_trainer_options_are_one_line_errors_before_loading(compose, tmp_path, override, message):
    from test_data import make_subject
    from test_train import _overrides

    from dreammix.train import train_specs

    subject = make_subject(tmp_path / "s", n=1)
    with pytest.raises(DreamMixError, match=message) as err:
        train_specs(compose("train", _overrides(tmp_path, subject, "run", 1, override)))
    assert "\n" not in str(err.value)


def test_config_values_reach_the_specs(compose, tmp_path):
    from test_data import make_subject
    from test_train import _overrides

    from dreammix.train import train_specs

    subject = make_subject(tmp_path / "s", n=1)
    specs = train_specs(compose("train", _overrides(tmp_path, subject, "run", 1, "optim=prodigy", "lora.use_dora=true",
                                                    "noise.offset=0.05", "noise.snr_gamma=5")))
    assert (specs.optim.name, specs.optim.lr, specs.lora.use_dora) == ("prodigy", 1.0, True)
    assert specs.noise == NoiseSpec(offset=0.05, snr_gamma=5.0)


def _capture(module, batch):
    """(loss_source, per-sample plain Eq. 7 losses, timesteps) of one step."""
    seen = {}
    noise_and_target = module._noise_and_target

    def spy(latents, generator):
        noisy, t, target = noise_and_target(latents, generator)
        seen.update(t=t, target=target)
        return noisy, t, target

    module._noise_and_target = spy
    handle = module.unet.register_forward_hook(lambda m, a, out: seen.update(pred=out[0] if isinstance(out, tuple) else out.sample))
    try:
        with torch.no_grad():
            losses = module.compute_losses(batch)
    finally:
        handle.remove()
        module._noise_and_target = noise_and_target
    mask = batch["source"]["mask"]
    weight = 1.5 * mask + 0.7 * (1 - mask)  # LossSpec's tau_in / tau_out
    per_sample = (weight * (seen["pred"] - seen["target"]) ** 2).mean(dim=(1, 2, 3))
    return losses["loss_source"], per_sample, seen["t"]


def test_min_snr_gamma_weights_each_sample_by_min_snr_over_snr(tiny_model_dir):
    """Hang et al. 2023, ε-prediction: w(t) = min(SNR(t), γ) / SNR(t), SNR = ᾱ/(1 − ᾱ) from the
    DDPM betas (scaled_linear: √β linear from √β_start to √β_end)."""
    plain, _ = _module(tiny_model_dir)
    loss, per_sample, t = _capture(plain, _batch(4))
    torch.testing.assert_close(loss, per_sample.mean())
    cfg = plain.noise_scheduler.config
    assert cfg.beta_schedule == "scaled_linear" and cfg.prediction_type == "epsilon"
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1 - betas, 0)[t]
    snr = alphas_bar / (1 - alphas_bar)
    gamma = float(snr.median())  # some samples clipped (weight < 1), some not (weight 1)
    expected_w = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    assert expected_w.min() < 0.99 and expected_w.max() == 1

    weighted, _ = _module(tiny_model_dir, noise=NoiseSpec(snr_gamma=gamma))
    loss_w, per_sample_w, t_w = _capture(weighted, _batch(4))
    assert torch.equal(t_w, t)
    torch.testing.assert_close(per_sample_w, per_sample)  # same draw, same prediction
    torch.testing.assert_close(loss_w, (expected_w.float() * per_sample).mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(loss_w, loss)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_per_prediction_type(tiny_model_dir, prediction_type):
    """w(t) = min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v (the v target's own SNR + 1
    scale; diffusers' train_text_to_image.py), SNR from the scheduler's DDPM betas."""
    from diffusers import DDPMScheduler

    module, _ = _module(tiny_model_dir, noise=NoiseSpec(snr_gamma=5.0))
    module.noise_scheduler = DDPMScheduler.from_config(module.noise_scheduler.config, prediction_type=prediction_type)
    cfg = module.noise_scheduler.config
    t = torch.tensor([0, 50, 200, 500, 999])
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1 - betas, 0)[t]
    snr = alphas_bar / (1 - alphas_bar)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    torch.testing.assert_close(module.min_snr_weights(t), expected.float(), rtol=1e-4, atol=0)  # fp32 ᾱ


def test_noise_offset_adds_a_per_channel_constant_to_the_noise(tiny_model_dir):
    plain, _ = _module(tiny_model_dir)
    offset, _ = _module(tiny_model_dir, noise=NoiseSpec(offset=0.1))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    _, t0, eps0 = plain._noise_and_target(latents, torch.Generator().manual_seed(7))
    _, t1, eps1 = offset._noise_and_target(latents, torch.Generator().manual_seed(7))
    assert torch.equal(t0, t1)
    shift = eps1 - eps0  # ε-prediction: the target is the noise
    per_channel = shift[:, :, :1, :1]
    torch.testing.assert_close(shift, per_channel.expand_as(shift))  # constant over the image
    assert per_channel.abs().min() > 0 and 0.02 < per_channel.std() < 0.5  # 0.1 · N(0, 1), 12 draws
    noisy, _, eps = offset._noise_and_target(latents.bfloat16(), torch.Generator().manual_seed(7))
    assert noisy.dtype == eps.dtype == torch.bfloat16  # the shift does not promote bf16 training to fp32


def test_a_dora_checkpoint_does_not_resume_into_a_plain_lora(tiny_model_dir):
    dora, _ = _module(tiny_model_dir, LoraSpec(use_dora=True))
    checkpoint = {"state_dict": dora.state_dict()}
    dora.on_save_checkpoint(checkpoint)
    assert checkpoint["dreammix_lora"]["use_dora"] is True
    assert any("lora_magnitude_vector" in k for k in checkpoint["state_dict"])
    plain, _ = _module(tiny_model_dir)
    with pytest.raises(DreamMixError, match="does not match the configured LoRA"):
        plain.on_load_checkpoint(checkpoint)
    # a checkpoint written before DoRA existed (no use_dora key) is a plain LoRA: it resumes
    older = {"state_dict": {}, "dreammix_lora": {k: v for k, v in checkpoint["dreammix_lora"].items() if k != "use_dora"}}
    plain.on_load_checkpoint(older)
    with pytest.raises(DreamMixError, match="does not match the configured LoRA"):
        dora.on_load_checkpoint(older)


def _kinds(module, numbers):
    batch = {"source": {"latents": torch.zeros(1)}, "regular": {"latents": torch.zeros(1)}}
    return ["regular" if module._batch_parts(batch, b)[0] is None else "source" for b in numbers]


def test_sampled_regular_steps_depend_only_on_seed_and_batch_number(tiny_model_dir):
    """``loss.regular_mode=sampled`` (the public code): each step is regular with probability
    ``regular_prob``, drawn from (seed, micro-batch number) alone, so a run resumed at batch 120
    sees the kinds the uninterrupted run saw there, whatever ran before in the process."""
    from diffusers import DDPMScheduler

    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.module import DreamMixLoRAModule

    def module(seed):
        pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return DreamMixLoRAModule(pipe.unet, scheduler, LoraSpec(), LossSpec(beta=0.4, regular_mode="sampled", regular_prob=0.4),
                                  OptimSpec(), seed=seed)  # fmt: skip

    full = _kinds(module(3), range(1000))
    resumed = module(3)
    torch.rand(5)  # anything else drawing from the global RNG in between
    assert _kinds(resumed, range(120, 1000)) == full[120:]
    assert 0.35 < full.count("regular") / len(full) < 0.45  # p = 0.4, 1000 draws: ± 3 σ
    assert _kinds(module(4), range(1000)) != full


def test_spec_bounds_accept_their_edges_and_refuse_beyond(monkeypatch):
    import sys

    for ok in (NoiseSpec(offset=0.0, snr_gamma=0.0), NoiseSpec(offset=0.05, snr_gamma=0.5), NoiseSpec(snr_gamma=5.0)):
        assert ok.snr_gamma >= 0
    with pytest.raises(DreamMixError, match="snr_gamma must be >= 0"):
        NoiseSpec(snr_gamma=-0.5)
    with pytest.raises(DreamMixError, match="noise offset must be >= 0"):
        NoiseSpec(offset=-0.01)
    with pytest.raises(DreamMixError, match="lr must be > 0"):
        OptimSpec(lr=0.0)
    assert OptimSpec(lr=1e-12).lr == 1e-12
    assert LossSpec(tau_in=0.5, tau_out=0.0).tau_in == 0.5  # a weight below 1 inside is allowed
    with pytest.raises(DreamMixError):
        LossSpec(tau_in=-0.1)
    p = torch.nn.Parameter(torch.ones(2))
    for name in ("adam", "adamw", "prodigy"):
        built = OptimSpec(name=name, betas=(0.8, 0.95), eps=1e-6, lr=1.0 if name == "prodigy" else 1e-4).build([p], "cpu")
        assert tuple(built.defaults["betas"]) == (0.8, 0.95) and built.defaults["eps"] == 1e-6
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if it were not installed
    with pytest.raises(DreamMixError, match="Prodigy needs the prodigyopt package"):
        OptimSpec(name="prodigy", lr=1.0)
