"""End to end on the tiny model: train() writes a loadable LoRA, resumes exactly, trains LoRA only."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreammix.errors import DreamMixError
from dreammix.train import train
from test_data import make_regular, make_subject


def _overrides(tmp_path, subject, run, steps, *extra):
    return [
        "model=tiny", "logger=none", "subject=custom", f"run_dir={tmp_path / run}",
        "subject.name=thing", "subject.class_noun=thing",
        f"subject.image_dir={subject.image_dir}", f"subject.mask_dir={subject.mask_dir}",
        f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "validation.every_n_steps=0", "data.mask_variants=2", *extra,
    ]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return make_subject(tmp_path_factory.mktemp("subject"), n=2)


def _inpaint(pipe, seed=0):
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return pipe("a photo of sks thing", image=image, mask_image=mask, num_inference_steps=2, strength=1.0,
                height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_train_writes_lora_that_loads_with_its_alpha_and_changes_output(compose, tmp_path, subject, tiny_model_dir):
    reg = make_regular(tmp_path / "reg", n=2)
    cfg = compose("train", _overrides(tmp_path, subject, "run", 3, "lora.rank=2", "lora.alpha=8", "optim.lr=1e-2",
                                      f"data.regular_dir={reg}"))
    run_dir = train(cfg)
    lora_dir = run_dir / "lora"
    weights = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in k for k in weights)
    assert any(".to_k." in k for k in weights) and not any(".to_q." in k for k in weights)
    info = json.loads((lora_dir / "dreammix_run.json").read_text())
    assert info["steps"] == 3 and info["lora"]["rank"] == 2

    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline

    pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
    before = _inpaint(pipe)
    pipe.load_lora_weights(str(lora_dir))
    to_k = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_k"))
    assert list(to_k.scaling.values()) == [4.0]  # alpha 8 / rank 2 survived the round trip
    after = _inpaint(pipe)
    assert before.shape == after.shape == (64, 64, 3)
    assert np.abs(before - after).max() > 1e-4


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_from_checkpoint_is_exact(compose, tmp_path, subject, accumulate, monkeypatch):
    """Resume from the step-2 checkpoint of a 6-step run (well before half way, with regular data,
    as after a crash): same LoRA as the uninterrupted run. Not trivially so: the same resume with a
    fresh Adam state (accumulate=1), or with the data/noise stream restarted at position 0
    (accumulate=2), ends elsewhere, so exactness comes from restoring the optimizer and the position."""
    import dreammix.data.datamodule as datamodule

    reg = make_regular(tmp_path / "reg", n=3)
    common = ("optim.lr=1e-2", f"data.regular_dir={reg}", f"trainer.accumulate_grad_batches={accumulate}")
    straight = train(compose("train", _overrides(tmp_path, subject, "straight", 6, *common, "checkpoint.every_n_steps=2")))
    ckpt = straight / "checkpoints" / "step_000002.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])  # LoRA only
    assert state["optimizer_states"] and state["optimizer_states"][0]["state"]  # Adam moments saved
    resumed = train(compose("train", _overrides(tmp_path, subject, "resumed", 6, *common, f"ckpt_path={ckpt}")))
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    if accumulate == 1:  # same weights and stream position, Adam moments and step count lost
        state["optimizer_states"][0]["state"] = {}
        ckpt = tmp_path / "fresh_adam.ckpt"
        torch.save(state, ckpt)
    else:  # same weights and optimizer, batches and noise from the start of the stream again

        class FromStreamStart(datamodule.StepIndexedSampler):
            def __init__(self, num_items, batch_size, seed, start_batch=0, **kwargs):
                super().__init__(num_items, batch_size, seed, start_batch=0, **kwargs)

        monkeypatch.setattr(datamodule, "StepIndexedSampler", FromStreamStart)
    other = train(compose("train", _overrides(tmp_path, subject, "counterfactual", 6, *common, f"ckpt_path={ckpt}")))
    c = load_file(other / "lora" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


def _module_and_batch(tiny_model_dir, loss_spec):
    from diffusers import DDPMScheduler

    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.models.lora import LoraSpec
    from dreammix.module import DreamMixLoRAModule, OptimSpec

    pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
    module = DreamMixLoRAModule(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), LoraSpec(), loss_spec, OptimSpec())
    g = torch.Generator().manual_seed(1)

    def part(n, position):
        mask = torch.zeros(n, 1, 8, 8)
        mask[:, :, 2:6, 2:6] = 1
        return {"latents": torch.randn(n, 4, 8, 8, generator=g), "masked_latents": torch.randn(n, 4, 8, 8, generator=g),
                "mask": mask, "prompt_embeds": torch.randn(n, 77, 64, generator=g), "pooled_embeds": torch.randn(n, 32, generator=g),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * n), "position": torch.arange(position, position + n)}

    return module, {"source": part(2, 4), "regular": part(1, 2)}


def test_training_step_combines_source_and_regular_by_eq8(tiny_model_dir):
    """Eq. 7 on each part and Eq. 8 on the sum, recomputed from first principles: the UNet's own
    output is the prediction, the target ε is recovered from its noisy input (x_t = sqrt(ᾱ_t) x0 +
    sqrt(1 - ᾱ_t) ε, ᾱ by hand), w = tau_in inside the latent mask and tau_out outside, averaged over
    all elements of a part, then L = L_source + beta * L_regular."""
    from dreammix.module import LossSpec

    tau_in, tau_out, beta = 2.0, 0.5, 0.25
    module, batch = _module_and_batch(tiny_model_dir, LossSpec(tau_in=tau_in, tau_out=tau_out, beta=beta))
    seen = []
    handle = module.unet.register_forward_hook(
        lambda _m, args, _kwargs, out: seen.append((args[0].double(), args[1], out[0].double())), with_kwargs=True
    )
    with torch.no_grad():
        losses = module.compute_losses(batch)
    handle.remove()
    ((sample, t, pred),) = seen
    cfg = module.noise_scheduler.config
    assert cfg.beta_schedule == "scaled_linear" and cfg.prediction_type == "epsilon"
    betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=np.float64) ** 2
    abar = torch.from_numpy(np.cumprod(1.0 - betas))[t.long()].view(-1, 1, 1, 1)

    def eq7(part):
        # the part's rows in the UNet batch, found by their masked-image latents (channels 5-8)
        rows = [next(i for i in range(len(sample)) if torch.equal(sample[i, 5:].float(), m)) for m in part["masked_latents"]]
        a = abar[rows]
        eps = (sample[rows, :4] - a.sqrt() * part["latents"].double()) / (1 - a).sqrt()
        w = torch.where(part["mask"] > 0.5, tau_in, tau_out).double()
        return (w * (pred[rows] - eps) ** 2).mean().item()

    source, regular = eq7(batch["source"]), eq7(batch["regular"])
    assert losses["loss_source"].item() == pytest.approx(source, rel=1e-4)
    assert losses["loss_regular"].item() == pytest.approx(regular, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(source + beta * regular, rel=1e-4)
    assert abs(source - regular) > 1e-3 * source  # distinct parts: beta and the split are visible


def test_sampled_mode_uses_one_kind_per_step(tiny_model_dir):
    from dreammix.module import LossSpec

    module, batch = _module_and_batch(tiny_model_dir, LossSpec(regular_mode="sampled", regular_prob=0.5))
    kinds = set()
    with torch.no_grad():
        for position in range(0, 40, 2):
            batch["source"]["position"] = torch.tensor([position, position + 1])
            losses = module.compute_losses(batch)
            assert len(losses) == 2  # loss + exactly one of the two kinds
            kinds |= set(losses) - {"loss"}
            assert losses["loss"] == losses[(set(losses) - {"loss"}).pop()]
    assert kinds == {"loss_source", "loss_regular"}


def test_only_lora_parameters_train(tiny_model_dir):
    from diffusers import DDPMScheduler

    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.models.lora import LoraSpec
    from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

    pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
    module = DreamMixLoRAModule(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), LoraSpec(), LossSpec(), OptimSpec())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable)
    assert all(("to_k" in n or "to_v" in n) for n in trainable)


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.beta=-1", "beta must be >= 0"),
        ("loss.regular_mode=sometimes", "regular_mode must be one of"),
        ("trainer.max_steps=0", "max_steps must be >= 1"),
        ("ckpt_path=/does/not/exist.ckpt", "checkpoint not found"),
        ("lora.target_modules=[nonexistent_proj]", "cannot attach LoRA"),
        ("data.batch_size=0", "batch sizes must be >= 1"),
    ],
)
def test_bad_training_values_are_one_line_errors(compose, tmp_path, subject, override, message):
    cfg = compose("train", _overrides(tmp_path, subject, "bad", 1, override))
    with pytest.raises(DreamMixError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value)


def test_training_works_on_the_fooocus_base(compose, tmp_path, subject):
    from dreammix.models.fooocus import is_fooocus_unet
    from dreammix.models.loading import load_pipeline, model_spec_from_config

    cfg = compose("train", _overrides(tmp_path, subject, "fooocus", 2, "model=tiny_fooocus", "loss.beta=0"))
    run_dir = train(cfg)
    pipe = load_pipeline(model_spec_from_config(cfg.model))
    assert is_fooocus_unet(pipe.unet)
    pipe.load_lora_weights(str(run_dir / "lora"))
    assert _inpaint(pipe).shape == (64, 64, 3)


def test_gradient_checkpointing_still_trains_the_lora(tiny_model_dir):
    """With a frozen base, checkpointed blocks must still pass gradients to the LoRA weights."""
    from diffusers import DDPMScheduler

    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.models.lora import LoraSpec
    from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

    _, batch = _module_and_batch(tiny_model_dir, LossSpec())
    pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
    ckpt_module = DreamMixLoRAModule(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), LoraSpec(), LossSpec(),
                                     OptimSpec(), gradient_checkpointing=True)
    ckpt_module.train()
    assert ckpt_module.unet.is_gradient_checkpointing
    ckpt_module.compute_losses(batch)["loss"].backward()
    grads = [p.grad for p in ckpt_module.lora_params]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _fit(module, batch, callbacks=(), **trainer_kwargs):
    """``trainer.fit`` on ``batch`` repeated (the module-level tests' batches, no datamodule)."""
    import lightning as L

    trainer_kwargs.setdefault("logger", False)
    trainer = L.Trainer(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 40, batch_size=None))
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_losses_reach_the_loggers_once_per_log_step(tiny_model_dir, accumulate):
    """train/loss, its parts and the lr go to every logger on each log_every_n_steps-th optimizer
    step (once, also with gradient accumulation), and train/loss to the progress bar."""
    from lightning.pytorch.loggers import Logger

    from dreammix.module import LossSpec, OptimSpec

    class MemoryLogger(Logger):
        name, version = "memory", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    module, batch = _module_and_batch(tiny_model_dir, LossSpec(beta=0.4))
    module.optim_spec = OptimSpec(lr=3e-4)
    logger = MemoryLogger()
    trainer = _fit(module, batch, max_steps=5, log_every_n_steps=2, accumulate_grad_batches=accumulate, logger=logger)
    assert [step for step, _ in logger.rows] == [0, 2, 4]
    for _, metrics in logger.rows:
        assert set(metrics) == {"train/loss", "train/loss_source", "train/loss_regular", "train/lr"}
        assert metrics["train/lr"] == 3e-4
        assert metrics["train/loss"] == pytest.approx(metrics["train/loss_source"] + 0.4 * metrics["train/loss_regular"], rel=1e-5)
    assert "train/loss" in trainer.progress_bar_metrics


