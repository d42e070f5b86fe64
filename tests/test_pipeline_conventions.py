"""DreamMixInpaintPipeline.__call__ follows StableDiffusionXLInpaintPipeline.__call__'s conventions
where DIF can honour them (prompt lists, output types, diffusers' step-end callbacks, height/width)
and refuses the rest with a ValueError (issue 15)."""

import numpy as np
import PIL.Image
import pytest
import torch

from dreammix.pipeline import DreamMixInpaintPipeline
from test_pipeline import PROMPT, _image, _mask


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _call(pipe, prompt=PROMPT, image=None, mask=None, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("lambda_", 0.5)
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    image = _image(64, 64) if image is None else image
    mask = _mask(64, 64, (16, 40), (16, 40)) if mask is None else mask
    return pipe(image, mask, prompt, generator=generator, **kwargs)


def test_np_and_pt_outputs_equal_the_pil_output(pipe):
    pil = _call(pipe).images
    as_np = _call(pipe, output_type="np").images
    as_pt = _call(pipe, output_type="pt").images
    expected = np.stack([np.asarray(im) for im in pil]).astype(np.float32) / 255
    assert as_np.dtype == np.float32 and as_np.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(as_np, expected)
    assert as_pt.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(as_pt.permute(0, 2, 3, 1).numpy(), expected)


@pytest.mark.parametrize(
    "cutoff,batches",
    [(2, [2, 2, 2, 1]), (1, [2, 2, 1, 1]), (0, [2, 1, 1, 1]), ("ratio 0.5", [2, 2, 2, 1]), ("ratio 0.25", [2, 2, 1, 1])],
)
def test_diffusers_cfg_cutoff_callback_runs_through_both_stages(pipe, cutoff, batches):
    """diffusers' own SDXLCFGCutoffCallback (asks for prompt_embeds, add_text_embeds, add_time_ids):
    after its step the UNet runs on the conditional half only, also in the stage that follows.
    By ratio it reads ``pipeline.num_timesteps`` (the whole schedule: T = 4 here, both stages)."""
    from diffusers.callbacks import SDXLCFGCutoffCallback

    if isinstance(cutoff, str):
        callback = SDXLCFGCutoffCallback(cutoff_step_ratio=float(cutoff.split()[1]))
    else:
        callback = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        out = _call(pipe, guidance_scale=5.0, callback_on_step_end=callback).images
    finally:
        handle.remove()
    assert seen == batches  # local stage: steps 0, 1; global: 2, 3 (λ = 0.5 of 4); cutoff after step `cutoff`
    full = _call(pipe, guidance_scale=5.0).images
    assert np.abs(np.asarray(out[0], np.float32) - np.asarray(full[0], np.float32)).max() > 0


def test_callback_gets_the_asked_tensors_and_its_returns_are_used(pipe):
    got = []

    def callback(p, i, t, kwargs):
        got.append(sorted(kwargs))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 3 else {}

    out = _call(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "mask", "add_time_ids"],
                output_type="latent").images
    assert got == [["add_time_ids", "latents", "mask", "stage"]] * 4
    assert torch.count_nonzero(out) == 0  # the last step's returned latents are the output


def test_prompt_lists_broadcast_or_pair_images(pipe):
    a, b = _image(64, 64, seed=1), _image(64, 64, seed=2)
    mask = _mask(64, 64, (16, 40), (16, 40))
    prompts = [PROMPT, "a photo of sks blue can"]
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    paired = _call(pipe, prompts, image=[a, b], mask=mask, generator=gens, output_type="np").images
    single = [_call(pipe, p, image=im, mask=mask, seed=s, output_type="np").images[0] for p, im, s in zip(prompts, (a, b), (5, 6))]
    assert paired.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(paired, np.stack(single))
    broadcast = _call(pipe, prompts, image=a, mask=mask, num_images_per_prompt=2, output_type="pil")
    assert len(broadcast.images) == 4 and len(broadcast.crop_box) == 2 and len(broadcast.lcg_images) == 4
    one = _call(pipe, [PROMPT], image=a, mask=mask, seed=5, output_type="np")  # a one-prompt list is the plain call
    np.testing.assert_array_equal(one.images, single[0][None])
    assert one.lcg_steps == 2
    assert _call(pipe, [PROMPT], image=a, mask=mask, seed=5, output_type="np", return_dict=False)[3] == 2


