"""Lightning callbacks of the fine-tune: progress in logs and on a terminal (validation panels:
:mod:`dreammix.validation_panels`).

Counters are in *optimizer* steps (``trainer.global_step``, what ``trainer.max_steps`` counts),
never in micro-batches: with gradient accumulation Lightning's own bar would count batches
against ``max_steps`` ("4/2") and show the endless epoch as "Epoch 0/-2".
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import lightning as L
import torch


log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds))))


class StepProgressBar(L.pytorch.callbacks.TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps out of ``max_steps`` (so ETA is right with
    gradient accumulation), labelled ``train`` instead of an epoch of an endless loader."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


class ProgressLogCallback(L.Callback):
    """One log line every ``every_n_steps`` optimizer steps (and at the last), for runs whose
    output goes to a file: ``step k/N (p%) | loss x | r it/s | elapsed | ETA``.

    The loss is the mean over the optimizer steps since the previous line; each step's loss is
    the sum of its micro-batch losses as Lightning reports them (already divided by the
    accumulation count), kept on the device until a line is written (no sync per step). it/s
    counts optimizer steps over the same window; the ETA extrapolates the rate since the first
    step of this process.
    """

    def __init__(self, every_n_steps: int, write=None):
        self.every_n_steps = max(1, int(every_n_steps))
        self.write = write or log.info
        self._micro = None
        self._window: list = []
        self._seen_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = self._window_step = self._seen_step = trainer.global_step
        self._start_time = self._window_time = time.perf_counter()
        self.write(f"training: step {trainer.global_step}/{trainer.max_steps}, a line every {self.every_n_steps} step(s)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach()
            self._micro = loss if self._micro is None else self._micro + loss
        step = trainer.global_step
        if step == self._seen_step:
            return  # mid-accumulation
        self._seen_step = step
        if self._micro is not None:
            self._window.append(self._micro)
            self._micro = None
        if step % self.every_n_steps == 0 or step >= trainer.max_steps:
            self._write_line(step, trainer.max_steps)

    def _write_line(self, step: int, max_steps: int) -> None:
        now = time.perf_counter()
        rate = (step - self._window_step) / max(now - self._window_time, 1e-9)
        overall = (step - self._start_step) / max(now - self._start_time, 1e-9)
        eta = (max_steps - step) / overall if overall > 0 else float("nan")
        loss = torch.stack(self._window).float().mean().item() if self._window else float("nan")
        self.write(
            f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%) | loss {loss:.4f} | {rate:.2f} it/s | "
            f"elapsed {_duration(now - self._start_time)} | ETA {_duration(eta) if eta == eta else '?'}"
        )
        self._window, self._window_step, self._window_time = [], step, now


def progress_callbacks(
    max_steps: int, every_n_steps: int | None, terminal: bool, bar: bool = True
) -> tuple[list[L.Callback], bool]:
    """The step bar on a terminal (unless ``bar`` is off), log lines otherwise — a bar redrawn
    with carriage returns leaves one line in a file. Returns (callbacks, enable_progress_bar).
    ``every_n_steps=None``: about 20 lines per run."""
    if terminal:
        return ([StepProgressBar()], True) if bar else ([], False)
    every = every_n_steps if every_n_steps else max(1, max_steps // 20)
    return [ProgressLogCallback(every)], False


