"""Lightning callbacks of the fine-tune: sample grids during training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from dreammix.imaging import image_strip


class SampleGridCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, inpaint a few source images with the current
    LoRA and save/log a grid (rows: masked input | sample), so a run's progress is visible.

    Prompt embeddings are pre-computed (the text encoders are gone by then), so rendering costs
    only UNet + VAE-decode calls.
    """

    def __init__(
        self,
        pipe,
        images: list[Image.Image],
        masks: list[Image.Image],
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        out_dir: str | Path,
        every_n_steps: int,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        seed: int = 0,
    ):
        self.pipe, self.images, self.masks = pipe, images, masks
        self.prompt_embeds, self.pooled_embeds = prompt_embeds, pooled_embeds
        self.out_dir = Path(out_dir)
        self.every_n_steps, self.steps, self.guidance_scale, self.seed = every_n_steps, num_inference_steps, guidance_scale, seed
        self._last_step = -1

    @torch.no_grad()
    def render(self, device: torch.device) -> Image.Image:
        rows = []
        for image, mask in zip(self.images, self.masks):
            out = self.pipe(
                prompt_embeds=self.prompt_embeds.to(device),
                pooled_prompt_embeds=self.pooled_embeds.to(device),
                negative_prompt_embeds=torch.zeros_like(self.prompt_embeds).to(device),
                negative_pooled_prompt_embeds=torch.zeros_like(self.pooled_embeds).to(device),
                image=image,
                mask_image=mask,
                strength=1.0,  # the inpaint pipeline's default (0.9999) keeps a trace of the input
                height=image.height,
                width=image.width,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(self.seed),
                output_type="pil",
            ).images[0]
            keep = np.asarray(mask.convert("L"))[..., None] < 128
            masked = Image.fromarray((np.asarray(image) * keep + 127 * ~keep).astype(np.uint8))
            rows.append(image_strip([masked, out]))
        grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
        for i, row in enumerate(rows):
            grid.paste(row, (0, i * rows[0].height))
        return grid

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        if not trainer.is_global_zero:  # DDP: one grid per step, from rank 0
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        vae_dtype = self.pipe.vae.dtype
        grid = self.render(pl_module.device)
        self.pipe.vae.to(dtype=vae_dtype)  # diffusers' VAE encode may leave it in the UNet's dtype
        pl_module.train(was_training)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grid.save(self.out_dir / f"step_{step:06d}.png")
        log_image = getattr(trainer.logger, "log_image", None)
        if log_image is not None:
            log_image(key="val/samples", images=[grid], step=step)
