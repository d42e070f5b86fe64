"""The real SDXL inpainting architectures with random weights (``model=sdxl_arch``).

For performance runs on a GPU without downloading 7 GB of weights: the UNet, VAE and both text
encoders have exactly the shapes of ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1`` (so step
time, memory and FLOPs are the real ones), initialised at random. Nothing here is meant to
produce images worth looking at.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from dreammix.models.tiny import assemble_inpaint_pipeline

UNET_CONFIG = dict(
    sample_size=128,
    in_channels=9,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14 text tower
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    hidden_act="quick_gelu", projection_dim=768, max_position_embeddings=77,
)
TEXT_ENCODER_2_CONFIG = dict(  # OpenCLIP ViT-bigG/14 text tower
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280, max_position_embeddings=77,
)


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules created in the block get parameters of ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_sdxl_arch_pipeline(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0):
    """A ``StableDiffusionXLInpaintPipeline`` with SDXL-inpainting shapes and random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=49408)
    torch.manual_seed(seed)
    with torch.device(device):
        with default_dtype(dtype):  # built in the target dtype: no fp32 copy of 3.5 B parameters first
            unet = UNet2DConditionModel(**UNET_CONFIG)
            text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG, **special))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG, **special))
        vae = AutoencoderKL(**VAE_CONFIG)  # fp32: the SDXL VAE overflows in half precision
    pipe = assemble_inpaint_pipeline(unet, vae, text_encoder, text_encoder_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe
