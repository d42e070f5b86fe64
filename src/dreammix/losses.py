"""Mask-reweighted diffusion loss (paper Eq. 7) and the dual-dataset objective (Eq. 8).

Convention (DESIGN.md §3): the weight multiplies the *squared* error,
``w = tau_in * m + tau_out * (1 - m)``, averaged over every element. With
``tau_in == tau_out == 1`` this is the plain DreamBooth MSE (the ablation baseline).
The public reference code (``train.py``: ``F.mse_loss(pred * w, target * w)``) instead scales
``pred`` and ``target`` by the weight, i.e. ``mean((w·p − w·t)²) = mean(w²·(p − t)²)``: its
τ = 1.5 / 0.6 act as 2.25 / 0.36 on the squared error. ``weighting="pred_and_target"`` computes
that (``loss=reference``); the default ``"squared_error"`` follows the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``squared_error``: Eq. 7 as written, ``w·(p − t)²``; ``pred_and_target``: the public code's
#: ``(w·p − w·t)²``.
WEIGHTINGS = ("squared_error", "pred_and_target")


def reweighted_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    tau_in: float = 1.5,
    tau_out: float = 0.7,
    weighting: str = "squared_error",
) -> torch.Tensor:
    """Eq. 7: ``mean(w * (pred - target)**2)`` with ``w = tau_in*mask + tau_out*(1-mask)``.

    ``weighting="pred_and_target"``: ``mean((w*pred - w*target)**2)``, the public code's loss.

    ``mask`` is 1 inside the region to fill and broadcasts against ``pred`` (typically
    ``(B, 1, h, w)`` against ``(B, C, h, w)``). Computed in float32 so bf16 training does not
    lose the small differences the weights are meant to emphasise.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    weight = tau_in * mask.float() + tau_out * (1.0 - mask.float())
    if weighting == "pred_and_target":
        return ((weight * pred.float() - weight * target.float()) ** 2).mean()
    squared_error = (pred.float() - target.float()) ** 2
    return (weight * squared_error).mean()


def dual_dataset_loss(loss_source: torch.Tensor, loss_regular: torch.Tensor | None, beta: float = 0.4) -> torch.Tensor:
    """Eq. 8: ``L = L_RE(source) + beta * L_RE(regular)``; no regular data → the source term alone."""
    if loss_regular is None or beta == 0:
        return loss_source
    return loss_source + beta * loss_regular


def latent_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Down-sample a pixel mask ``(..., H, W)`` to latent resolution by max-pooling.

    A latent cell is 1 if *any* of its ``factor × factor`` pixels is 1 (DESIGN.md §3), so the
    object is never under-covered. H and W must be multiples of ``factor``.
    """
    h, w = mask.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the VAE factor {factor}")
    lead = mask.shape[:-2]
    pooled = F.max_pool2d(mask.reshape(-1, 1, h, w).float(), kernel_size=factor, stride=factor)
    return pooled.reshape(*lead, h // factor, w // factor)
