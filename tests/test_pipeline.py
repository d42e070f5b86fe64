"""DreamMixInpaintPipeline on the tiny model: DIF invariants, TAS wiring, LoRA toggling, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch

from dreammix.crop import composite, dilate, feather, lcg_crop_box
from dreammix.errors import DreamMixError
from dreammix.pipeline import DreamMixInpaintPipeline, split_steps

PROMPT = "a photo of sks red can"
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(h, w, rows, cols):
    m = np.zeros((h, w), np.float32)
    m[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return m


def _run(pipe, image, mask, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(image, mask, kwargs.pop("prompt", PROMPT), generator=torch.Generator().manual_seed(seed), **kwargs)


def test_split_steps_rounds_lambda_t():
    assert [split_steps(lam, 30) for lam in (0.0, 0.7, 1.0)] == [0, 21, 30]
    assert split_steps(0.5, 5) == 3 and split_steps(0.1, 4) == 0  # halves round up


def test_lambda_0_is_diffusers_sdxl_inpainting(pipe, tiny_model_dir):
    """GCH only, without the Eq. 6 blend, is exactly diffusers' pipeline at strength 1 — and the
    final image is that output composited into the input through the feathered mask."""
    from diffusers import StableDiffusionXLInpaintPipeline

    base = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    base.set_progress_bar_config(disable=True)
    image, mask = _image(64, 64), _mask(64, 64, (16, 40), (24, 48))  # mask on the 8-px latent grid
    mask_pil = PIL.Image.fromarray((mask * 255).astype(np.uint8))
    ref = dict(prompt=PROMPT, image=image, mask_image=mask_pil, strength=1.0, num_inference_steps=STEPS, height=64, width=64)
    ours_lat = _run(pipe, image, mask, lambda_=0.0, blend=False, output_type="latent").images
    ref_lat = base(**ref, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(ours_lat, ref_lat)

    out = _run(pipe, image, mask, lambda_=0.0, blend=False, feather_radius=2)
    ref_img = base(**ref, generator=torch.Generator().manual_seed(0)).images[0]
    expected = composite(np.asarray(image), np.asarray(ref_img), feather(mask, 2))
    assert np.array_equal(np.asarray(out.images[0]), expected)
    assert out.lcg_images is None and out.crop_box is None and out.lcg_steps == 0


def test_lambda_1_is_the_single_stage_run_on_the_crop(pipe):
    """LCG only = inpainting the crop m' alone (same noise, same schedule); final = x^G."""
    image, mask = _image(128, 128, seed=1), _mask(128, 128, (56, 72), (50, 70))
    box = lcg_crop_box(mask)
    assert (box.width, box.height) == (64, 64)  # = model resolution: no resampling in between
    lcg = _run(pipe, image, mask, lambda_=1.0, output_type="latent").images
    crop_image = image.crop(box.as_tuple())
    crop_mask = mask[box.slices()]
    single = _run(pipe, crop_image, crop_mask, lambda_=0.0, output_type="latent").images
    assert torch.equal(lcg, single)

    out = _run(pipe, image, mask, lambda_=1.0)
    assert out.crop_box == box.as_tuple() and out.lcg_steps == STEPS
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(out.lcg_images[0]))


def test_non_square_input_keeps_size_and_pixels_outside_the_dilated_mask(pipe):
    image = _image(427, 640, seed=2)
    mask = _mask(427, 640, (150, 260), (300, 420))
    out = _run(pipe, image, mask, lambda_=0.5, feather_radius=5, num_inference_steps=2)
    final, x = np.asarray(out.images[0]), np.asarray(image)
    assert out.images[0].size == (640, 427) and out.lcg_images[0].size == (640, 427)
    far = dilate(mask, 10) == 0
    assert np.array_equal(final[far], x[far])
    assert np.abs(final[mask > 0].astype(int) - x[mask > 0]).mean() > 10  # the hole was repainted
    # x^G changes only inside the crop box m'
    left, top, right, bottom = out.crop_box
    outside_box = np.ones((427, 640), bool)
    outside_box[top:bottom, left:right] = False
    assert np.array_equal(np.asarray(out.lcg_images[0])[outside_box], x[outside_box])


