"""Eq. 7 / Eq. 8 and the latent mask against hand-computed values."""

import pytest
import torch

from dreammix.losses import dual_dataset_loss, latent_mask, reweighted_mse


def test_reweighted_mse_hand_computed():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # squared errors 1, 4, 9, 16; weights 1.5, 0.7, 0.7, 1.5
    expected = (1.5 * 1 + 0.7 * 4 + 0.7 * 9 + 1.5 * 16) / 4
    assert reweighted_mse(pred, target, mask, 1.5, 0.7).item() == pytest.approx(expected)


def test_reweighted_mse_weight_multiplies_squared_error_not_the_residual():
    pred, target, mask = torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    # paper: tau * e^2 = 1.5 * 4 = 6; the reference code's (tau*e)^2 would give 9
    assert reweighted_mse(pred, target, mask, 1.5, 0.7).item() == pytest.approx(6.0)


def test_reweighted_mse_equals_plain_mse_with_unit_weights():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    assert reweighted_mse(pred, target, mask, 1.0, 1.0).item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item())


def test_reweighted_mse_broadcasts_one_channel_mask_over_latent_channels():
    pred = torch.ones(1, 4, 2, 2)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # half the elements weigh 2, half weigh 0 → mean 1
    assert reweighted_mse(pred, torch.zeros_like(pred), mask, 2.0, 0.0).item() == pytest.approx(1.0)


def test_reweighted_mse_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        reweighted_mse(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3), torch.zeros(1, 1, 2, 2))


def test_dual_dataset_loss_eq8():
    assert dual_dataset_loss(torch.tensor(2.0), torch.tensor(5.0), 0.4).item() == pytest.approx(4.0)
    assert dual_dataset_loss(torch.tensor(2.0), None, 0.4).item() == 2.0
    assert dual_dataset_loss(torch.tensor(2.0), torch.tensor(5.0), 0.0).item() == 2.0


def test_latent_mask_is_max_pool_any_pixel_covers_cell():
    mask = torch.zeros(16, 16)
    mask[9, 2] = 1.0  # a single pixel in latent cell (1, 0)
    out = latent_mask(mask, factor=8)
    assert out.shape == (2, 2)
    assert out.tolist() == [[0.0, 0.0], [1.0, 0.0]]


def test_latent_mask_keeps_leading_dims_and_rejects_bad_sizes():
    assert latent_mask(torch.ones(3, 1, 64, 32)).shape == (3, 1, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        latent_mask(torch.ones(1, 1, 60, 64))


def test_defaults_are_the_papers_values():
    """Called without weights, Eq. 7 uses tau1 = 1.5 inside and tau2 = 0.7 outside, Eq. 8 beta = 0.4
    (paper §4.1): a caller relying on the defaults trains the paper's objective."""
    pred = torch.tensor([[[[1.0, 1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])
    assert reweighted_mse(pred, torch.zeros_like(pred), mask).item() == pytest.approx((1.5 + 0.7) / 2)
    assert dual_dataset_loss(torch.tensor(1.0), torch.tensor(10.0)).item() == pytest.approx(1.0 + 0.4 * 10.0)


def test_dual_dataset_loss_with_unit_beta_adds_the_whole_regular_term():
    """beta = 1 is a legitimate weight (the reference preset): only beta = 0 drops the regular term."""
    assert dual_dataset_loss(torch.tensor(2.0), torch.tensor(5.0), 1.0).item() == pytest.approx(7.0)