@pytest.mark.slow  # torch.compile of the tiny UNet takes ~90 s on a 2-core CPU
def test_compiled_unet_trains_the_lora_under_unchanged_names(tiny_model_dir):
    """model.compile_unet: the LoRA still gets gradients and keeps its checkpoint/export names."""
    from diffusers import DDPMScheduler

    from dreammix.models.loading import ModelSpec, load_pipeline
    from dreammix.models.lora import LoraSpec, lora_state_dict
    from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

    plain, batch = _module_and_batch(tiny_model_dir, LossSpec())
    pipe = load_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64, compile_unet=True))
    compiled = DreamMixLoRAModule(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), LoraSpec(), LossSpec(),
                                  OptimSpec())
    compiled.compute_losses(batch)["loss"].backward()
    assert all(p.grad is not None for p in compiled.lora_params)
    assert set(lora_state_dict(compiled.unet)) == set(lora_state_dict(plain.unet))
    assert set(compiled.state_dict()) == set(plain.state_dict())


def test_model_compile_unet_compiles_the_loaded_unet(compose, tmp_path, subject, tiny_model_dir):
    """The config key reaches every entry point's loader (lazily: nothing compiles until a call)."""
    from dreammix.models.loading import ModelSpec, load_pipeline
    from dreammix.train import train_specs

    cfg = compose("train", _overrides(tmp_path, subject, "run", 1, "model.compile_unet=true"))
    assert train_specs(cfg).model.compile_unet
    assert not train_specs(compose("train", _overrides(tmp_path, subject, "run", 1))).model.compile_unet
    spec = ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64)
    assert load_pipeline(spec).unet._compiled_call_impl is None
    assert load_pipeline(ModelSpec(**{**spec.__dict__, "compile_unet": True})).unet._compiled_call_impl is not None


