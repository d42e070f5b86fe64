"""``train(cfg)``: the whole fine-tune of one subject, called by ``src/train.py`` and by tests.

Order matters for memory: the base pipeline is loaded, every frozen input is encoded once, the
text encoders are dropped, then Lightning trains the LoRA on the UNet alone. The LoRA is exported
in diffusers format (with adapter metadata) to ``<run_dir>/lora``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dreammix.atomic import atomic_write_text
from dreammix.callbacks import progress_callbacks
from dreammix.cli import config_value
from dreammix.data.datamodule import DataSpec, DreamMixDataModule
from dreammix.data.frozen import FrozenInputEncoder
from dreammix.data.segmented_masks import source_mask_segmenter
from dreammix.data.subjects import Subject, ensure_subject_images
from dreammix.errors import DreamMixError
from dreammix.guards import FiniteGuard
from dreammix.interrupt import InterruptCheckpoint
from dreammix.paths import ensure_writable_dir
from dreammix.preflight import check_before_loading
from dreammix.validation import check_finite_tensors
from dreammix.models.loading import ModelSpec, load_pipeline, model_spec_from_config, resolve_dtype
from dreammix.models.lora import LoraSpec, save_lora
from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec
from dreammix.tracking import log_lora_artifact, train_loggers, wandb_logger_of
from dreammix.validation_panels import ValidationSpec, validation_callback, validation_spec

log = logging.getLogger(__name__)

RUN_INFO_NAME = "dreammix_run.json"


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


def train_specs(cfg: DictConfig) -> TrainSpecs:
    """Typed specs from the composed config; bad values raise a one-line :class:`DreamMixError`."""
    loss = LossSpec(
        tau_in=config_value(cfg, "loss.tau_in", float), tau_out=config_value(cfg, "loss.tau_out", float),
        beta=config_value(cfg, "loss.beta", float), regular_mode=str(cfg.loss.regular_mode),
        regular_prob=config_value(cfg, "loss.regular_prob", float),
        weighting=str(cfg.loss.get("weighting", "squared_error")),
    )
    lora = LoraSpec(
        rank=config_value(cfg, "lora.rank", int), alpha=config_value(cfg, "lora.alpha", float),
        dropout=config_value(cfg, "lora.dropout", float), target_modules=tuple(cfg.lora.target_modules),
    )
    optim = OptimSpec(
        lr=config_value(cfg, "optim.lr", float), betas=tuple(cfg.optim.betas),
        weight_decay=config_value(cfg, "optim.weight_decay", float), eps=config_value(cfg, "optim.eps", float),
        warmup_steps=config_value(cfg, "optim.warmup_steps", int), fused=bool(cfg.optim.fused),
    )
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
    return TrainSpecs(subject, model_spec_from_config(cfg.model), data, loss, lora, optim, ckpt_path)


def _callbacks(
    cfg: DictConfig, specs: TrainSpecs, val_spec: ValidationSpec, pipe, source_examples: list, run_dir: Path
) -> list[L.Callback]:
    """LoRA-only checkpoints every N steps, and validation panels when ``validation.every_n_steps`` > 0."""
    callbacks: list[L.Callback] = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="step_{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=int(cfg.checkpoint.every_n_steps) or None, save_top_k=-1, save_last=True,
        ),
        FiniteGuard(), InterruptCheckpoint(run_dir / "checkpoints"),  # see dreammix.guards / dreammix.interrupt
    ]
    if val_spec.every_n_steps > 0 and val_spec.num_backgrounds > 0:
        callbacks.append(validation_callback(cfg, val_spec, pipe, source_examples, specs.model.resolution, run_dir))
    return callbacks


def _write_run_info(cfg: DictConfig, specs: TrainSpecs, steps: int, lora_dir: Path, seconds: float | None = None) -> None:
    """``lora/dreammix_run.json``: what the LoRA was trained on (eval checks its loss settings)."""
    info = {
        "subject": specs.subject.name, "class_noun": specs.subject.class_noun,
        "source_prompt": specs.data.source_prompt, "base_model": specs.model.pretrained, "steps": steps,
        "lora": {"rank": specs.lora.rank, "alpha": specs.lora.alpha, "target_modules": list(specs.lora.target_modules)},
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        # how the items were cut, masked and encoded, and the accumulation (paper text vs. public code)
        "inputs": {**vars(specs.data.inputs), "blob_grow": list(specs.data.inputs.blob_grow),
                   "mask_variants": specs.data.mask_variants, "regular_mask_variants": specs.data.regular_mask_variants},
        "accumulate_grad_batches": int(cfg.trainer.accumulate_grad_batches),
        "train_seconds": seconds,  # this process's fit (a resumed run: the part after the resume)
    }
    atomic_write_text(lora_dir / RUN_INFO_NAME, json.dumps(info, indent=2))


def train(cfg: DictConfig) -> Path:
    """Fine-tune a LoRA for ``cfg.subject``; returns the run directory."""
    from diffusers import DDPMScheduler

    specs = train_specs(cfg)
    val_spec = validation_spec(cfg)
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
        gradient_checkpointing=specs.model.gradient_checkpointing, seed=int(cfg.seed),
    )
    trainer_kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), "accelerator": device.type}
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
        weights = save_lora(pipe.unet, run_dir / "lora", specs.lora)
        _write_run_info(cfg, specs, trainer.global_step, run_dir / "lora", time.perf_counter() - started)
        log.info("LoRA written to %s", weights)
        log_lora_artifact(loggers, run_dir / "lora", specs.subject.name, trainer.global_step)
    finally:
        if wandb_logger_of(loggers) is not None:
            import wandb

            wandb.finish()  # one W&B run per Hydra job, also in multirun
    return run_dir