def test_fixed_seed_is_deterministic_and_seeds_differ(pipe):
    image, mask = _image(64, 96, seed=3), _mask(64, 96, (10, 40), (30, 70))
    a = _run(pipe, image, mask, seed=7, num_images_per_prompt=2)
    b = _run(pipe, image, mask, seed=7, num_images_per_prompt=2)
    c = _run(pipe, image, mask, seed=8)
    assert len(a.images) == 2
    for x, y in zip(a.images, b.images):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_dif_adds_no_unet_calls_and_vae_work_only_at_stage_edges(pipe):
    calls = {"unet": 0, "encode": 0, "decode": 0, "text": 0, "text_2": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    handles = [
        pipe.unet.register_forward_hook(count("unet")),
        pipe.vae.encoder.register_forward_hook(count("encode")),
        pipe.vae.decoder.register_forward_hook(count("decode")),
        pipe.text_encoder.register_forward_hook(count("text")),
        pipe.text_encoder_2.register_forward_hook(count("text_2")),
    ]
    seen = []

    def record(_pipe, i, t, kwargs):
        seen.append((i, float(t), kwargs["stage"]))
        return {}

    try:
        _run(
            pipe, _image(64, 64), _mask(64, 64, (8, 30), (8, 30)), lambda_=0.5, num_inference_steps=6,
            eliminate=["red"], callback_on_step_end=record,
        )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    # 6 steps = 6 UNet calls (CFG batched); one batched encode per stage (masked image + z^L/z^G),
    # 2 decodes; prompt and TAS words in one batch per text encoder (the zero negative costs none)
    assert calls == {"unet": 6, "encode": 2, "decode": 2, "text": 1, "text_2": 1}
    # one schedule: GCH continues at step k = 3 with the next timestep, it does not restart
    pipe.scheduler.set_timesteps(6)
    assert seen == [(i, float(t), "local" if i < 3 else "global") for i, t in enumerate(pipe.scheduler.timesteps)]


@pytest.mark.parametrize("pixels_per_call", [1024 * 1024, 64 * 64])
@pytest.mark.parametrize("generator", ["one", "list"])
def test_batched_stage_encode_matches_two_encodes_and_their_random_stream(pipe, generator, pixels_per_call, monkeypatch):
    """One encoder call (small images) or one per image (large images, less memory) for (masked
    image, clean image) = the sampled masked latent and the mean of two separate calls, with the
    same draws from the generator(s) (so later noise is unchanged)."""
    from dreammix import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "VAE_ENCODE_PIXELS_PER_CALL", pixels_per_call)
    calls = []
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    masked = pixels * (torch.rand(1, 1, 64, 64) < 0.5)

    def gen():
        g = [torch.Generator().manual_seed(s) for s in (3, 4)]
        return g if generator == "list" else g[0]

    g_one, g_two = gen(), gen()
    sampled, mean = pipe._vae_encode_masked_and_clean(masked, pixels, g_one, torch.float32)
    hook.remove()
    assert calls == ([4] if pixels_per_call > 64 * 64 else [1, 1, 1, 1])
    ref_sampled = pipe._vae_encode(masked, g_two, sample=True, dtype=torch.float32)
    ref_mean = pipe._vae_encode(pixels, None, sample=False, dtype=torch.float32)
    torch.testing.assert_close(sampled, ref_sampled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_one if isinstance(g_one, list) else [g_one], g_two if isinstance(g_two, list) else [g_two]):
        assert torch.equal(a.get_state(), b.get_state())


def test_batched_tas_text_encoding_matches_separate_calls(pipe):
    """Prompt + TAS words in one ``encode_prompt`` batch = Eq. 9 on two separate encodings."""
    from dreammix.tas import count_text_tokens, decompose_prompt_embeds

    pipe._guidance_scale = 7.5
    pipe._cross_attention_kwargs = None
    conds = pipe._encode_conditions(PROMPT, "blurry", ["red", "silver"], ("local",), 2, torch.device("cpu"), torch.float32)
    pe, npe, pooled, npooled = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=2, do_classifier_free_guidance=True, negative_prompt="blurry"
    )
    epe, _, epooled, _ = pipe.encode_prompt("red silver", device="cpu", do_classifier_free_guidance=False)
    n_p, n_e = count_text_tokens(pipe.tokenizer, PROMPT), count_text_tokens(pipe.tokenizer, "red silver")
    tas, tas_pooled = decompose_prompt_embeds(pe, pooled, epe, epooled, n_p, n_e)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conds["local"].embeds, torch.cat([npe, tas]), **close)
    torch.testing.assert_close(conds["local"].pooled, torch.cat([npooled, tas_pooled]), **close)
    torch.testing.assert_close(conds["global"].embeds, torch.cat([npe, pe]), **close)
    torch.testing.assert_close(conds["global"].pooled, torch.cat([npooled, pooled]), **close)


