"""``train(cfg)``: the whole fine-tune of one subject, called by ``src/train.py`` and by tests.

Order matters for memory: the base pipeline is loaded, every frozen input is encoded once, the
text encoders are dropped, then Lightning trains the LoRA on the UNet alone. The LoRA is exported
in diffusers format (with adapter metadata) to ``<run_dir>/lora``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dreammix.callbacks import SampleGridCallback
from dreammix.cli import config_value
from dreammix.data.datamodule import DataSpec, DreamMixDataModule
from dreammix.data.frozen import FrozenInputEncoder, square_crop_resize
from dreammix.data.subjects import Subject, load_source_examples
from dreammix.errors import DreamMixError
from dreammix.models.loading import load_pipeline, model_spec_from_config, resolve_dtype
from dreammix.models.lora import LoraSpec, save_lora
from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

log = logging.getLogger(__name__)

RUN_INFO_NAME = "dreammix_run.json"


def _training_device(trainer_cfg) -> torch.device:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise DreamMixError("trainer.accelerator asks for a GPU but CUDA is not available", "trainer.accelerator")
    return torch.device("cpu")


def _validation_inputs(subject: Subject, spec: DataSpec, resolution: int, count: int):
    examples = load_source_examples(subject, spec.missing_mask)[:count]
    images, masks = [], []
    for example in examples:
        pixels, mask = square_crop_resize(example, resolution)
        images.append(Image.fromarray(((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)))
        masks.append(Image.fromarray((mask.numpy() * 255).astype(np.uint8), mode="L"))
    return images, masks


def _logger(cfg: DictConfig, run_dir: Path):
    if not cfg.logger.get("enabled", False):
        return False
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.get("entity"),
        group=cfg.logger.get("group"),
        tags=list(cfg.logger.get("tags") or []),
        name=f"{cfg.task_name}-{cfg.run_name}-{run_dir.name}",
        save_dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def train(cfg: DictConfig) -> Path:
    """Fine-tune a LoRA for ``cfg.subject``; returns the run directory."""
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    subject = Subject.from_config(cfg.subject)
    model_spec = model_spec_from_config(cfg.model)
    data_spec = DataSpec.from_config(cfg.data)
    loss_spec = LossSpec(
        tau_in=config_value(cfg, "loss.tau_in", float), tau_out=config_value(cfg, "loss.tau_out", float),
        beta=config_value(cfg, "loss.beta", float), regular_mode=str(cfg.loss.regular_mode),
        regular_prob=config_value(cfg, "loss.regular_prob", float),
    )
    lora_spec = LoraSpec(
        rank=config_value(cfg, "lora.rank", int), alpha=config_value(cfg, "lora.alpha", float),
        dropout=config_value(cfg, "lora.dropout", float), target_modules=tuple(cfg.lora.target_modules),
    )
    optim_spec = OptimSpec(
        lr=config_value(cfg, "optim.lr", float), betas=tuple(cfg.optim.betas), weight_decay=config_value(cfg, "optim.weight_decay", float),
        eps=config_value(cfg, "optim.eps", float), warmup_steps=config_value(cfg, "optim.warmup_steps", int),
        fused=bool(cfg.optim.fused),
    )
    max_steps = config_value(cfg, "trainer.max_steps", int)
    if max_steps < 1:
        raise DreamMixError(f"max_steps must be >= 1, got {max_steps}", "trainer.max_steps")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(str(ckpt_path)).is_file():
        raise DreamMixError(f"checkpoint not found: {ckpt_path}", "ckpt_path")
    if not subject.image_dir.is_dir():  # fail before loading gigabytes of weights
        raise DreamMixError(f"image folder of subject '{subject.name}' not found: {subject.image_dir}", "subject.image_dir")

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    device = _training_device(cfg.trainer)
    pipe = load_pipeline(model_spec, resolve_dtype(model_spec.weight_dtype, device))
    for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        part.to(device)
    encoder = FrozenInputEncoder(pipe, device)
    config_value(cfg, "trainer.accumulate_grad_batches", int)  # checked here; Lightning applies it
    datamodule = DreamMixDataModule(
        subject, data_spec, encoder, model_spec.resolution,
        use_regular=loss_spec.beta > 0, seed=int(cfg.seed),
    )
    datamodule.setup("fit")

    callbacks: list[L.Callback] = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="step_{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=int(cfg.checkpoint.every_n_steps) or None, save_top_k=-1, save_last=True,
        )
    ]
    val = cfg.validation
    if int(val.every_n_steps) > 0 and int(val.num_samples) > 0:
        images, masks = _validation_inputs(subject, data_spec, model_spec.resolution, int(val.num_samples))
        embeds, pooled = encoder.encode_prompts([data_spec.source_prompt])
        callbacks.append(SampleGridCallback(
            pipe, images, masks, embeds, pooled, run_dir / "samples", int(val.every_n_steps),
            int(val.num_inference_steps), float(val.guidance_scale), int(cfg.seed),
        ))
    # Everything the text encoders will ever produce is cached now: free their memory.
    pipe.text_encoder.to("cpu")
    pipe.text_encoder_2.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from diffusers import DDPMScheduler

    module = DreamMixLoRAModule(
        pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), lora_spec, loss_spec, optim_spec,
        gradient_checkpointing=model_spec.gradient_checkpointing, seed=int(cfg.seed),
    )
    logger = _logger(cfg, run_dir)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["accelerator"] = device.type
    trainer = L.Trainer(
        **trainer_kwargs, max_epochs=-1, default_root_dir=str(run_dir), logger=logger, callbacks=callbacks,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        weights = save_lora(pipe.unet, run_dir / "lora", lora_spec)
        info = {
            "subject": subject.name, "class_noun": subject.class_noun, "source_prompt": data_spec.source_prompt,
            "base_model": model_spec.pretrained, "steps": trainer.global_step,
            "lora": {"rank": lora_spec.rank, "alpha": lora_spec.alpha, "target_modules": list(lora_spec.target_modules)},
            "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        }
        (run_dir / "lora" / RUN_INFO_NAME).write_text(json.dumps(info, indent=2), encoding="utf-8")
        log.info("LoRA written to %s", weights)
    finally:
        if logger:
            import wandb

            wandb.finish()  # one W&B run per Hydra job, also in multirun
    return run_dir
