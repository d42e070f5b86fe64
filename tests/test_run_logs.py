"""Runs worth browsing: progress lines when stdout is a file, a step-counting bar on a terminal,
metrics in a CSV with or without W&B, and what the offline W&B run of a training holds."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import lightning as L
import torch

from conftest import REPO_ROOT
from dreammix.callbacks import ProgressLogCallback, StepProgressBar, progress_callbacks
from test_data import make_subject
from wandb_files import offline_runs

LINE = re.compile(r"step (\d+)/(\d+) \(\d+%\) \| loss ([\d.]+) \| ([\d.]+) it/s \| elapsed [\d:]+ \| ETA \d+:\d\d:\d\d")


def _subject_overrides(subject):
    return [
        "model=tiny", "subject=custom", "subject.name=thing", "subject.class_noun=thing",
        f"subject.image_dir={subject.image_dir}", f"subject.mask_dir={subject.mask_dir}",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "data.mask_variants=1",
    ]


def test_progress_line_loss_is_the_mean_of_the_optimizer_steps_with_accumulation():
    """Two micro-batches per optimizer step; Lightning reports each micro loss divided by 2."""
    lines = []
    callback = ProgressLogCallback(every_n_steps=2, write=lines.append)
    trainer = SimpleNamespace(global_step=0, max_steps=4)
    callback.on_train_start(trainer, None)
    micro = [1.0, 3.0, 2.0, 6.0, 5.0, 5.0, 0.5, 1.5]  # optimizer steps: means 2, 4, 5, 1
    for i, value in enumerate(micro):
        if i % 2 == 1:
            trainer.global_step += 1  # the optimizer stepped at the end of this micro-batch
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(value / 2)}, None, i)
    parsed = [LINE.search(line) for line in lines[1:]]
    assert [(m.group(1), m.group(2)) for m in parsed] == [("2", "4"), ("4", "4")]
    assert float(parsed[0].group(3)) == pytest.approx((2 + 4) / 2)
    assert float(parsed[1].group(3)) == pytest.approx((5 + 1) / 2)


class _Line(L.LightningModule):
    """y = w·x: just enough of a model to drive the trainer's loop."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((self.w * batch - 2 * batch) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Endless(), batch_size=1)


class _Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.ones(1)


def test_terminal_bar_counts_optimizer_steps_not_micro_batches(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)  # Lightning's bar writes to stdout
    callbacks, bar = progress_callbacks(max_steps=3, every_n_steps=None, terminal=sys.stdout.isatty())
    assert bar and [type(c) for c in callbacks] == [StepProgressBar]
    trainer = L.Trainer(max_steps=3, max_epochs=-1, accumulate_grad_batches=2, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Line())
    frames = terminal.getvalue().replace("\r", "\n")
    counters = set(re.findall(r"train: +\d+%\|[^|]*\| (\d+/\d+)", frames))
    assert "3/3" in counters and counters <= {"0/3", "1/3", "2/3", "3/3"}, frames[-500:]  # not 6/3 (micro-batches)
    assert "Epoch" not in frames and "/-2" not in frames and not LINE.search(frames)


def test_redirected_training_logs_progress_lines_and_logger_none_keeps_a_csv(compose, tmp_path, caplog, one_thread):
    from dreammix.train import train

    subject = make_subject(tmp_path / "subject", n=2)
    assert not sys.stdout.isatty()  # pytest captures it: as in a batch job
    cfg = compose("train", [*_subject_overrides(subject), "logger=none", f"run_dir={tmp_path / 'run'}",
                            "trainer.max_steps=4", "trainer.log_every_n_steps=1", "progress.every_n_steps=1",
                            "validation.every_n_steps=0", "trainer.enable_progress_bar=true"])
    with caplog.at_level(logging.INFO, logger="dreammix.callbacks"):
        run_dir = train(cfg)
    lines = [LINE.search(r.getMessage()) for r in caplog.records if LINE.search(r.getMessage())]
    assert [(int(m.group(1)), int(m.group(2))) for m in lines] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # one row per optimizer step (log_every_n_steps=1)
    assert all(float(r["train/lr"]) == pytest.approx(1e-4) for r in rows)
    # without accumulation a line's loss is the step's loss the CSV holds
    assert [float(m.group(3)) for m in lines] == pytest.approx([float(r["train/loss"]) for r in rows], abs=5e-5)