def test_second_order_scheduler_is_rejected(pipe):
    from diffusers import HeunDiscreteScheduler

    original = pipe.scheduler
    pipe.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        with pytest.raises(DreamMixError, match="second-order"):
            _run(pipe, _image(64, 64), _mask(64, 64, (8, 30), (8, 30)))
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize(
    "rows,cols",
    [((0, 12), (0, 20)), ((60, 64), (40, 64)), ((28, 36), (44, 52)), ((0, 64), (0, 96))],
    ids=["top-left-border", "bottom-right-border", "tiny-1pct", "full"],
)
def test_mask_edge_cases(pipe, rows, cols):
    image, mask = _image(64, 96, seed=4), _mask(64, 96, rows, cols)
    out = _run(pipe, image, mask, feather_radius=2, num_inference_steps=2)
    final, x = np.asarray(out.images[0]), np.asarray(image)
    assert out.images[0].size == (96, 64)
    far = dilate(mask, 4) == 0
    assert np.array_equal(final[far], x[far])
    left, top, right, bottom = out.crop_box
    assert 0 <= left < right <= 96 and 0 <= top < bottom <= 64
    if mask.all():
        assert out.crop_box == (0, 0, 96, 64)
        assert not np.array_equal(final, x)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "uint16"])
def test_image_modes_are_converted(pipe, mode):
    """Any input becomes the 8-bit RGB it shows: outside the (dilated) mask the output *is* the
    input, so those pixels must equal the expected 8-bit values — for 16-bit data (a PIL I;16
    image, a uint16 array) round(x / 257) over the full 0..65535 range, not a near-black image."""
    rgb = _image(64, 64, seed=5)
    wide = np.random.default_rng(5).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    if mode == "I;16":
        image, expected = PIL.Image.fromarray(wide[..., 0]), np.repeat(np.round(wide[..., :1] / 257.0), 3, axis=2)
    elif mode == "uint16":
        image, expected = wide, np.round(wide / 257.0)
    else:
        image = rgb.convert(mode)
        expected = np.repeat(np.asarray(image)[..., None], 3, axis=2) if mode == "L" else np.asarray(rgb)
    mask = _mask(64, 64, (20, 40), (20, 40))
    out = _run(pipe, image, mask, num_inference_steps=1, feather_radius=2)
    assert out.images[0].mode == "RGB" and out.images[0].size == (64, 64)
    far = dilate(mask, 4) == 0
    assert np.array_equal(np.asarray(out.images[0])[far], expected.astype(np.uint8)[far])


def test_non_binary_masks_are_thresholded(pipe):
    image = _image(64, 64, seed=6)
    binary = _mask(64, 64, (20, 40), (20, 40))
    soft = binary * 0.9 + 0.05  # anti-aliased/JPEG-like levels around 0 and 1
    rgb = PIL.Image.fromarray((np.repeat(soft[..., None], 3, axis=2) * 255).astype(np.uint8))
    ref = np.asarray(_run(pipe, image, binary, num_inference_steps=1).images[0])
    for mask in (soft, rgb):
        assert np.array_equal(np.asarray(_run(pipe, image, mask, num_inference_steps=1).images[0]), ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask=np.zeros((64, 64), np.float32)), "mask is empty"),
        (dict(mask=np.ones((32, 64), np.float32)), "mask is 64x32 but the image is 64x64"),
        (dict(lambda_=1.5), "lambda"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(tas_stages=["everywhere"]), "TAS stages"),
        (dict(prompt="a red can", eliminate=["blue"]), "'sks'"),
        (dict(prompt=""), "prompt"),
        (dict(image="room.jpg"), "PIL image"),
    ],
)
def test_bad_input_raises_one_line_error(pipe, kwargs, match):
    image = kwargs.pop("image", _image(64, 64))
    mask = kwargs.pop("mask", _mask(64, 64, (10, 20), (10, 20)))
    with pytest.raises(DreamMixError, match=match) as err:
        _run(pipe, image, mask, **kwargs)
    assert "\n" not in str(err.value)


