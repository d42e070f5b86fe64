"""LCG crop box m' (DESIGN.md §3), processing sizes, mask resizing, feathering and pasting."""

import numpy as np
import pytest

from dreammix.crop import (
    Box,
    composite,
    dilate,
    feather,
    lcg_crop_box,
    mask_bbox,
    paste,
    processing_size,
    resize_mask,
)


def _mask(h, w, rows, cols):
    m = np.zeros((h, w), np.float32)
    m[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return m


def test_small_mask_grows_to_half_the_image():
    # bbox 20x10 centred at (50, 50): 1.15 * 10 = 11.5 < 0.5 * 100 / 2 = 25 -> side 50
    m = _mask(100, 100, (40, 60), (45, 55))
    assert mask_bbox(m) == Box(45, 40, 55, 60)
    assert lcg_crop_box(m) == Box(25, 25, 75, 75)


def test_large_mask_is_enlarged_by_1_15():
    # bbox 100x100 at rows 20..119, cols 50..149: half-side 1.15 * 50 = 57.5 (> 0.5 * 200 / 2)
    # -> side 115, centre (100, 70) -> left round(42.5) = 43, top round(12.5) = 13
    m = _mask(200, 200, (20, 120), (50, 150))
    assert lcg_crop_box(m) == Box(43, 13, 158, 128)


def test_box_at_the_border_is_shifted_inside_not_shrunk():
    m = _mask(100, 100, (0, 10), (0, 10))
    assert lcg_crop_box(m) == Box(0, 0, 50, 50)
    m = _mask(100, 100, (95, 100), (90, 100))
    assert lcg_crop_box(m) == Box(50, 50, 100, 100)


def test_box_larger_than_the_image_is_clipped_and_full_mask_is_the_image():
    m = _mask(427, 640, (100, 300), (0, 640))  # 1.15 * 640 > both sides
    assert lcg_crop_box(m) == Box(0, 0, 640, 427)
    assert lcg_crop_box(np.ones((50, 80), np.float32)) == Box(0, 0, 80, 50)


@pytest.mark.parametrize("seed", range(20))
def test_box_is_a_square_inside_the_image_containing_the_mask(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(40, 300, size=2)
    y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
    y1, x1 = rng.integers(y0 + 1, min(h, y0 + h // 2) + 1), rng.integers(x0 + 1, min(w, x0 + w // 2) + 1)
    m = _mask(h, w, (y0, y1), (x0, x1))
    box = lcg_crop_box(m)
    assert 0 <= box.left and 0 <= box.top and box.right <= w and box.bottom <= h
    assert box.left <= x0 and box.top <= y0 and box.right >= x1 and box.bottom >= y1
    side = max(1.15 * max(y1 - y0, x1 - x0), 0.5 * min(h, w))
    assert box.width == min(w, int(np.ceil(side - 1e-9))) and box.height == min(h, int(np.ceil(side - 1e-9)))


def test_processing_size_keeps_aspect_and_area():
    assert processing_size(100, 100, 64, 16) == (64, 64)
    assert processing_size(640, 427, 64, 16) == (80, 48)
    assert processing_size(640, 427, 1024, 32) == (1248, 832)
    assert processing_size(1024, 1024, 1024, 32) == (1024, 1024)
    assert processing_size(10000, 10, 64, 16) == (2016, 16)  # never below one multiple


def test_resize_mask_never_loses_coverage():
    m = np.zeros((100, 100), np.float32)
    m[37, 61] = 1  # a single pixel survives a 10x shrink
    small = resize_mask(m, (10, 10))
    assert small.sum() == 1 and small[3, 6] == 1
    big = resize_mask(_mask(4, 4, (1, 2), (2, 3)), (8, 8))
    assert big.sum() == 4 and big[2:4, 4:6].all()
    assert resize_mask(m, (100, 100)) is not m and np.array_equal(resize_mask(m, (100, 100)), m)


def test_feather_is_one_on_the_mask_and_zero_beyond_twice_the_radius():
    m = _mask(60, 70, (20, 30), (25, 40))
    r = 3
    alpha = feather(m, r)
    assert alpha.dtype == np.float32 and alpha.min() >= 0 and alpha.max() <= 1
    assert (alpha[m > 0] == 1).all()
    assert (alpha[dilate(m, 2 * r) == 0] == 0).all()
    assert (alpha[(dilate(m, 2 * r) > 0) & (m == 0)] > 0).any()  # it does ramp
    # Chebyshev distance 2r is still inside the ramp, 2r + 1 is not
    assert alpha[20, 25 - 2 * r] > 0 and alpha[20, 25 - 2 * r - 1] == 0
    assert np.array_equal(feather(m, 0), m)


def test_composite_is_exact_at_alpha_0_and_1():
    rng = np.random.default_rng(0)
    base, over = (rng.integers(0, 256, (8, 9, 3), dtype=np.uint8) for _ in range(2))
    alpha = np.zeros((8, 9), np.float32)
    alpha[:, 3:6] = 0.5
    alpha[:, 6:] = 1.0
    out = composite(base, over, alpha)
    assert np.array_equal(out[:, :3], base[:, :3]) and np.array_equal(out[:, 6:], over[:, 6:])
    mid = np.floor((base[:, 3:6].astype(np.float32) + over[:, 3:6]) / 2 + 0.5)
    assert np.array_equal(out[:, 3:6], mid.astype(np.uint8))


def test_paste_changes_nothing_outside_the_box():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    box = Box(10, 5, 30, 25)
    patch = np.full((20, 20, 3), 7, np.uint8)
    alpha = np.ones((40, 50), np.float32)  # alpha beyond the box is ignored
    out = paste(base, patch, box, alpha)
    outside = np.ones((40, 50), bool)
    outside[5:25, 10:30] = False
    assert np.array_equal(out[outside], base[outside]) and (out[5:25, 10:30] == 7).all()
    with pytest.raises(ValueError):
        paste(base, patch[:5], box, alpha)


# --- independent references (plain numpy loops on small arrays; no dreammix helpers) ---------


def _ref_dilate(m, r):
    """1 where some pixel > 0.5 lies within Chebyshev distance r (window truncated at the border)."""
    b = m > 0.5
    h, w = b.shape
    return np.array(
        [[b[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].any() for x in range(w)] for y in range(h)],
        np.float64,
    )


def _ref_feather(m, r):
    """Dilate by r, then mean of the (2r+1)² window over the pixels *inside* the image; 1 on the mask."""
    d = _ref_dilate(m, r)
    h, w = d.shape
    a = np.array(
        [[d[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].mean() for x in range(w)] for y in range(h)]
    )
    a[m > 0.5] = 1.0
    return a


def _ref_resize(m, w, h):
    """Output pixel = 1 iff an input pixel > 0.5 overlaps its area with positive measure
    (exact integer interval test: input [y, y+1)·h/H meets output [i, i+1))."""
    b = m > 0.5
    H, W = b.shape
    rows = [[y for y in range(H) if y * h < (i + 1) * H and (y + 1) * h > i * H] for i in range(h)]
    cols = [[x for x in range(W) if x * w < (j + 1) * W and (x + 1) * w > j * W] for j in range(w)]
    return np.array([[b[np.ix_(rows[i], cols[j])].any() for j in range(w)] for i in range(h)], np.float32)


def _soft_mask(rng, h, w):
    """Values in {0, 0.5, 0.75, 1}: 0.5 is background (the threshold is strictly ``> 0.5``)."""
    return rng.choice(np.array([0.0, 0.5, 0.75, 1.0], np.float32), size=(h, w), p=[0.6, 0.25, 0.05, 0.1])


def test_mask_threshold_is_strictly_above_one_half():
    """A soft mask's 0.5 pixels are background in every geometry helper (docstring: pixels ``> 0.5``)."""
    m = np.full((12, 14), 0.5, np.float32)
    m[4:6, 7:10] = 0.75
    assert mask_bbox(m) == Box(7, 4, 10, 6)
    assert mask_bbox(np.full((5, 5), 0.5, np.float32)) is None
    same = resize_mask(m, (14, 12))
    assert same.dtype == np.float32 and np.array_equal(same, (m > 0.5).astype(np.float32))


def test_lcg_crop_with_scale_1_and_no_minimum_is_the_tight_square():
    """scale = 1, min_frac = 0: m' is the bbox's own square (side = longer bbox side), down to 1 pixel."""
    one = np.zeros((20, 20), np.float32)
    one[7, 3] = 1
    assert lcg_crop_box(one, scale=1.0, min_frac=0.0) == Box(3, 7, 4, 8)
    # bbox rows 10..12, cols 20..24 -> side 5, centre (22.5, 11.5) -> left 20, top floor(9.5) = 9
    assert lcg_crop_box(_mask(40, 40, (10, 13), (20, 25)), scale=1.0, min_frac=0.0) == Box(20, 9, 25, 14)


@pytest.mark.parametrize("seed", range(3))
def test_resize_mask_is_positive_area_overlap(seed):
    """Coverage rule for shrink, grow, mixed and non-integer factors: an output pixel is 1 iff some
    mask pixel overlaps it with positive area (so a 3->4 stretch widens a pixel, unlike nearest)."""
    rng = np.random.default_rng(seed)
    for H, W, h, w in [(9, 11, 4, 5), (3, 4, 4, 7), (6, 10, 9, 4), (10, 6, 4, 9), (7, 7, 7, 3), (5, 8, 5, 8)]:
        m = _soft_mask(rng, H, W)
        out = resize_mask(m, (w, h))
        assert out.dtype == np.float32 and out.shape == (h, w)
        assert np.array_equal(out, _ref_resize(m, w, h)), (H, W, h, w)
    row = np.array([[0, 1, 0]], np.float32)  # pixel [1, 2) -> [4/3, 8/3) touches output pixels 1 and 2
    assert np.array_equal(resize_mask(row, (4, 1)), [[0, 1, 1, 0]])


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_dilate_is_chebyshev_dilation(radius):
    """dilate(m, r) = 1 exactly within Chebyshev distance r of a mask pixel, float32; r = 0 is identity."""
    rng = np.random.default_rng(radius)
    m = _soft_mask(rng, 11, 13)
    out = dilate(m, radius)
    assert out.dtype == np.float32 and np.array_equal(out, _ref_dilate(m, radius))


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_feather_is_dilation_then_border_normalised_box_mean(radius):
    """alpha = mean of the dilated mask over the part of the (2r+1)² window inside the image
    (border pixels are not darkened by zero padding), 1 on the mask, exactly 0 beyond 2r; float32."""
    rng = np.random.default_rng(10 + radius)
    m = _soft_mask(rng, 13, 16)
    m[:, 6:] = np.where(m[:, 6:] > 0.5, 0.0, m[:, 6:])  # mask on the left only: a ramp towards the right
    alpha = feather(m, radius)
    ref = _ref_feather(m, radius)
    assert alpha.dtype == np.float32
    np.testing.assert_allclose(alpha, ref, rtol=0, atol=1e-6)
    assert np.array_equal(alpha == 0, ref == 0) and (alpha[m > 0.5] == 1).all()


@pytest.mark.parametrize("radius", [1, 3])
def test_feather_is_a_linear_ramp_of_width_2r_on_every_row(radius):
    """Half-plane mask (columns < c): at distance d from it alpha = (2r + 1 − d) / (2r + 1) for d ≤ 2r,
    the same on the border rows as in the middle, then exactly 0."""
    h, w, c = 9, 20, 4
    alpha = feather(_mask(h, w, (0, h), (0, c)), radius)
    d = np.maximum(np.arange(w) - c + 1, 0)
    expected = np.where(d == 0, 1.0, np.clip((2 * radius + 1 - d) / (2 * radius + 1), 0, 1))
    np.testing.assert_allclose(alpha, np.broadcast_to(expected, (h, w)), rtol=0, atol=1e-6)
    assert (alpha[:, c + 2 * radius :] == 0).all()


def test_composite_rounds_the_exact_blend_half_up_in_uint8():
    """With α = k/256 the blend is exact in float32, so the result must equal the integer
    round-half-up of (base·(256 − k) + overlay·k) / 256; zeros stay 0 and 255 stays 255."""
    rng = np.random.default_rng(3)
    base, over = (rng.integers(0, 256, (16, 16, 3)).astype(np.uint8) for _ in range(2))
    base[0], over[0] = 0, 0
    base[1], over[1] = 255, 255
    k = rng.integers(0, 257, (16, 16))
    out = composite(base, over, (k / 256).astype(np.float32))
    kk = k[..., None].astype(np.int64)
    ref = (base.astype(np.int64) * (256 - kk) + over.astype(np.int64) * kk + 128) // 256
    assert out.dtype == np.uint8 and out.shape == base.shape
    assert np.array_equal(out, ref)


def test_composite_saturates_instead_of_wrapping_for_alpha_outside_0_1():
    """Extrapolating alphas (α = 1.5 or −0.5) clamp to [0, 255] rather than wrapping around in uint8."""
    base = np.array([[[0, 255, 100]]], np.uint8)
    over = np.array([[[255, 0, 100]]], np.uint8)
    assert composite(base, over, np.array([[1.5]], np.float32)).tolist() == [[[255, 0, 100]]]
    assert composite(base, over, np.array([[-0.5]], np.float32)).tolist() == [[[0, 255, 100]]]
    with pytest.raises(ValueError):
        composite(base, np.zeros((1, 2, 3), np.uint8), np.zeros((1, 1), np.float32))
