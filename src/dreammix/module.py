"""The LightningModule: LoRA fine-tuning of the inpainting UNet with Eq. 7 / Eq. 8.

Inputs arrive pre-encoded (:mod:`dreammix.data.frozen`), so a training step is: draw noise and
timesteps, one UNet call over the source and regular batches together, the mask-reweighted loss
of each part, ``L = L_source + beta * L_regular``. Only LoRA parameters train, and checkpoints
hold only them (plus optimizer state), a few MB instead of the 10 GB UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch

from dreammix.errors import DreamMixError
from dreammix.losses import WEIGHTINGS, dual_dataset_loss, reweighted_mse
from dreammix.models.lora import LoraSpec, add_lora

REGULAR_MODES = ("paired", "sampled")


@dataclass(frozen=True)
class LossSpec:
    """``conf/loss/*.yaml``: Eq. 7 weights, Eq. 8 trade-off, how regular data enters a step."""

    tau_in: float = 1.5
    tau_out: float = 0.7
    beta: float = 0.4
    regular_mode: str = "paired"
    regular_prob: float = 0.3
    # squared_error: Eq. 7 (paper) | pred_and_target: the public code's (w·p − w·t)², see losses.py
    weighting: str = "squared_error"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise DreamMixError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}", "loss.weighting")
        if self.tau_in < 0 or self.tau_out < 0:
            raise DreamMixError("tau_in and tau_out must be >= 0", "loss.tau_in/loss.tau_out")
        if self.beta < 0:
            raise DreamMixError(f"beta must be >= 0, got {self.beta}", "loss.beta")
        if self.regular_mode not in REGULAR_MODES:
            raise DreamMixError(f"regular_mode must be one of {REGULAR_MODES}, got {self.regular_mode!r}", "loss.regular_mode")
        if not 0.0 <= self.regular_prob <= 1.0:
            raise DreamMixError("regular_prob must be in [0, 1]", "loss.regular_prob")


OPTIMIZERS = ("adam", "adamw", "adam8bit", "prodigy")


@dataclass(frozen=True)
class OptimSpec:
    """``conf/optim/*.yaml``: the optimizer (paper: Adam, lr 1e-4). ``adamw`` decouples weight
    decay; ``adam8bit`` is bitsandbytes' 8-bit AdamW (CUDA); ``prodigy`` (prodigyopt) estimates the
    step size itself, so its ``lr`` is a multiplier (1.0)."""

    name: str = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    fused: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise DreamMixError(f"lr must be > 0, got {self.lr}", "optim.lr")
        if self.name not in OPTIMIZERS:
            raise DreamMixError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}", "optim.name")
        if self.name == "adam8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise DreamMixError("8-bit Adam needs the bitsandbytes package (pip install bitsandbytes) and a CUDA GPU", "optim.name") from exc
        if self.name == "prodigy":
            try:
                import prodigyopt  # noqa: F401
            except ImportError as exc:
                raise DreamMixError("Prodigy needs the prodigyopt package (pip install prodigyopt)", "optim.name") from exc

    def build(self, params, device_type: str) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (fused Adam/AdamW kernels on CUDA when ``fused``)."""
        kwargs = dict(lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay)
        fused = self.fused and device_type == "cuda"
        if self.name == "adam":
            return torch.optim.Adam(params, fused=fused, **kwargs)
        if self.name == "adamw":
            return torch.optim.AdamW(params, fused=fused, **kwargs)
        if self.name == "adam8bit":
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(params, **kwargs)
        from prodigyopt import Prodigy

        return Prodigy(params, **kwargs)


@dataclass(frozen=True)
class NoiseSpec:
    """``noise:`` in ``conf/train.yaml``: diffusion-training options of diffusers' and kohya's SDXL
    LoRA trainers.

    ``offset`` (noise offset, Guttenberg 2023): ``ε ← ε + offset · n`` with ``n ~ N(0, 1)`` per
    sample and channel, constant over the image, so the model can learn to shift the mean
    brightness. ``snr_gamma`` (min-SNR-γ, Hang et al. 2023): each sample's loss is weighted by
    ``min(SNR(t), γ) / SNR(t)`` (ε-prediction) or ``min(SNR(t), γ) / (SNR(t) + 1)``
    (v-prediction), ``SNR(t) = ᾱ_t / (1 − ᾱ_t)``; 0 = off (paper: off)."""

    offset: float = 0.0
    snr_gamma: float = 0.0

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise DreamMixError(f"noise offset must be >= 0, got {self.offset}", "noise.offset")
        if self.snr_gamma < 0:
            raise DreamMixError(f"snr_gamma must be >= 0 (0 = off), got {self.snr_gamma}", "noise.snr_gamma")


def inpaint_unet_forward(unet, noisy, timesteps, mask, masked_latents, prompt_embeds, pooled_embeds, time_ids, dtype=None):
    """One call of a 9-channel SDXL inpainting UNet: input = noisy ⊕ mask ⊕ masked-image latents.

    ``dtype`` is the UNet's weight dtype; pass it when known (``unet.dtype`` walks every module
    of the model on each access, a few ms per step on SDXL).
    """
    if unet.config.in_channels != noisy.shape[1] + mask.shape[1] + masked_latents.shape[1]:
        raise DreamMixError(
            f"the UNet takes {unet.config.in_channels} input channels, an inpainting UNet needs 9", "model.pretrained"
        )
    dtype = dtype or unet.dtype
    sample = torch.cat([noisy, mask, masked_latents], dim=1).to(dtype)
    return unet(
        sample,
        timesteps,
        encoder_hidden_states=prompt_embeds.to(dtype),
        added_cond_kwargs={"text_embeds": pooled_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
        return_dict=False,
    )[0]


class DreamMixLoRAModule(L.LightningModule):
    """Trains a LoRA adapter on ``unet`` with the DreamMix objective."""

    def __init__(
        self,
        unet: torch.nn.Module,
        noise_scheduler,
        lora: LoraSpec,
        loss: LossSpec,
        optim: OptimSpec,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        noise: NoiseSpec | None = None,
    ):
        super().__init__()
        self.noise_spec = noise or NoiseSpec()
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.lora_spec, self.loss_spec, self.optim_spec = lora, loss, optim
        self.seed = seed
        torch.manual_seed(seed)  # LoRA init must not depend on what consumed the global RNG before
        self.lora_params = add_lora(unet, lora)
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable), f"non-LoRA parameters would train: {trainable[:3]}"
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # from_pretrained leaves the base in eval mode (Lightning warns about it at fit start); no
        # SDXL UNet layer acts differently in train mode, and Lightning switches to eval for
        # validation and back.
        unet.train()
        # Checkpoints carry only the LoRA weights; the frozen base comes from the model config.
        self.strict_loading = False
        self.unet_dtype = unet.dtype

    # -- training ---------------------------------------------------------------------------
    def _batch_generator(self, batch_number: int, device: torch.device) -> torch.Generator:
        """Noise and timesteps are a function of (seed, micro-batch number in the data stream):
        resumed runs repeat them exactly, and micro-batches of one accumulation window differ."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed * 1_000_003 + batch_number)
        return gen

    def _noise_and_target(self, latents: torch.Tensor, generator: torch.Generator):
        n_train = self.noise_scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, n_train, (latents.shape[0],), generator=generator, device=latents.device)
        if self.noise_spec.offset > 0:  # drawn after t: runs without an offset keep their stream
            shift = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
            noise = noise + self.noise_spec.offset * shift
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise DreamMixError(f"unsupported prediction_type {prediction_type!r}", "model scheduler config")
        return noisy, t, target

    def _batch_parts(self, batch: dict, batch_number: int) -> tuple[dict | None, dict | None]:
        """(source part, regular part) of this step; either may be absent."""
        source, regular = batch["source"], batch.get("regular")
        if regular is None or self.loss_spec.beta == 0:
            return source, None
        if self.loss_spec.regular_mode == "sampled":
            # Reference-code behaviour: a whole step is regular with probability regular_prob.
            draw = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 7919 + batch_number))
            return (None, regular) if draw < self.loss_spec.regular_prob else (source, None)
        return source, regular

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 7 on each part and Eq. 8 on the sum, from one UNet call over both parts.

        Returns ``loss`` and whichever of ``loss_source`` / ``loss_regular`` this step has. In
        ``sampled`` mode a step is one kind only and ``loss`` is that kind's loss (no beta).
        """
        first = batch["source"]
        batch_number = int(first["position"][0]) // first["latents"].shape[0]
        source, regular = self._batch_parts(batch, batch_number)
        parts = [p for p in (source, regular) if p is not None]
        joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "position"}
        latents = joined["latents"]
        noisy, t, target = self._noise_and_target(latents, self._batch_generator(batch_number, latents.device))
        pred = inpaint_unet_forward(
            self.unet, noisy, t, joined["mask"], joined["masked_latents"],
            joined["prompt_embeds"], joined["pooled_embeds"], joined["time_ids"], dtype=self.unet_dtype,
        )
        if self.noise_spec.snr_gamma > 0:
            # min-SNR-γ: per-sample weight w on the squared error, as (√w·pred − √w·target)²
            root = self.min_snr_weights(t).sqrt().view(-1, *[1] * (pred.dim() - 1))
            pred, target = pred.float() * root, target.float() * root
        tau = (self.loss_spec.tau_in, self.loss_spec.tau_out)
        out, start = {}, 0
        for name, part in (("loss_source", source), ("loss_regular", regular)):
            if part is not None:
                end = start + part["latents"].shape[0]
                out[name] = reweighted_mse(pred[start:end], target[start:end], joined["mask"][start:end], *tau,
                                           weighting=self.loss_spec.weighting)
                start = end
        if "loss_source" in out:
            out["loss"] = dual_dataset_loss(out["loss_source"], out.get("loss_regular"), self.loss_spec.beta)
        else:
            out["loss"] = out["loss_regular"]
        return out

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Hang et al. 2023: ``min(SNR, γ)/SNR`` (ε) or ``min(SNR, γ)/(SNR + 1)`` (v) per timestep."""
        alphas = self.noise_scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alphas / (1 - alphas)
        clipped = snr.clamp(max=self.noise_spec.snr_gamma)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        if self._is_log_step(batch_idx):
            self._log_losses(losses, batch)
        return losses["loss"]

    def _is_log_step(self, batch_idx: int) -> bool:
        """The last micro-batch of every ``trainer.log_every_n_steps``-th optimizer step."""
        trainer = self.trainer
        last_micro_batch = (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0
        return last_micro_batch and self.global_step % max(1, trainer.log_every_n_steps) == 0

    def _log_losses(self, losses: dict[str, torch.Tensor], batch: dict) -> None:
        """``train/loss`` (+ its parts and the learning rate) to the loggers and the progress bar,
        on log steps only. Every ``self.log`` call costs Lightning ~1.5 ms of bookkeeping per step
        even when nothing is written, ~10 % of a small model's step (measured by ``make perf``),
        so the loggers get the values directly and ``self.log`` only feeds the progress bar."""
        bs = sum(part["latents"].shape[0] for part in batch.values())
        self.log("train/loss", losses["loss"], prog_bar=True, logger=False, batch_size=bs)
        if not self.loggers:
            return
        metrics = {f"train/{k}": v.item() for k, v in losses.items()}
        metrics["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def configure_optimizers(self):
        spec = self.optim_spec
        optimizer = spec.build(self.lora_params, self.device.type)
        if spec.warmup_steps <= 0:
            return optimizer  # constant lr (paper): no scheduler to step every optimizer step
        warmup = spec.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: LoRA only ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        checkpoint["dreammix_lora"] = {"rank": self.lora_spec.rank, "alpha": self.lora_spec.alpha,
                                       "target_modules": list(self.lora_spec.target_modules),
                                       "use_dora": self.lora_spec.use_dora,
                                       # what the kohya module names depend on (src/export_lora.py)
                                       "unet_layout": {"layers_per_block": self.unet.config.layers_per_block,
                                                       "up_block_types": list(self.unet.config.up_block_types)}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("dreammix_lora")
        configured = {"rank": self.lora_spec.rank, "alpha": self.lora_spec.alpha,
                      "target_modules": list(self.lora_spec.target_modules)}
        configured["use_dora"] = self.lora_spec.use_dora
        if saved and any(saved.get(k, False if k == "use_dora" else None) != v for k, v in configured.items()):
            raise DreamMixError(f"checkpoint LoRA {saved} does not match the configured LoRA", "ckpt_path / lora.*")