def test_checkpoint_records_the_lora_shape_and_refuses_another(tiny_model_dir):
    """A LoRA-only checkpoint says which LoRA it holds (rank, alpha, targets); resuming it into a
    run configured with another LoRA is a one-line error, not a silent partial load
    (``strict_loading`` is off because the frozen base is not in the checkpoint)."""
    from diffusers import DDPMScheduler

    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.models.lora import LoraSpec
    from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

    def module(spec):
        pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
        return DreamMixLoRAModule(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), spec, LossSpec(), OptimSpec())

    saved = module(LoraSpec(rank=2, alpha=8))
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    record = checkpoint["dreammix_lora"]
    assert {k: record[k] for k in ("rank", "alpha", "target_modules", "use_dora")} == {
        "rank": 2, "alpha": 8, "target_modules": ["to_k", "to_v"], "use_dora": False}
    assert record["unet_layout"] == {"layers_per_block": 1, "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    module(LoraSpec(rank=2, alpha=8)).on_load_checkpoint(checkpoint)  # the same LoRA: accepted
    for other in (LoraSpec(rank=4, alpha=8), LoraSpec(rank=2, alpha=2), LoraSpec(rank=2, alpha=8, target_modules=("to_k",))):
        with pytest.raises(DreamMixError, match="does not match the configured LoRA") as err:
            module(other).on_load_checkpoint(checkpoint)
        assert "\n" not in str(err.value)


def test_saved_lora_is_float32_whatever_the_training_dtype(tiny_model_dir, tmp_path):
    """Adapters trained in bf16 (or kept there by a user's precision setting) are exported as fp32
    with the same values: the file loads at full precision in every tool."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from dreammix.models.lora import LoraSpec, add_lora, lora_state_dict, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    add_lora(unet, LoraSpec(rank=2, alpha=4))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
                param.data = param.data.to(torch.bfloat16)
    trained = lora_state_dict(unet)
    assert trained and all(v.dtype == torch.bfloat16 for v in trained.values())
    saved = load_file(save_lora(unet, tmp_path / "lora", LoraSpec(rank=2, alpha=4)))
    assert len(saved) == len(trained) and all(v.dtype == torch.float32 for v in saved.values())
    assert sorted(v.float().sum().item() for v in trained.values()) == sorted(v.sum().item() for v in saved.values())
