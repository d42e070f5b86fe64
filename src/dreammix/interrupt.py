"""SIGTERM / SIGINT during training: save a resumable checkpoint, then exit non-zero.

SLURM and Kubernetes stop a job with SIGTERM (then SIGKILL after a grace period). Lightning's
own handler ends ``fit`` with ``SIGTERMException``, a ``SystemExit`` whose code is 0, and without
a checkpoint: a pre-empted job looked like a success and lost everything since the last periodic
checkpoint. :class:`InterruptCheckpoint` replaces the SIGTERM and SIGINT handlers while training
runs; the handler only records the signal, and at the end of the next optimizer step (never in
the middle of a gradient-accumulation window, so the state is exactly the one a periodic
checkpoint holds) the callback writes ``checkpoints/step_NNNNNN.ckpt`` and ``checkpoints/last.ckpt``
(each written to a temp file and renamed) and raises :class:`TrainingInterrupted`. The entry point
prints one line naming the checkpoint and exits with ``128 + signal``: 143 for SIGTERM, 130 for
SIGINT (the shell's convention, which schedulers read as "killed by a signal").

Resume with ``ckpt_path=<run_dir>/checkpoints/last.ckpt``: the resumed run is the run that was
not interrupted (same LoRA, same optimizer state, same position in the data and noise streams).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L

from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(DreamMixError):
    """Training stopped by a signal after writing a resumable checkpoint; exit code 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int):
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        if checkpoint is None:
            super().__init__(f"stopped by {name} before the first optimizer step; nothing to resume", "train")
        else:
            super().__init__(f"stopped by {name} at step {step}; resume with ckpt_path={checkpoint}", "train")


class InterruptCheckpoint(L.Callback):
    """Turn SIGTERM / SIGINT into a checkpoint at the next optimizer-step boundary and a clean stop."""

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ANN001 - signal module signature
        if self.received is None:
            log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its own SIGTERM handler (in Trainer._run): ours replaces it
        # for the training loop and the previous handlers come back at the end.
        self.received = None
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.received is None:
            return
        if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # inside an accumulation window: finish it, so the checkpoint is a step boundary
        step = trainer.global_step
        if step == 0:
            raise TrainingInterrupted(self.received, None, step)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step_{step:06d}.ckpt"
        for target in (path, self.checkpoint_dir / "last.ckpt"):
            temp = target.with_name(f".{target.name}.tmp")
            trainer.save_checkpoint(temp)
            os.replace(temp, target)
        raise TrainingInterrupted(self.received, self.checkpoint_dir / "last.ckpt", step)
