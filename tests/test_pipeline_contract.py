"""DreamMixInpaintPipeline's smaller contracts, found blind by `make mutants`: wrapping a loaded
pipeline, the LoRA scale, the text-conditioning checks and cache key, the VAE posterior mode and
the x₀ formula's fallback branch. Expected values come from diffusers / peft / safetensors, or from
the formulas written out here."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionXLInpaintPipeline
from safetensors.torch import load_file

from conftest import LORA_ALPHA, LORA_RANK, make_real_lora
from dreammix.errors import DreamMixError
from dreammix.pipeline import DreamMixInpaintPipeline

PROMPT = "a photo of sks red can"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    return p


def test_from_base_keeps_the_loaded_pipelines_modules_config_and_name(tiny_model_dir):
    # non-default values, so a config that falls back to the class defaults shows
    base = StableDiffusionXLInpaintPipeline.from_pretrained(
        tiny_model_dir, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
    )
    base.unet.to(torch.bfloat16)
    new = DreamMixInpaintPipeline.from_base(base)
    assert new.config.requires_aesthetics_score is True
    assert new.config.force_zeros_for_empty_prompt is False
    assert str(new.config._name_or_path) == str(tiny_model_dir)
    assert new.unet is base.unet and new.vae is base.vae and new.text_encoder_2 is base.text_encoder_2
    assert new.unet.dtype == torch.bfloat16  # from_pipe would have cast it to fp32
    assert getattr(new, "watermark", None) is None


def test_load_subject_lora_scale_multiplies_the_saved_low_rank_update(tiny_model_dir, tmp_path):
    """peft's LoRA layer: y = W x + scale · (α / r) · B A x; the B, A and α come from the file."""
    lora_dir = make_real_lora(tiny_model_dir, tmp_path / "lora")
    tensors = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    down_key = next(k for k in sorted(tensors) if k.endswith("to_k.lora_A.weight") or k.endswith("to_k.lora.down.weight"))
    up_key = down_key.replace("lora_A", "lora_B").replace("lora.down", "lora.up")
    module_path = down_key.removeprefix("unet.").split(".lora")[0]
    A, B = tensors[down_key].float(), tensors[up_key].float()
    assert B.abs().max() > 0

    x = torch.randn(3, A.shape[1], generator=torch.Generator().manual_seed(0))
    for scale in (None, 0.5):  # None: the default, the LoRA as trained (scale 1)
        p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
        p.load_subject_lora(lora_dir) if scale is None else p.load_subject_lora(lora_dir, scale=scale)
        layer = p.unet.get_submodule(module_path)
        with torch.no_grad():
            out = layer(x)
            base = layer.base_layer(x)
        expected = base + (1.0 if scale is None else scale) * (LORA_ALPHA / LORA_RANK) * x @ A.T @ B.T
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_the_identifier_can_never_be_eliminated(pipe):
    with pytest.raises(DreamMixError, match="cannot eliminate the identifier"):
        pipe.encode_conditions(PROMPT, eliminate=["sks"])
    with pytest.raises(DreamMixError, match="cannot eliminate the identifier"):
        pipe.encode_conditions(PROMPT, eliminate=["red", "sks can"])


def test_eliminating_words_needs_the_identifier_in_the_prompt(pipe):
    with pytest.raises(DreamMixError, match="no 'sks' identifier"):
        pipe.encode_conditions("a photo of a red can", eliminate=["red"])
    pipe.encode_conditions("a photo of a red can")  # no TAS, no identifier needed


def test_negative_prompt_reaches_the_unconditional_embedding_and_the_cache_key(pipe):
    plain = pipe.encode_conditions(PROMPT, guidance_scale=5.0)
    neg = pipe.encode_conditions(PROMPT, negative_prompt="blurry, low quality", guidance_scale=5.0)
    direct = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry, low quality")
    for stage, cond in neg.stages.items():
        # CFG batch: [negative, positive]
        torch.testing.assert_close(cond.embeds[0], direct[1][0])
        torch.testing.assert_close(cond.embeds[1], direct[0][0])
        torch.testing.assert_close(cond.pooled[0], direct[3][0])
        assert not torch.equal(cond.embeds[0], plain.stages[stage].embeds[0])
    assert neg.key != plain.key


def test_conditions_come_in_the_unets_dtype(tiny_model_dir):
    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.unet.to(torch.bfloat16)
    conds = p.encode_conditions(PROMPT, eliminate=["red"])
    for cond in conds.stages.values():
        assert cond.embeds.dtype == torch.bfloat16 and cond.pooled.dtype == torch.bfloat16


