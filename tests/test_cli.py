"""The real entry point as a user runs it: one-line errors, multirun, W&B offline runs."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TRAIN = str(REPO_ROOT / "src" / "train.py")


def run_train(args, cwd, env_extra=None, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, TRAIN, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args,message",
    [
        (["subject=nope"], "Could not find 'subject/nope'"),
        (["subject=can", "paths.dreambooth_dir=/nonexistent"], "its download failed"),
        (["subject=custom"], "Missing mandatory value: subject.class_noun"),
        (["model=tiny", "trainer.max_steps=abc"], "expected int, got 'abc' (trainer.max_steps)"),
        (["model=tiny", "lora.rank=0"], "rank must be >= 1, got 0 (lora.rank)"),
        (["no_such_key=1"], "Could not override 'no_such_key'"),
        (["model=/not/a/model/dir"], "Could not find 'model//not/a/model/dir'"),
        (["model.pretrained=/not/a/model", "paths.dreambooth_dir=" + str(REPO_ROOT.parent / "shared/data/dreambooth")],
         "no diffusers model at /not/a/model"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    if any("shared/data" in a for a in args) and not (REPO_ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("needs ../shared/data")
    result = run_train([*args, "logger=none"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_train(["subject=can", "paths.dreambooth_dir=/nonexistent", "logger=none", "debug=true"], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "DreamMixError" in result.stderr


def test_multirun_gives_each_job_its_own_dir_and_wandb_run(tmp_path, shared_data):
    result = run_train(
        ["-m", "subject=can,teapot", "model=tiny", "trainer.max_steps=2", "validation.every_n_steps=1",
         "validation.num_samples=1", "validation.num_inference_steps=2", "trainer.enable_progress_bar=false",
         f"paths.dreambooth_dir={shared_data / 'dreambooth'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "outputs" / "train" / "multirun").glob("*/*_*"))
    assert [j.name for j in jobs] == ["0_subject=can", "1_subject=teapot"]  # named by the swept values
    run_ids = set()
    for job in jobs:
        assert (job / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert (job / "samples" / "step_000001.png").is_file()
        (wandb_run,) = (job / "wandb").glob("offline-run-*")
        run_ids.add(wandb_run.name.rsplit("-", 1)[-1])
    assert len(run_ids) == 2


def test_runs_started_together_get_distinct_dirs(tmp_path, shared_data):
    args = ["subject=can", "model=tiny", "trainer.max_steps=1", "logger=none", "validation.every_n_steps=0",
            "data.mask_variants=1", "trainer.enable_progress_bar=false", f"paths.dreambooth_dir={shared_data / 'dreambooth'}"]
    procs = [run_train(args, cwd=tmp_path, wait=False) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    runs = list((tmp_path / "outputs" / "train" / "can").iterdir())
    assert len(runs) == 2
    assert all((r / "lora" / "pytorch_lora_weights.safetensors").is_file() for r in runs)
