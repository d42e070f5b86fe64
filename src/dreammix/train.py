"""``train(cfg)``: the whole fine-tune of one subject, called by ``src/train.py`` and by tests.

Order matters for memory: the base pipeline is loaded, every frozen input is encoded once, the
text encoders are dropped, then Lightning trains the LoRA on the UNet alone. The LoRA is exported
in diffusers format (with adapter metadata) to ``<run_dir>/lora``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dreammix.callbacks import progress_callbacks
from dreammix.cli import config_value
from dreammix.data.datamodule import DataSpec, DreamMixDataModule
from dreammix.data.frozen import FrozenInputEncoder
from dreammix.data.segmented_masks import source_mask_segmenter
from dreammix.data.subjects import Subject, ensure_subject_images
from dreammix.errors import DreamMixError
from dreammix.export import RUN_INFO_NAME  # noqa: F401 - re-exported (benchmark.run reads it from here)
from dreammix.export import CheckpointLoraCallback, LoraExport, lora_record, unet_layout, write_lora_folder
from dreammix.guards import FiniteGuard
from dreammix.interrupt import InterruptCheckpoint
from dreammix.paths import check_own_folder, ensure_writable_dir
from dreammix.preflight import check_before_loading
from dreammix.validation import check_finite_tensors
from dreammix.models.loading import ModelSpec, load_pipeline, model_spec_from_config, resolve_dtype
from dreammix.models.lora import LoraSpec, lora_state_dict
from dreammix.module import DreamMixLoRAModule, LossSpec, NoiseSpec, OptimSpec
from dreammix.tracking import log_lora_artifact, train_loggers, wandb_logger_of
from dreammix.validation_panels import ValidationSpec, validation_callback, validation_spec

log = logging.getLogger(__name__)



def _training_device(trainer_cfg) -> torch.device:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise DreamMixError("trainer.accelerator asks for a GPU but CUDA is not available", "trainer.accelerator")
    return torch.device("cpu")


@dataclass(frozen=True)
class TrainSpecs:
    """Everything ``train`` needs from the config, checked before any weights are loaded."""

    subject: Subject
    model: ModelSpec
    data: DataSpec
    loss: LossSpec
    lora: LoraSpec
    optim: OptimSpec
    ckpt_path: Path | None
    noise: NoiseSpec = NoiseSpec()


def check_known_keys(cfg: DictConfig, group: str, spec_type: type) -> None:
    """``+lora.use_dorra=true`` must fail, not train without it: every key of ``cfg.<group>`` must
    be a field of its spec."""
    unknown = sorted(set(cfg[group]) - set(spec_type.__dataclass_fields__))
    if unknown:
        known = ", ".join(sorted(spec_type.__dataclass_fields__))
        raise DreamMixError(f"unknown option {unknown[0]!r} (known: {known})", f"{group}.{unknown[0]}")


def train_specs(cfg: DictConfig) -> TrainSpecs:
    """Typed specs from the composed config; bad values raise a one-line :class:`DreamMixError`."""
    loss = LossSpec(
        tau_in=config_value(cfg, "loss.tau_in", float), tau_out=config_value(cfg, "loss.tau_out", float),
        beta=config_value(cfg, "loss.beta", float), regular_mode=str(cfg.loss.regular_mode),
        regular_prob=config_value(cfg, "loss.regular_prob", float),
        weighting=str(cfg.loss.get("weighting", "squared_error")),
    )
    check_known_keys(cfg, "lora", LoraSpec)
    lora = LoraSpec(
        rank=config_value(cfg, "lora.rank", int), alpha=config_value(cfg, "lora.alpha", float),
        dropout=config_value(cfg, "lora.dropout", float), target_modules=tuple(cfg.lora.target_modules),
        use_dora=config_value(cfg, "lora.use_dora", bool) if "use_dora" in cfg.lora else False,
    )
    check_known_keys(cfg, "optim", OptimSpec)
    optim = OptimSpec(
        name=str(cfg.optim.get("name", "adam")), lr=config_value(cfg, "optim.lr", float), betas=tuple(cfg.optim.betas),
        weight_decay=config_value(cfg, "optim.weight_decay", float), eps=config_value(cfg, "optim.eps", float),
        warmup_steps=config_value(cfg, "optim.warmup_steps", int), fused=bool(cfg.optim.fused),
    )
    noise = NoiseSpec()
    if cfg.get("noise") is not None:
        check_known_keys(cfg, "noise", NoiseSpec)
        noise = NoiseSpec(offset=config_value(cfg, "noise.offset", float), snr_gamma=config_value(cfg, "noise.snr_gamma", float))
    max_steps = config_value(cfg, "trainer.max_steps", int)
    if max_steps < 1:
        raise DreamMixError(f"max_steps must be >= 1, got {max_steps}", "trainer.max_steps")
    config_value(cfg, "trainer.accumulate_grad_batches", int)  # checked here; Lightning applies it
    ckpt_path = Path(str(cfg.ckpt_path)) if cfg.get("ckpt_path") else None
    if ckpt_path is not None and not ckpt_path.is_file():
        raise DreamMixError(f"checkpoint not found: {ckpt_path}", "ckpt_path")
    subject = Subject.from_config(cfg.subject)
    ensure_subject_images(subject, OmegaConf.select(cfg, "paths.dreambooth_dir"))
    if not subject.image_dir.is_dir():  # fail before loading gigabytes of weights
        raise DreamMixError(f"image folder of subject '{subject.name}' not found: {subject.image_dir}", "subject.image_dir")
    data = DataSpec.from_config(cfg.data)
    check_before_loading(subject, data, lora, ckpt_path)
    return TrainSpecs(subject, model_spec_from_config(cfg.model), data, loss, lora, optim, ckpt_path, noise)


def _callbacks(
    cfg: DictConfig, specs: TrainSpecs, val_spec: ValidationSpec, pipe, source_examples: list, run_dir: Path
) -> list[L.Callback]:
    """LoRA-only checkpoints every N steps, and validation panels when ``validation.every_n_steps`` > 0."""
    keep = int(cfg.checkpoint.get("keep_last") or 0)
    every = int(cfg.checkpoint.every_n_steps)
    callbacks: list[L.Callback] = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="step_{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=every or None, save_last=True,
            # keep_last K: the K newest by step ("step" is always among Lightning's monitor candidates)
            **({"save_top_k": keep, "monitor": "step", "mode": "max"} if keep > 0 else {"save_top_k": -1}),
        ),
        FiniteGuard(), InterruptCheckpoint(run_dir / "checkpoints"),  # see dreammix.guards / dreammix.interrupt
    ]
    if every > 0 and bool(cfg.checkpoint.get("lora_files", True)):
        callbacks.append(CheckpointLoraCallback(
            run_dir / "checkpoints", every, keep, specs.lora, lambda step: _run_info(cfg, specs, step, pipe.unet),
        ))
    if val_spec.every_n_steps > 0 and val_spec.num_backgrounds > 0:
        callbacks.append(validation_callback(cfg, val_spec, pipe, source_examples, specs.model.resolution, run_dir))
    return callbacks


def _run_info(cfg: DictConfig, specs: TrainSpecs, steps: int, unet) -> dict:
    """``lora/dreammix_run.json``: what the LoRA was trained on (eval checks its loss settings; the
    kohya export and the model card describe the LoRA with it)."""
    return {
        "subject": specs.subject.name, "class_noun": specs.subject.class_noun,
        "source_prompt": specs.data.source_prompt, "base_model": specs.model.pretrained, "steps": steps,
        "model": specs.model.name, "resolution": specs.model.resolution, "unet_layout": unet_layout(unet.config),
        "lora": lora_record(specs.lora),
        "training": {"optimizer": specs.optim.name, "lr": specs.optim.lr, "noise_offset": specs.noise.offset,
                     "snr_gamma": specs.noise.snr_gamma},
        "loss": OmegaConf.to_container(cfg.loss, resolve=True), "loss_preset": _loss_preset(),
        # how the items were cut, masked and encoded, and the accumulation (paper text vs. public code)
        "inputs": {**vars(specs.data.inputs), "blob_grow": list(specs.data.inputs.blob_grow),
                   "mask_variants": specs.data.mask_variants, "regular_mask_variants": specs.data.regular_mask_variants},
        "accumulate_grad_batches": int(cfg.trainer.accumulate_grad_batches),
    }


def _loss_preset() -> str | None:
    """``reweighted`` / ``reference``: the ``loss=`` choice of the composed config (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get("loss")
    except ValueError:  # not composed by @hydra.main (tests compose directly)
        return None


def train(cfg: DictConfig) -> Path:
    """Fine-tune a LoRA for ``cfg.subject``; returns the run directory."""
    from diffusers import DDPMScheduler

    specs = train_specs(cfg)
    val_spec = validation_spec(cfg)
    check_own_folder(cfg.run_dir, ("checkpoints", "lora", "samples"), "a training run", "run_dir")  # lora/ is replaced
    run_dir = ensure_writable_dir(Path(str(cfg.run_dir)), "run_dir")
    loggers = train_loggers(cfg, run_dir)  # CSV always; W&B opened before the weights load
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    device = _training_device(cfg.trainer)
    segment_masks = source_mask_segmenter(cfg, specs.subject, device)  # data.missing_mask=segment
    pipe = load_pipeline(specs.model, resolve_dtype(specs.model.weight_dtype, device))
    for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        part.to(device)
    encoder = FrozenInputEncoder(pipe, device)
    datamodule = DreamMixDataModule(
        specs.subject, specs.data, encoder, specs.model.resolution, use_regular=specs.loss.beta > 0, seed=int(cfg.seed),
        segment_masks=segment_masks,
    )
    datamodule.setup("fit")
    callbacks = _callbacks(cfg, specs, val_spec, pipe, datamodule.source_examples, run_dir)
    # Everything the text encoders will ever produce is cached now: free their memory.
    pipe.text_encoder.to("cpu")
    pipe.text_encoder_2.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    module = DreamMixLoRAModule(
        pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), specs.lora, specs.loss, specs.optim,
        gradient_checkpointing=specs.model.gradient_checkpointing, seed=int(cfg.seed), noise=specs.noise,
    )
    trainer_kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), "accelerator": device.type}
    # The datamodule's sampler gives each DDP rank its own slice of the step-indexed stream.
    trainer_kwargs["use_distributed_sampler"] = False
    progress, trainer_kwargs["enable_progress_bar"] = progress_callbacks(
        int(cfg.trainer.max_steps), OmegaConf.select(cfg, "progress.every_n_steps"),
        terminal=sys.stdout.isatty(), bar=bool(trainer_kwargs.get("enable_progress_bar", True)),
    )
    trainer = L.Trainer(
        **trainer_kwargs, max_epochs=-1, default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks + progress,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    try:
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(specs.ckpt_path) if specs.ckpt_path else None)
        check_finite_tensors({n: p for n, p in module.named_parameters() if "lora_" in n}, "the trained LoRA")  # never export NaNs
        if trainer.is_global_zero:  # DDP: every rank holds the same LoRA; one writes it
            info = {**_run_info(cfg, specs, trainer.global_step, pipe.unet),
                    "train_seconds": time.perf_counter() - started}  # this process's fit (after a resume: the rest)
            grid = next(iter(sorted((run_dir / "samples").glob("step_*.png"))[-1:]), None)
            lora_dir = write_lora_folder(LoraExport(lora_state_dict(pipe.unet), specs.lora, info), run_dir / "lora", sample_grid=grid)
            log.info("LoRA written to %s (diffusers, kohya/webui, model card)", lora_dir)
            log_lora_artifact(loggers, run_dir / "lora", specs.subject.name, trainer.global_step)
    finally:
        if wandb_logger_of(loggers) is not None:
            import wandb

            wandb.finish()  # one W&B run per Hydra job, also in multirun
    return run_dir
