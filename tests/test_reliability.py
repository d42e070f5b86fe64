"""Reliability (issue 14): no data loss, no silent garbage, no writes outside the run's folder,
one-line errors everywhere — through the real entry points (``src/*.py``).

Most entry-point runs here are *in process*: ``runpy`` runs ``src/<entry>.py`` as ``__main__`` with
a patched ``sys.argv``, exactly the code a user's ``python src/<entry>.py ...`` runs, without
paying ~8 s of interpreter and torch start-up per case. A few cases that need a real process
(signals, a second process holding a lock) use ``subprocess``. Every case asserts the exit code,
the single ``error: ...`` line and that a sibling folder of the run did not change.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from dreammix.errors import DreamMixError
from test_data import make_regular, make_subject

SRC = REPO_ROOT / "src"
TRAIN_FAST = ["model=tiny", "logger=none", "trainer.accelerator=cpu", "trainer.precision=32-true",
              "trainer.enable_progress_bar=false", "validation.every_n_steps=0", "data.mask_variants=1"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path → sha256), to prove nothing there changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sibling(tmp_path):
    """A user's folder beside the run: files that no command may touch."""
    victim = tmp_path / "victim"
    (victim / "images").mkdir(parents=True)
    (victim / "masks").mkdir()
    (victim / "notes.txt").write_text("mine")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(victim / "images" / "000000.png")
    Image.new("L", (8, 8), 255).save(victim / "masks" / "000000.png")
    return victim


@pytest.fixture
def entry(monkeypatch, tmp_path):
    """``entry("train.py", *args)`` → (exit code, stderr) of the real entry point, run in process
    from ``tmp_path`` (Hydra's ``outputs/`` lands there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # the entry point sets it; restored after
    monkeypatch.setenv("WANDB_MODE", "offline")

    def run(script: str, *args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [str(SRC / script), *args])
        err = io.StringIO()
        code = 0
        try:
            with redirect_stderr(err):
                runpy.run_path(str(SRC / script), run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            from hydra.core.global_hydra import GlobalHydra

            GlobalHydra.instance().clear()
        return code, err.getvalue()

    return run


def assert_one_line_error(code: int, stderr: str, message: str, exit_code: int = 2) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == exit_code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in stderr


def subject_args(subject) -> list[str]:
    return ["subject=custom", "subject.name=thing", "subject.class_noun=thing",
            f"subject.image_dir={subject.image_dir}", f"subject.mask_dir={subject.mask_dir}"]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return make_subject(tmp_path_factory.mktemp("subject"), n=2)
