"""The random-weight SDXL architecture used for GPU performance runs has the real shapes."""

import torch


def test_sdxl_arch_has_the_published_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dreammix.models import sdxl_arch

    with torch.device("meta"):  # shapes only: no memory, no time
        unet = UNet2DConditionModel(**sdxl_arch.UNET_CONFIG)
        vae = AutoencoderKL(**sdxl_arch.VAE_CONFIG)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_arch.TEXT_ENCODER_2_CONFIG, vocab_size=49408))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(unet) / 2.567e9 - 1) < 0.01  # SDXL UNet: 2.567 B parameters
    assert abs(count(vae) / 83.65e6 - 1) < 0.01
    assert abs(count(te2) / 694.7e6 - 1) < 0.01
    assert unet.config.in_channels == 9


def test_sdxl_arch_pipeline_is_built_in_the_asked_dtype_with_an_fp32_vae():
    from dreammix.models.sdxl_arch import build_sdxl_arch_pipeline

    pipe = build_sdxl_arch_pipeline(torch.bfloat16, device="meta")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32  # the SDXL VAE overflows in half precision
    assert torch.get_default_dtype() == torch.float32  # restored
