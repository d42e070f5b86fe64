"""Multi-subject inpainting (dreammix.multi_region) on the tiny model: per-region adapters, untouched
background, single-region parity with the pipeline, overlap rule."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import LORA_ALPHA, LORA_RANK
from dreammix.crop import feather, lcg_crop_box
from dreammix.errors import DreamMixError
from dreammix.multi_region import Region, inpaint_regions
from dreammix.pipeline import DreamMixInpaintPipeline, split_steps
from lora_runs import make_lora

H, W, STEPS = 64, 128, 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return make_lora(tiny_model_dir, root / "dog", 0), make_lora(tiny_model_dir, root / "can", 1)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    p = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _image(seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def _mask(rows, cols):
    m = np.zeros((H, W), np.float32)
    m[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return m


DOG, CAN = _mask((20, 44), (10, 40)), _mask((16, 40), (80, 110))


def _lora_layer(unet):
    from peft.tuners.lora import LoraLayer

    return next(m for m in unet.modules() if isinstance(m, LoraLayer))


def test_each_region_runs_with_its_own_adapter_changes_and_keeps_the_background(pipe, loras):
    """UNet calls (forward pre-hook): R·T in all, LCG of every region then GCH of every region, each
    with only its region's adapter active at its own scale; each region changes; pixels farther
    than the feather band from every mask are the input's bits."""
    pipe.load_subject_lora(loras[0], adapter_name="dog_probe")  # any adapter: the hook reads the layers
    layer = _lora_layer(pipe.unet)
    calls = []

    def record(*_):
        active = tuple(layer.active_adapters)
        calls.append(None if layer.disable_adapters else (active, float(layer.scaling[active[0]])))

    image = _image()
    regions = [
        Region(DOG, "a photo of sks dog", lora=loras[0], lora_scale=1.0),
        dict(mask=CAN, prompt="a photo of sks can", lora=str(loras[1]), lora_scale=0.5),
    ]
    handle = pipe.unet.register_forward_pre_hook(record)
    try:
        out = inpaint_regions(pipe, image, regions, num_inference_steps=STEPS, lambda_=0.5, feather_radius=2,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        handle.remove()
    dog, can = out.adapters
    assert dog != can and None not in (dog, can)
    k = split_steps(0.5, STEPS)
    base_scale = LORA_ALPHA / LORA_RANK
    a, b = ((dog,), base_scale * 1.0), ((can,), base_scale * 0.5)
    assert calls == [a] * k + [b] * k + [a] * (STEPS - k) + [b] * (STEPS - k)

    x, y = np.asarray(image), np.asarray(out.images[0])
    assert y.shape == x.shape
    for m in (DOG, CAN):
        assert np.abs(y[m > 0].astype(int) - x[m > 0]).mean() > 5
    outside = (feather(DOG, 2) == 0) & (feather(CAN, 2) == 0)
    assert np.array_equal(y[outside], x[outside])
    assert out.crop_boxes == [lcg_crop_box(DOG).as_tuple(), lcg_crop_box(CAN).as_tuple()]
    # the same folder again is the same adapter: loaded once
    again = inpaint_regions(pipe, image, regions[:1], num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert again.adapters == [dog]


def test_region_without_lora_runs_the_base_model(pipe, loras):
    pipe.load_subject_lora(loras[0], adapter_name="dog_probe2")
    layer = _lora_layer(pipe.unet)
    disabled = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: disabled.append(layer.disable_adapters))
    try:
        inpaint_regions(pipe, _image(), [Region(DOG, "a dog"), Region(CAN, "a sks can", lora=loras[1])],
                        num_inference_steps=2, lambda_=0.5, generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        handle.remove()
    assert disabled == [True, False, True, False]


@pytest.mark.parametrize("lambda_", [pytest.param(0.0, marks=pytest.mark.slow), 0.5, pytest.param(1.0, marks=pytest.mark.slow)])
def test_single_region_equals_the_pipeline(tiny_model_dir, loras, lambda_):
    """One region with LoRA A = today's ``pipe(...)`` with LoRA A loaded: same bits, crop, x^G."""
    ref_pipe = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.load_subject_lora(loras[0])
    image, prompt = _image(3), "a photo of sks red dog"
    common = dict(num_inference_steps=STEPS, lambda_=lambda_, num_images_per_prompt=2)
    ref = ref_pipe(image, DOG, prompt, eliminate=["red"], generator=torch.Generator().manual_seed(5), **common)
    multi = DreamMixInpaintPipeline.from_pretrained(tiny_model_dir)
    multi.set_progress_bar_config(disable=True)
    ours = multi.inpaint_regions(image, [Region(DOG, prompt, lora=loras[0], eliminate=["red"])],
                                 generator=torch.Generator().manual_seed(5), **common)  # fmt: skip
    for a, b in zip(ref.images, ours.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    if lambda_ > 0:
        assert ours.crop_boxes == [ref.crop_box]
        for a, b in zip(ref.lcg_images, ours.lcg_images, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    else:
        assert ours.lcg_images is None and ref.lcg_images is None


def test_overlapping_masks_and_bad_regions_are_one_line_errors(pipe):
    image = _image()
    overlap = _mask((40, 50), (30, 60))
    with pytest.raises(DreamMixError, match=r"regions 0 and 1 overlap in 40 pixels"):
        inpaint_regions(pipe, image, [Region(DOG, "a dog"), Region(overlap, "a can")], num_inference_steps=1)
    with pytest.raises(DreamMixError, match=r"mask is empty.*\(regions\[1\]\.mask_image\)"):
        inpaint_regions(pipe, image, [Region(DOG, "a dog"), Region(np.zeros((H, W)), "a can")], num_inference_steps=1)
    with pytest.raises(DreamMixError, match=r"no prompt"):
        inpaint_regions(pipe, image, [{"mask": DOG}], num_inference_steps=1)
    with pytest.raises(DreamMixError, match="at least one region"):
        inpaint_regions(pipe, image, [], num_inference_steps=1)
