"""Mask IO (binarisation, conversions) and training-mask augmentation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dreammix.data.images import load_image, load_mask, mask_to_binary, to_rgb
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
    # a rectangle dilated (square element) or boxed by r is the rectangle grown by r on every side,
    # and r is at most max_dilate / max_box_margin × the side: round(0.2 · 32) = 6
    radii = set()
    for o in outs:
        r = 10 - bounding_box(o)[0]
        assert 0 <= r <= 6 and torch.equal(o, _square_mask(top=10 - r, left=12 - r, h=6 + 2 * r, w=8 + 2 * r))
        radii.add(r)
    assert len(radii) >= 3
    never = MaskAugmentation(dilate_prob=0.0, box_prob=0.0)
    assert all(torch.equal(augment_mask(m, never, torch.Generator().manual_seed(s)), m) for s in range(5))


@pytest.mark.parametrize("branch", ["dilate", "box"])
def test_each_augmentation_branch_draws_its_own_size_over_the_whole_range(branch):
    """Dilation alone and boxing alone each grow the rectangle by r ∈ [0, round(0.2 · 32)], with r
    drawn independently of the coin that picked the branch (all of the range is reached)."""
    m = _square_mask()
    if branch == "dilate":
        aug = MaskAugmentation(dilate_prob=1.0, max_dilate=0.2, box_prob=0.0, max_box_margin=0.2)
    else:
        aug = MaskAugmentation(dilate_prob=0.0, max_dilate=0.2, box_prob=0.5, max_box_margin=0.2)
    outs = [augment_mask(m, aug, torch.Generator().manual_seed(s)) for s in range(200)]
    radii = [10 - bounding_box(o)[0] for o in outs]
    assert max(radii) == 6 and len(set(radii)) == 7
    changed = sum(not torch.equal(o, m) for o in outs) / len(outs)
    assert changed > 0.9 if branch == "dilate" else 0.35 < changed < 0.6  # box_prob 0.5 (r = 0 is unchanged)


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


#: The 8-bit RGB that (10, 20, 30) must come back as from each mode: ITU-R 601 luma
#: (299·10 + 587·20 + 114·30) / 1000 = 18.15 → 18 for the gray modes.
_MODE_RGB = {"L": (18, 18, 18), "RGBA": (10, 20, 30), "CMYK": (10, 20, 30), "I;16": (18, 18, 18), "I": (18, 18, 18),
             "P": (10, 20, 30)}


@pytest.mark.parametrize("mode", list(_MODE_RGB))
def test_images_of_any_mode_become_rgb(tmp_path, mode):
    """Any mode on disk → 8-bit RGB with the same colour; 8-bit values in a 16/32-bit container
    (PIL's ``convert("I;16")`` of an 8-bit image keeps 0..255) stay 8-bit, not near black."""
    img = Image.new("RGB", (5, 4), (10, 20, 30))
    if mode in ("I;16", "I"):
        img = img.convert("L").convert(mode)
    else:  # P: an adaptive palette holds the colour exactly (the default web palette dithers)
        img = img.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)
    suffix = ".tif" if mode in ("CMYK", "I") else ".png"
    path = _save(img, tmp_path / f"x{suffix}")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (5, 4)
    assert np.array_equal(np.asarray(out), np.broadcast_to(np.array(_MODE_RGB[mode], np.uint8), (4, 5, 3)))


def _gradient16() -> np.ndarray:
    """Every 16-bit value once: 0 … 65535 as a 256×256 uint16 array."""
    return np.arange(65536, dtype=np.uint16).reshape(256, 256)


def test_sixteen_bit_images_are_rescaled_to_8_bit(tmp_path):
    """16-bit images are scaled by 255/65535 = 1/257 and rounded, over the whole range (a wrong peak
    — 255, 4095, 65536 — or a truncation instead of rounding changes some of the 65536 values)."""
    x = _gradient16()
    expected = np.round(x / 257.0).astype(np.uint8)
    big_endian = Image.frombytes("I;16B", (256, 256), x.astype(">u2").tobytes())
    images = {
        "png": load_image(_save(Image.fromarray(x), tmp_path / "g.png")),  # 16-bit PNG → I;16
        "tif": load_image(_save(big_endian, tmp_path / "g.tif")),
        "I;16": to_rgb(Image.fromarray(x)),
        "I;16B": to_rgb(big_endian),
        "I": to_rgb(Image.fromarray(x.astype(np.int32))),
    }
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    for name, out in images.items():
        arr = np.asarray(out)
        assert out.mode == "RGB", name
        for c in range(3):
            assert np.array_equal(arr[..., c], expected), name
    # 8-bit values in a 16-bit file (what PIL writes for convert("I;16") of an 8-bit image) stay 8-bit
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    widened = load_image(_save(Image.fromarray(gray).convert("I;16"), tmp_path / "w.png"))
    assert np.array_equal(np.asarray(widened)[..., 1], gray)


def test_sixteen_bit_masks_threshold_at_half_range(tmp_path):
    """A 16-bit mask is 1 from 32768 = 65536/2 up (128·256, the 8-bit threshold 128 scaled), also
    when it is resized to its image (nearest neighbour in 16 bits, not clipped to 8 bits first)."""
    x = _gradient16()
    assert np.array_equal(mask_to_binary(Image.fromarray(x)), (x >= 32768).astype(np.float32))
    assert np.array_equal(load_mask(_save(Image.fromarray(x), tmp_path / "g.png")), (x >= 32768).astype(np.float32))
    # dark-gray background (1000/65535 ≈ 1.5 %) and a bright block, at twice the image's size
    mask = np.full((32, 48), 1000, np.uint16)
    mask[8:24, 16:40] = 60000
    with pytest.warns(UserWarning, match="resizing the mask"):
        small = load_mask(_save(Image.fromarray(mask), tmp_path / "m.png"), size=(24, 16))
    expected = np.zeros((16, 24), np.float32)
    expected[4:12, 8:20] = 1
    assert np.array_equal(small, expected)


def test_transparency_is_composited_on_white_and_alpha_masks_use_alpha(tmp_path):
    """Transparent cut-outs get a white background (α-blend: 255·(1-α) + c·α); a black RGBA mask
    whose shape is in its alpha channel is read from the alpha, also when resized."""
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3], rgba[1, 1, 3], rgba[2:, :, 3] = 0, 128, 255
    out = np.asarray(load_image(_save(Image.fromarray(rgba), tmp_path / "cut.png")))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[3, 5]) == (10, 20, 30)
    assert np.abs(out[1, 1].astype(int) - [132, 137, 142]).max() <= 1  # 255·127/255 + c·128/255
    shape = np.zeros((8, 8, 4), np.uint8)  # black everywhere; the shape is opaque
    shape[2:6, 4:8, 3] = 255
    path = _save(Image.fromarray(shape), tmp_path / "alpha_mask.png")
    expected = np.zeros((8, 8), np.float32)
    expected[2:6, 4:8] = 1
    assert np.array_equal(load_mask(path), expected)
    with pytest.warns(UserWarning, match="resizing the mask"):
        assert np.array_equal(load_mask(path, size=(4, 4)), expected[::2, ::2])


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
