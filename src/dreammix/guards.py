"""Training stops at the first non-finite loss, and nothing non-finite is ever written.

``loss.tau_in=nan`` or an ``optim.lr`` large enough to diverge used to train to the end and export
a LoRA whose every tensor was NaN, with exit code 0; ``inpaint.py`` then filled masks with black.
:class:`FiniteGuard` checks the loss of every micro-batch before ``backward`` (so a NaN never
reaches the optimizer state) and every checkpoint's LoRA tensors before Lightning writes them;
``train`` checks the exported weights too (:func:`dreammix.validation.check_finite_tensors`).
The run then ends with one line ``error: ...`` and exit code 2; the last good checkpoint stays.
"""

from __future__ import annotations

import lightning as L
import torch

from dreammix.errors import DreamMixError
from dreammix.validation import check_finite_tensors


class NonFiniteLossError(DreamMixError):
    """The loss became NaN or infinite: the run diverged or a setting is degenerate."""


class FiniteGuard(L.Callback):
    """Raise :class:`NonFiniteLossError` at the first non-finite loss; refuse non-finite checkpoints.

    The check costs one scalar device-to-host copy per micro-batch.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLossError(
                f"the training loss is {loss.detach().float().cpu().flatten()[0].item()} at step {trainer.global_step}; "
                "nothing was saved for this step (lower optim.lr, check loss.* and the data; the last "
                "checkpoint in checkpoints/ is the last good state)",
                "train",
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        check_finite_tensors(checkpoint.get("state_dict", {}), f"checkpoint at step {trainer.global_step}")