@pytest.mark.slow
def test_training_with_stdout_in_a_file_logs_progress_and_a_browsable_wandb_run(tmp_path):
    subject = make_subject(tmp_path / "subject", n=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*_subject_overrides(subject), "experiment=dreambooth", "trainer.max_steps=6",
            "trainer.accumulate_grad_batches=2", "progress.every_n_steps=2", "trainer.log_every_n_steps=1",
            "validation.every_n_steps=3", "validation.num_inference_steps=2", "validation.num_samples=1",
            "optim.lr=2e-4", "+subject.attributes.color=[blue]"]
    with open(tmp_path / "stdout.txt", "w") as out:
        result = subprocess.run([sys.executable, str(REPO_ROOT / "src" / "train.py"), *args], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    stdout = (tmp_path / "stdout.txt").read_text()
    progress = [LINE.search(line) for line in stdout.splitlines() if LINE.search(line)]
    assert [(int(m.group(1)), int(m.group(2))) for m in progress] == [(2, 6), (4, 6), (6, 6)], stdout[-2000:]
    assert all(float(m.group(3)) > 0 and float(m.group(4)) > 0 for m in progress)

    (run_dir,) = (tmp_path / "outputs" / "train" / "thing").iterdir()
    assert stdout.count("step 2/6") == 1 and "step 2/6" in (run_dir / "train.log").read_text()
    with open(run_dir / "metrics.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(6))

    (run,) = offline_runs(run_dir / "wandb")
    assert run.job_type == "train" and run.name.startswith("train-thing-")
    # the full resolved config, the preset it came from and the command line
    assert run.config["loss"]["tau_in"] == 1.0 and run.config["loss"]["beta"] == 0.0  # experiment=dreambooth
    assert run.config["optim"]["lr"] == 2e-4 and run.config["trainer"]["max_steps"] == 6
    assert run.config["hydra"]["choices"]["experiment"] == "dreambooth"
    assert set(args) <= set(run.config["hydra"]["overrides"])
    logged = [row for row in run.history if "train/loss" in row]
    assert [row["trainer/global_step"] for row in logged] == list(range(6))
    assert all(row["train/lr"] == pytest.approx(2e-4) for row in logged)
    # validation panels with their captions at steps 3 and 6 (one training photo: no COCO here)
    captions = [row["val/samples/captions"] for row in run.history if "val/samples/captions" in row]
    assert captions == [[f"train:00 | a photo of sks thing | step {k} | λ=0.7 | TAS: -",
                         f"train:00 | a red sks thing | step {k} | λ=0.7 | TAS: blue"] for k in (3, 6)]
    grids = [row for row in run.history if "val/grid/filenames" in row]
    assert len(grids) == 2 and all((run.files / row["val/grid/filenames"][0]).is_file() for row in grids)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    # the final LoRA as an artifact: the same bytes as the run's lora/ folder
    (artifact,) = run.artifacts
    assert artifact.type == "lora" and artifact.name == "lora-thing"
    digests = {entry.path: entry.digest for entry in artifact.manifest.contents}
    weights = (run_dir / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    assert digests["pytorch_lora_weights.safetensors"] == base64.b64encode(hashlib.md5(weights).digest()).decode()
    assert "dreammix_run.json" in digests


# ------------------------------------------------------------------------------------------------
# Sweeps: names from the swept values
# ------------------------------------------------------------------------------------------------


def test_sweep_job_names_come_from_the_swept_values_only(tmp_path):
    from omegaconf import OmegaConf

    from dreammix.sweeps import dirname, swept_values

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save({"hydra": {"overrides": {"task": ["model=tiny", "subject=can,teapot", "loss.beta=range(0,2)",
                                                     "lora_dir=/a/b/lora"]}}}, sweep / "multirun.yaml")
    job = ["model=tiny", "subject=teapot", "loss.beta=1", "lora_dir=/a/b/lora"]
    assert swept_values(job, sweep) == ["subject=teapot", "loss.beta=1"]
    assert swept_values(job, tmp_path / "no-such-sweep") == job  # unknown: every override
    assert dirname(["subject=teapot", "loss.beta=1"]) == "subject=teapot,loss.beta=1"
    assert dirname(["lora_dir=/a/b c/lora"]) == "lora_dir=_a_b_c_lora"  # one folder level, no spaces
    long_a, long_b = [f"x={'a' * 300}"], [f"x={'a' * 299}b"]
    assert len(dirname(long_a)) <= 120 and dirname(long_a) != dirname(long_b)


def _overrides_of(subject):
    return [*_subject_overrides(subject), "validation.every_n_steps=1", "validation.num_inference_steps=1",
            "trainer.log_every_n_steps=1", "experiment=dreambooth"]


@pytest.mark.slow
def test_train_sweeps_are_grouped_named_by_values_unique_and_tabled(tmp_path):
    subject = make_subject(tmp_path / "subject", n=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    for _ in range(2):  # two sweeps with the same values
        result = subprocess.run([sys.executable, str(REPO_ROOT / "src" / "train.py"), "-m", *_overrides_of(subject),
                                 "trainer.max_steps=1,2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    sweeps = sorted((tmp_path / "outputs" / "train" / "multirun").iterdir())
    assert len(sweeps) == 2
    names = []
    for sweep in sweeps:
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_trainer.max_steps=1", "1_trainer.max_steps=2"]
        runs = offline_runs(sweep)
        assert {r.group for r in runs} == {f"train-sweep-{sweep.name}"}
        assert sorted(tuple(r.tags) for r in runs) == [(f"sweep:{sweep.name}", "trainer.max_steps=1"),
                                                       (f"sweep:{sweep.name}", "trainer.max_steps=2")]
        names += [r.name for r in runs]
        assert all("trainer.max_steps=" in n and sweep.name in n for n in names[-2:])
        rows = json.loads((sweep / "results.json").read_text())
        assert [(r["swept"], r["steps"], r["last_loss_step"]) for r in rows] == [
            ("trainer.max_steps=1", 1, 0), ("trainer.max_steps=2", 2, 1)]
        for row in rows:
            with open(Path(row["lora"]).parent / "metrics.csv") as handle:
                assert row["last_loss"] == pytest.approx(float(list(csv.DictReader(handle))[-1]["train/loss"]))
        assert "| 1_trainer.max_steps=2 | trainer.max_steps=2 | thing |" in (sweep / "results.md").read_text()
    assert len(set(names)) == 4  # unique across the two sweeps