def test_tas_removes_eliminated_directions_from_the_prompt_embedding(pipe):
    pipe._guidance_scale = 7.5
    conds = pipe._encode_conditions(PROMPT, None, ["red"], ("local",), 1, torch.device("cpu"), torch.float32)
    eli, _, eli_pooled, _ = pipe.encode_prompt("red", device="cpu", do_classifier_free_guidance=False)
    raw, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    local = conds["local"].embeds[1:]  # [negative, positive] for CFG
    n = 6  # "a photo of sks red can": one token per word in the tiny vocabulary
    cos = torch.nn.functional.cosine_similarity(local[0, 1 : 1 + n], eli[0, 1].expand(n, -1), dim=-1)
    assert cos.abs().max() < 1e-5
    assert torch.equal(local[0, 1 + n :], raw[0, 1 + n :])  # EOS/padding untouched
    pcos = torch.nn.functional.cosine_similarity(conds["local"].pooled[1:], eli_pooled, dim=-1)
    assert pcos.abs().max() < 1e-5
    # tas_stages=["local"] (reference behaviour): the global stage keeps the raw prompt
    # (token embeddings bit-identical; the pooled projection of the prompt+TAS batch differs from a
    # batch-1 call by GEMM rounding only, ~1e-7)
    assert torch.equal(conds["global"].embeds[1:], raw)
    torch.testing.assert_close(conds["global"].pooled[1:], pooled, atol=1e-6, rtol=1e-6)
    assert torch.equal(conds["global"].embeds[:1], conds["local"].embeds[:1])  # negative untouched
    # and it changes the result
    image, mask = _image(64, 64, seed=7), _mask(64, 64, (16, 48), (16, 48))
    with_tas = _run(pipe, image, mask, eliminate=["red"], output_type="latent").images
    without = _run(pipe, image, mask, output_type="latent").images
    assert not torch.equal(with_tas, without)


def test_lora_is_one_unet_with_a_toggled_adapter(tiny_model_dir, tmp_path):
    from dreammix.models.lora import LoraSpec, add_lora, save_lora

    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    image, mask = _image(64, 64, seed=8), _mask(64, 64, (16, 48), (16, 48))
    base = _run(p, image, mask, output_type="latent").images

    with pytest.raises(DreamMixError, match="LoRA folder not found"):
        p.load_subject_lora(tmp_path / "missing")
    trained = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir).unet
    add_lora(trained, LoraSpec(rank=4, alpha=4.0))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_lora(trained, tmp_path / "lora", LoraSpec(rank=4, alpha=4.0))

    unet = p.unet
    p.load_subject_lora(tmp_path / "lora")
    assert p.unet is unet  # adapter injected into the same module, no copy
    adapted = _run(p, image, mask, output_type="latent").images
    assert not torch.equal(adapted, base)
    with p.adapter_disabled():
        assert torch.equal(_run(p, image, mask, output_type="latent").images, base)
    assert torch.equal(_run(p, image, mask, output_type="latent").images, adapted)


def test_slice_regression(pipe):
    """Stored numbers (as diffusers' tests do): any change to DIF/TAS/blending shows up here."""
    image, mask = _image(64, 96, seed=9), _mask(64, 96, (16, 48), (40, 72))
    latents = _run(pipe, image, mask, eliminate=["red"], output_type="latent").images
    out = _run(pipe, image, mask, eliminate=["red"])
    latent_slice = latents[0, 0, 2:5, 4:7].flatten().numpy()
    image_slice = np.asarray(out.images[0])[30:33, 54:57, 0].flatten().astype(np.float32) / 255
    assert out.crop_box == EXPECTED_BOX
    np.testing.assert_allclose(latent_slice, EXPECTED_LATENT_SLICE, atol=1e-3)
    np.testing.assert_allclose(image_slice, EXPECTED_IMAGE_SLICE, atol=3 / 255)