def test_vae_encode_mean_mode_is_the_posterior_mode_scaled(pipe):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        got = pipe._vae_encode(x, None, sample=False, dtype=torch.float32)
        again = pipe._vae_encode(x, None, sample=False, dtype=torch.float32)
        expected = pipe.vae.config.scaling_factor * pipe.vae.encode(x).latent_dist.mode()
        half = pipe._vae_encode(x, None, sample=False, dtype=torch.bfloat16)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, again)
    assert half.dtype == torch.bfloat16


def test_vae_encode_sample_mode_draws_from_the_generator(pipe):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
        got = pipe._vae_encode(x, torch.Generator().manual_seed(7), sample=True, dtype=torch.float32)
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, pipe.vae.config.scaling_factor * (dist.mean + dist.std * eps))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_predict_x0_from_alphas_cumprod_before_the_first_step(pipe, scheduler_cls, kind):
    """Without a step taken (no step index) the noise level is ᾱ[t]: x₀ = (x − √(1−ᾱ) ε) / √ᾱ or
    x₀ = √ᾱ x − √(1−ᾱ) v."""
    scheduler = scheduler_cls.from_config(pipe.scheduler.config, prediction_type=kind)
    scheduler.set_timesteps(10)
    saved = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        g = torch.Generator().manual_seed(3)
        x, pred = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        t = scheduler.timesteps[2]
        got = pipe._predict_x0(None, x, pred, t)
    finally:
        pipe.scheduler = saved
    a = float(scheduler.alphas_cumprod[int(t)])
    expected = (x - (1 - a) ** 0.5 * pred) / a**0.5 if kind == "epsilon" else a**0.5 * x - (1 - a) ** 0.5 * pred
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encode_conditions_uses_the_given_identifier(pipe):
    """A subject trained with another rare token (``adm.identifier=zwx``): that token, not
    ``sks``, is the one that can never be eliminated."""
    with pytest.raises(DreamMixError, match="cannot eliminate the identifier 'zwx'"):
        pipe.encode_conditions("a photo of zwx red can", eliminate=["zwx can"], identifier="zwx")
    conditions = pipe.encode_conditions("a photo of zwx red can", eliminate=["sks"], identifier="zwx")
    assert conditions.key[2] == ("sks",)
    from test_pipeline import _image, _mask

    with pytest.raises(DreamMixError, match="cannot eliminate the identifier 'zwx'"):  # the call checks it too
        pipe(_image(64, 64), _mask(64, 64, (16, 48), (16, 48)), "a photo of zwx red can", eliminate=["zwx can"], identifier="zwx",
             num_inference_steps=1)  # fmt: skip


def test_encode_conditions_with_tas_context_equal_the_calls_own_encoding(pipe):
    """``sampler.tas_context`` changes the TAS direction (the words encoded inside the context), so
    conditions encoded ahead with it must be the ones the call builds with it, and conditions
    encoded without it must be refused by a call that uses it (and the other way round)."""
    from dreammix.sampling import SamplerSpec

    from test_pipeline import _image, _mask

    context = "a photo of a sks"
    ahead = pipe.encode_conditions(PROMPT, eliminate=["red"], guidance_scale=5.0, tas_context=context)
    own = pipe._encode_conditions(PROMPT, None, ["red"], ("local", "global"), 1, torch.device("cpu"), torch.float32, context)
    plain = pipe._encode_conditions(PROMPT, None, ["red"], ("local", "global"), 1, torch.device("cpu"), torch.float32, None)
    assert set(ahead.stages) == set(own)
    for stage in own:
        torch.testing.assert_close(ahead.stages[stage].embeds, own[stage].embeds)
        torch.testing.assert_close(ahead.stages[stage].pooled, own[stage].pooled)
    assert any(not torch.allclose(own[s].embeds, plain[s].embeds) for s in own)  # the context matters here
    image, mask = _image(64, 64), _mask(64, 64, (16, 48), (16, 48))
    common = dict(eliminate=["red"], guidance_scale=5.0, num_inference_steps=2, lambda_=0.5, output_type="latent")
    with_context = SamplerSpec(tas_context=context)
    pipe(image, mask, PROMPT, conditions=ahead, sampler=with_context, generator=torch.Generator().manual_seed(0), **common)
    with pytest.raises(DreamMixError, match="tas_context than this call's"):
        pipe(image, mask, PROMPT, conditions=ahead, generator=torch.Generator().manual_seed(0), **common)
    without = pipe.encode_conditions(PROMPT, eliminate=["red"], guidance_scale=5.0)
    with pytest.raises(DreamMixError, match="tas_context than this call's"):
        pipe(image, mask, PROMPT, conditions=without, sampler=with_context, generator=torch.Generator().manual_seed(0), **common)