def test_prompt_list_outputs_are_each_prompts_outputs_in_order(pipe):
    """The tensor, the LCG images, the boxes and k of a prompt list are those of one call per
    prompt, in prompt order, also as the ``return_dict=False`` tuple."""
    a, b = _image(64, 64, seed=1), _image(64, 64, seed=2)
    masks = [_mask(64, 64, (16, 40), (16, 40)), _mask(64, 64, (8, 30), (30, 60))]
    prompts = [PROMPT, "a photo of sks blue can"]
    singles = [_call(pipe, p, image=im, mask=m, seed=s, output_type="pt") for p, im, m, s in zip(prompts, (a, b), masks, (5, 6))]
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    images, lcg, boxes, k = _call(pipe, prompts, image=[a, b], mask=masks, generator=gens, output_type="pt", return_dict=False)
    assert isinstance(images, torch.Tensor)
    torch.testing.assert_close(images, torch.cat([o.images for o in singles]), rtol=0, atol=0)
    assert boxes == [o.crop_box for o in singles] and boxes[0] != boxes[1]
    assert k == singles[0].lcg_steps == 2  # λ = 0.5 of 4 steps
    assert len(lcg) == 2
    for got, single in zip(lcg, singles):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(single.lcg_images[0]))
    none = _call(pipe, prompts, image=a, mask=masks[0], lambda_=0.0, output_type="np")
    assert none.lcg_images is None and none.lcg_steps == 0


def test_height_width_resize_the_input_and_output(pipe):
    image, mask = _image(48, 80), _mask(48, 80, (10, 30), (20, 50))
    out = _call(pipe, image=image, mask=mask, height=64, width=64).images[0]
    assert out.size == (64, 64)
    pre_image, pre_mask = pipe._resized_inputs(image, mask, 64, 64)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_call(pipe, image=pre_image, mask=pre_mask).images[0]))

    # one of the two given: the other keeps the input's size
    assert _call(pipe, image=image, mask=mask, height=64).images[0].size == (80, 64)
    assert _call(pipe, image=image, mask=mask, width=64).images[0].size == (64, 48)


@pytest.mark.parametrize(
    "kwargs,match,argument",
    [
        (dict(strength=0.6), "strength must be 1.0", "strength"),
        (dict(denoising_end=0.8), "'denoising_end' is not supported", "denoising_end"),
        (dict(padding_mask_crop=32), "'padding_mask_crop' is not supported", "padding_mask_crop"),
        (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), "callback tensor inputs", "callback_on_step_end_tensor_inputs"),
        (dict(output_type="jpeg"), "output_type", "output_type"),
        (dict(height=4), "height must be an integer >= 8", "height"),
        (dict(width=64.0), "width must be an integer >= 8", "width"),
        (dict(prompt=[]), "prompt list is empty", "prompt"),
        (dict(prompt=[PROMPT, PROMPT], image=[_image(64, 64)] * 3), "3 images for 2 prompts", "image"),
        (dict(prompt=[PROMPT, PROMPT], mask=[_mask(64, 64, (16, 40), (16, 40))]), "1 mask_images for 2 prompts", "mask_image"),
        (dict(prompt=[PROMPT, PROMPT], generator=[torch.Generator()] * 3), "3 generators for 2 images", "generator"),
        (dict(prompt=[PROMPT, PROMPT], conditions=object()), "conditions= takes one prompt", "conditions"),
        (dict(prompt=[PROMPT, PROMPT], image=[_image(64, 64), _image(48, 64)], mask=[_mask(64, 64, (16, 40), (16, 40)), _mask(48, 64, (8, 30), (8, 30))],
              output_type="np"), "outputs of different sizes", "output_type"),
    ],
)
def test_what_dif_cannot_honour_is_a_value_error_naming_the_argument(pipe, kwargs, match, argument):
    with pytest.raises(ValueError, match=match) as err:
        _call(pipe, **kwargs)
    assert "\n" not in str(err.value)
    assert err.value.where == argument  # the CLI's one-line error names the argument to fix


def test_unknown_keyword_is_a_type_error(pipe):
    with pytest.raises(TypeError, match="no_such_argument"):
        _call(pipe, no_such_argument=1)


@pytest.mark.parametrize("size", [(64, 64), (40, 104), (96, 160)])
def test_height_width_resize_like_diffusers_image_and_mask_processors(size):
    """``height``/``width`` resize the image and the mask as ``StableDiffusionXLInpaintPipeline``
    does (its ``image_processor`` and binarizing ``mask_processor``: Lanczos, mask cut at 0.5):
    pixel for pixel, also across a thin mask stroke that resampling smears."""
    from diffusers.image_processor import VaeImageProcessor

    from dreammix.pipeline_inputs import _as_binary_mask

    h, w = size
    image = _image(48, 80, seed=3)
    mask = np.zeros((48, 80), np.uint8)
    mask[10:31, 17:53] = 255
    mask[35:40, 60:62] = 255  # a 2-pixel stroke
    mask = PIL.Image.fromarray(mask)
    got_image, got_mask = DreamMixInpaintPipeline._resized_inputs(image, mask, h, w)
    image_processor = VaeImageProcessor(vae_scale_factor=8)
    mask_processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected_image = image_processor.preprocess(image, height=h, width=w)[0].permute(1, 2, 0).numpy()
    expected_mask = mask_processor.preprocess(mask, height=h, width=w)[0, 0].numpy()
    np.testing.assert_array_equal(np.asarray(got_image, np.float32) / 127.5 - 1, expected_image)
    np.testing.assert_array_equal(_as_binary_mask(got_mask), expected_mask)