EXPECTED_BOX = (38, 14, 75, 51)
EXPECTED_LATENT_SLICE = np.array([-0.00704, -0.01233, 0.17223, -0.08334, -0.13860, -0.02191, 0.00359, 0.10697, -0.01434])
EXPECTED_IMAGE_SLICE = np.array([0.79216, 0.67059, 0.40784, 0.54118, 0.79216, 0.61176, 0.58039, 0.80000, 0.76863])


@pytest.mark.parametrize("tas_stages", [("local", "global"), ("local",)])
def test_pre_encoded_conditions_give_the_same_image_without_the_text_encoders(pipe, tas_stages):
    """encode_conditions + conditions= is the prompt path with the text encoding moved ahead:
    same latents, and no text-encoder call during the call (with TAS in LCG only, each stage's
    own conditioning: the stages' embeddings differ)."""
    image, mask = _image(64, 64), _mask(64, 64, (16, 48), (16, 48))
    common = dict(lambda_=0.5, eliminate=["red"], guidance_scale=5.0, output_type="latent", tas_stages=tas_stages)
    direct = _run(pipe, image, mask, **common).images
    conditions = pipe.encode_conditions(PROMPT, eliminate=["red"], guidance_scale=5.0, tas_stages=tas_stages)
    calls = []
    hooks = [te.register_forward_pre_hook(lambda m, a: calls.append(1)) for te in (pipe.text_encoder, pipe.text_encoder_2)]
    try:
        cached = _run(pipe, image, mask, conditions=conditions, **common).images
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    torch.testing.assert_close(cached, direct)


@pytest.mark.parametrize("change", [{"prompt": "a photo of sks blue can"}, {"eliminate": ["blue"]},
                                    {"guidance_scale": 1.0}, {"num_images_per_prompt": 2}, {"tas_stages": ["local"]}])
def test_conditions_for_other_settings_are_refused(pipe, change):
    conditions = pipe.encode_conditions(PROMPT, eliminate=["red"], guidance_scale=5.0)
    kwargs = {"eliminate": ["red"], "guidance_scale": 5.0, **change}
    with pytest.raises(DreamMixError, match="conditions were encoded for another"):
        _run(pipe, _image(64, 64), _mask(64, 64, (16, 48), (16, 48)), conditions=conditions, num_inference_steps=1, **kwargs)


def test_encode_conditions_checks_its_inputs(pipe):
    with pytest.raises(DreamMixError, match="prompt must be a non-empty string"):
        pipe.encode_conditions("  ")
    with pytest.raises(DreamMixError, match="TAS stages"):
        pipe.encode_conditions(PROMPT, eliminate=["red"], tas_stages=["middle"])


def test_mask_arrays_threshold_at_half_of_their_own_range():
    """A mask array means "fill" at >= half of its dtype's range: 0.5 for float/bool, 128 for
    8-bit, 32768 for 16-bit — also for RGB(A) arrays, whose gray mean is a float (a JPEG-like
    RGB mask with 3/255 noise in the background must not fill the whole image)."""
    from dreammix.pipeline import _as_binary_mask

    expected = np.zeros((4, 6), np.float32)
    expected[1:3, 2:5] = 1
    inside = expected.astype(bool)

    def levels(dtype, low, high):
        return np.where(inside, high, low).astype(dtype)

    cases = {
        "float": levels(np.float32, 0.05, 0.95),
        "bool": inside,
        "uint8": levels(np.uint8, 3, 250),
        "uint8 at 127/128": levels(np.uint8, 127, 128),
        "uint16": levels(np.uint16, 1000, 60000),
        "uint16 at 32767/32768": levels(np.uint16, 32767, 32768),
        "int64 8-bit values": levels(np.int64, 3, 200),
        "rgb uint8": np.repeat(levels(np.uint8, 3, 250)[..., None], 3, axis=2),
        "rgba uint8": np.concatenate([np.repeat(levels(np.uint8, 3, 250)[..., None], 3, axis=2),
                                      np.full((4, 6, 1), 255, np.uint8)], axis=2),
        "rgb uint16": np.repeat(levels(np.uint16, 1000, 60000)[..., None], 3, axis=2),
        "tensor": torch.from_numpy(levels(np.float32, 0.1, 0.9))[None],
    }
    for name, mask in cases.items():
        assert np.array_equal(_as_binary_mask(mask), expected), name