@pytest.mark.parametrize(
    "vae_dtype,options",
    [(torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, {"blend": False}), (torch.bfloat16, {"start": "fill_noise"})],
)
def test_a_bf16_pipeline_runs_in_bf16_and_follows_the_fp32_result(pipe, tiny_model_dir, vae_dtype, options):
    """The default precision (UNet and text encoders in bf16, the VAE read into fp32 by
    ``load_pipeline``) and an all-bf16 pipeline: every tensor handed to a module must be cast to
    that module's dtype, the latents stay in the UNet's dtype, and the image follows the fp32 run
    within bf16's rounding; also on the paths that encode images alone (no blending: the masked
    image; ``sampler.start=fill_noise``: the filled image)."""
    import numpy as np

    from dreammix.sampling import SamplerSpec
    from test_pipeline import _image, _mask

    sampler = SamplerSpec(start=options["start"]) if "start" in options else None
    blend = options.get("blend", True)

    def run(pipe, **kw):
        return pipe(_image(64, 64), _mask(64, 64, (16, 48), (16, 48)), PROMPT, eliminate=["red"], num_inference_steps=3,
                    lambda_=0.5, generator=torch.Generator().manual_seed(0), blend=blend, sampler=sampler, **kw)  # fmt: skip

    fp32 = pipe
    bf16 = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    bf16.set_progress_bar_config(disable=True)
    for module in (bf16.unet, bf16.text_encoder, bf16.text_encoder_2):
        module.to(torch.bfloat16)
    bf16.vae.to(vae_dtype)
    latents = run(bf16, output_type="latent").images
    assert latents.dtype == torch.bfloat16
    assert bf16.vae.dtype == vae_dtype  # no silent upcast of a bf16 VAE (only fp16 + force_upcast is)
    got = np.asarray(run(bf16, output_type="np").images, np.float64)
    expected = np.asarray(run(fp32, output_type="np").images, np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).mean() < 0.02  # bf16 keeps 8 bits of mantissa: ~1 % per op


_TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"


