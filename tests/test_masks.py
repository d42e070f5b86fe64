"""Mask IO (binarisation, conversions) and training-mask augmentation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dreammix.data.images import load_image, load_mask, mask_to_binary
from dreammix.data.masks import MaskAugmentation, augment_mask, bounding_box, box_mask, dilate
from dreammix.errors import DreamMixError


def _square_mask(size=32, top=10, left=12, h=6, w=8):
    m = torch.zeros(size, size)
    m[top : top + h, left : left + w] = 1
    return m


def test_dilate_grows_by_radius():
    m = _square_mask()
    d = dilate(m, 2)
    assert bounding_box(d) == (8, 10, 18, 22)
    assert torch.all(d >= m)


def test_box_mask_grows_bounding_box_and_clips():
    m = torch.zeros(16, 16)
    m[0, 3] = m[5, 7] = 1
    assert bounding_box(box_mask(m, 0)) == (0, 3, 6, 8)
    assert bounding_box(box_mask(m, 4)) == (0, 0, 10, 12)


def test_augment_never_shrinks_and_is_deterministic():
    m = _square_mask()
    aug = MaskAugmentation(dilate_prob=1.0, max_dilate=0.2, box_prob=0.5, max_box_margin=0.2)
    outs = [augment_mask(m, aug, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(torch.all(o >= m) for o in outs)
    assert any(not torch.equal(o, m) for o in outs)
    again = augment_mask(m, aug, torch.Generator().manual_seed(3))
    assert torch.equal(again, outs[3])


def test_augmentation_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="dilate_prob"):
        MaskAugmentation(dilate_prob=1.5)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_masks_are_thresholded_from_any_mode(tmp_path):
    gray = np.zeros((8, 8), np.uint8)
    gray[2:6, 2:6] = 200
    gray[0, 0] = 100  # below half range → 0
    rgb = _save(Image.fromarray(np.stack([gray] * 3, -1)), tmp_path / "rgb.png")
    jpg = _save(Image.fromarray(gray), tmp_path / "m.jpg", quality=60)
    for path in (rgb, jpg):
        m = load_mask(path)
        assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
        assert m[3, 3] == 1 and m[0, 0] == 0
    sixteen = Image.fromarray((gray.astype(np.uint16) * 257)).convert("I;16")
    assert mask_to_binary(sixteen)[3, 3] == 1 and mask_to_binary(sixteen)[0, 0] == 0


def test_mask_size_mismatch_is_resized_with_warning(tmp_path):
    path = _save(Image.new("L", (16, 16), 255), tmp_path / "m.png")
    with pytest.warns(UserWarning, match="resizing the mask"):
        m = load_mask(path, size=(8, 4))
    assert m.shape == (4, 8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P"])
def test_images_of_any_mode_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (5, 4), (10, 20, 30))
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    suffix = ".tif" if mode == "CMYK" else ".png"
    path = _save(img, tmp_path / f"x{suffix}")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (5, 4)


def test_corrupt_and_missing_images_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DreamMixError, match="cannot read image") as err:
        load_image(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DreamMixError, match="file not found"):
        load_image(tmp_path / "nope.png")
    truncated = tmp_path / "trunc.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(DreamMixError, match="cannot read image"):
        load_image(truncated)
