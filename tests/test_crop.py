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