@pytest.mark.parametrize(
    "tensors,expected",
    [
        ({"foo": torch.zeros(2, 2)}, "Invalid LoRA checkpoint"),
        ({"unet.foo.lora_A.weight": torch.zeros(2, 2), "unet.foo.lora_B.weight": torch.zeros(2, 2)}, "Target modules {'foo'} not found"),
        ({"lora_unet_foo.lora_down.weight": torch.zeros(2, 2), "lora_unet_foo.lora_up.weight": torch.zeros(2, 2)}, "not found"),
        ({f"{_TO_K}.lora_A.weight": torch.zeros(4), f"{_TO_K}.lora_B.weight": torch.zeros(4)}, "malformed LoRA weights (IndexError"),
        ({f"{_TO_K}.lora_A.weight": torch.zeros(4, 32)}, "malformed LoRA weights (IndexError"),
    ],
    ids=["no-lora-keys", "unknown-module", "kohya-unknown-module", "one-dimensional", "lora_A-without-lora_B"],
)
def test_a_malformed_lora_file_is_one_error_line_naming_the_folder(tiny_model_dir, tmp_path, tensors, expected):
    """Hostile or broken LoRA files (readable, finite, but not a LoRA of this model) end in one
    DreamMixError that names the folder and says what diffusers/peft found, never a traceback."""
    from safetensors.torch import save_file

    folder = tmp_path / "lora"
    folder.mkdir()
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))
    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    with pytest.raises(DreamMixError) as err:
        p.load_subject_lora(folder)
    assert err.value.where == str(folder)
    assert err.value.what.startswith("cannot load LoRA: ") and expected in err.value.what
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_and_its_rescale_are_diffusers_cfg_of_the_unet_output(tiny_model_dir, monkeypatch, rescale):
    """Every scheduler step gets uncond + g·(text − uncond) of that step's UNet output, then
    ``guidance_rescale`` through diffusers' own ``rescale_noise_cfg`` (Lin et al., 2023)."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import rescale_noise_cfg

    from test_pipeline import _image, _mask

    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    outs, steps = [], []
    hook = p.unet.register_forward_hook(lambda m, a, out: outs.append(out[0].detach().clone()))
    real_step = p.scheduler.step
    monkeypatch.setattr(p.scheduler, "step", lambda noise_pred, *a, **k: steps.append(noise_pred.clone()) or real_step(noise_pred, *a, **k))
    try:
        p(_image(64, 64), _mask(64, 64, (16, 48), (16, 48)), PROMPT, num_inference_steps=3, lambda_=0.5, guidance_scale=4.0,
          guidance_rescale=rescale, generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    finally:
        hook.remove()
    assert len(outs) == len(steps) == 3
    for out, got in zip(outs, steps):
        uncond, text = out.chunk(2)
        expected = uncond + 4.0 * (text - uncond)
        if rescale:
            expected = rescale_noise_cfg(expected, text, guidance_rescale=rescale)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if rescale:
        plain = outs[0].chunk(2)
        assert not torch.allclose(steps[0], plain[0] + 4.0 * (plain[1] - plain[0]), atol=1e-4)  # the rescale shows


def _unet_sample_shapes(p, **kwargs):
    from test_pipeline import _image, _mask

    shapes = []
    hook = p.unet.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[-2:])))
    try:
        out = p(_image(48, 96), _mask(48, 96, (20, 28), (10, 80)), PROMPT, num_inference_steps=2, lambda_=0.5,
                generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    finally:
        hook.remove()
    return shapes, out


@pytest.mark.parametrize("resolution", [None, 32, 96])
def test_resolution_sets_the_area_both_stages_are_denoised_at(pipe, resolution):
    """``resolution`` (default: UNet sample size × VAE factor) is the side of the square of equal
    area that each stage runs at (SDXL's ~1 MP buckets): LCG on the crop box, GCH on the whole
    image, both at their own aspect ratio in multiples of the UNet's down-sampling (here 16)."""
    shapes, out = _unet_sample_shapes(pipe, resolution=resolution)
    side = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    left, top, right, bottom = out.crop_box
    assert right - left != bottom - top  # a wide crop box: its width and height cannot be swapped unseen
    for (h, w), (bw, bh) in zip((shapes[0], shapes[1]), ((right - left, bottom - top), (96, 48))):
        s = side / math.sqrt(bw * bh)
        expected = [max(16, int(math.floor(v * s / 16 + 0.5)) * 16) // 8 for v in (bh, bw)]
        assert [h, w] == expected, (resolution, (h, w), expected)


def test_default_feather_radius_is_half_a_latent_cell_at_the_input_size(pipe):
    """feather_radius=None: ceil(vae_factor/2 × input/processing size) pixels, the ratio the
    larger of the two sides' (here a 96×48 input processed at 48×16: ratio 3, radius 12),
    bit-identical to passing it."""
    from test_pipeline import _image, _mask

    def run(**kw):
        return np.asarray(pipe(_image(48, 96), _mask(48, 96, (12, 36), (20, 52)), PROMPT, num_inference_steps=2, lambda_=0.5,
                               generator=torch.Generator().manual_seed(0), resolution=32, **kw).images[0])  # fmt: skip

    full_w, full_h = 48, 16  # processing_size(96, 48, 32, 16): area 32², aspect 2:1, multiples of 16
    ratio = max(96 / full_w, 48 / full_h)
    radius = max(1, math.ceil(pipe.vae_scale_factor * ratio / 2))
    assert radius == 12
    default = run()
    np.testing.assert_array_equal(default, run(feather_radius=radius))
    assert not np.array_equal(default, run(feather_radius=radius // 2))


def test_cross_attention_kwargs_scale_scales_the_subject_lora(tiny_model_dir, tmp_path):
    """diffusers' way to weaken a LoRA per call: ``cross_attention_kwargs={"scale": s}``; 0 gives
    the base model's image, 1 the adapter's."""
    from test_pipeline import _image, _mask

    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    p.load_subject_lora(make_real_lora(tiny_model_dir, tmp_path / "lora"))

    def run(**kw):
        return p(_image(64, 64), _mask(64, 64, (16, 48), (16, 48)), PROMPT, num_inference_steps=2, lambda_=0.5,
                 generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images  # fmt: skip

    full = run()
    with p.adapter_disabled():
        base = run()
    assert not torch.allclose(full, base)
    torch.testing.assert_close(run(cross_attention_kwargs={"scale": 0.0}), base)
    torch.testing.assert_close(run(cross_attention_kwargs={"scale": 1.0}), full)


@pytest.mark.parametrize("tas_stages", [("local", "global"), ("local",), ("global",)])
def test_each_stage_denoises_with_its_own_conditioning(pipe, tas_stages):
    """``tas_stages`` says where the TAS-decomposed embedding is used (Eq. 9): LCG's UNet calls get
    that stage's conditioning, GCH's the other's; the plain prompt's encoding wherever TAS is off."""
    from test_pipeline import _image, _mask

    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        pipe(_image(64, 64), _mask(64, 64, (16, 48), (16, 48)), PROMPT, eliminate=["red"], tas_stages=tas_stages,
             num_inference_steps=4, lambda_=0.5, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
             output_type="latent")  # fmt: skip
    finally:
        hook.remove()
    tas = pipe._encode_conditions(PROMPT, None, ["red"], ("local", "global"), 1, torch.device("cpu"), torch.float32)
    plain = pipe._encode_conditions(PROMPT, None, [], (), 1, torch.device("cpu"), torch.float32)
    assert not torch.allclose(tas["local"].embeds, plain["local"].embeds)  # TAS changes the embedding here
    assert len(seen) == 4
    for step, embeds in enumerate(seen):
        stage = "local" if step < 2 else "global"
        expected = (tas if stage in tas_stages else plain)[stage].embeds
        torch.testing.assert_close(embeds, expected, msg=f"step {step} ({stage})")
