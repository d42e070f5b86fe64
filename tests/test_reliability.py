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
    # the entry point sets it; setenv first so that monkeypatch removes it again afterwards
    # (a bare delenv of an unset variable records nothing, and it would leak into later tests'
    # subprocesses, which would then print tracebacks instead of one-line errors)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
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


def assert_error_ends_the_run(code: int, stderr: str, message: str, exit_code: int = 2) -> None:
    """For errors after training started: Lightning's own INFO lines ("GPU available: ...") come
    before it on stderr, so the contract is one ``error:`` line, last, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == exit_code, stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], stderr
    assert message in lines[-1], lines[-1]
    assert "Traceback" not in stderr


def subject_args(subject) -> list[str]:
    return ["subject=custom", "subject.name=thing", "subject.class_noun=thing",
            f"subject.image_dir={subject.image_dir}", f"subject.mask_dir={subject.mask_dir}"]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return make_subject(tmp_path_factory.mktemp("subject"), n=2)


#: The minimal arguments of each entry point (tiny model, no W&B).
BASE = {"train.py": ["model=tiny", "logger=none"], "adm.py": ["model=tiny", "logger=none"],
        "eval.py": ["model=tiny", "logger=none"], "inpaint.py": ["model=tiny"], "build_benchmark.py": []}


def boom(*args, **kwargs):
    raise AssertionError("the base model must not load for this input")


# ------------------------------------------------------------------------------------------------
# 1. data loss: ADM deletes only what it made, and never writes into a folder of someone else's
# ------------------------------------------------------------------------------------------------

ADM = ["model=tiny", "logger=none", "vlm=offline", "adm.num_prompts=1"]


def test_adm_overwrite_removes_only_the_files_its_manifest_lists(entry, tmp_path, sibling, monkeypatch):
    regular = make_regular(tmp_path / "set", n=2)
    Image.new("RGB", (8, 8)).save(regular / "images" / "holiday.png")  # a user's file inside the set
    monkeypatch.setattr("dreammix.adm._generate", lambda *a, **k: None)
    before = snapshot(sibling)
    code, err = entry("adm.py", *ADM, f"adm.out_dir={regular}", "adm.overwrite=true")
    assert code == 0, err
    assert (regular / "images" / "holiday.png").is_file()
    assert not [p.name for p in (regular / "images").glob("0*.png")] and not (regular / "masks").exists()
    assert snapshot(sibling) == before


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_adm_refuses_a_folder_that_is_not_an_adm_set(entry, sibling, overwrite):
    before = snapshot(sibling)
    code, err = entry("adm.py", *ADM, f"adm.out_dir={sibling}", f"adm.overwrite={overwrite}")
    assert_one_line_error(code, err, "is not empty and is not an ADM regular set")
    assert snapshot(sibling) == before


@pytest.mark.parametrize("script", ["adm.py", "train.py", "eval.py"])
def test_a_subject_name_that_leaves_its_folder_is_refused_before_hydra_writes(entry, tmp_path, sibling, script):
    before = snapshot(sibling)
    code, err = entry(script, "model=tiny", "logger=none", "subject.name=../victim")
    assert_one_line_error(code, err, "'../victim' is not a plain name")
    assert not (tmp_path / "outputs").exists()  # not even Hydra's run folder
    assert snapshot(sibling) == before


# ------------------------------------------------------------------------------------------------
# 2. non-finite and out-of-range settings; divergence; non-finite LoRAs and outputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script,override,message",
    [
        ("train.py", "optim.lr=nan", "lr must be a finite number, got nan (optim.lr)"),
        ("train.py", "loss.tau_in=nan", "tau_in must be a finite number, got nan (loss.tau_in)"),
        ("train.py", "loss.tau_out=inf", "tau_out must be a finite number, got inf (loss.tau_out)"),
        ("train.py", "trainer.precision=bogus", "(trainer.precision)"),
        ("train.py", "trainer.accumulate_grad_batches=0", "accumulate_grad_batches must be >= 1, got 0"),
        ("train.py", "checkpoint.every_n_steps=-1", "every_n_steps must be >= 0, got -1 (checkpoint.every_n_steps)"),
        ("train.py", "optim.betas=[0.9,nan]", "(optim.betas[1])"),
        ("inpaint.py", "lora_scale=nan", "lora_scale must be a finite number, got nan (lora_scale)"),
        ("eval.py", "lora_scale=nan", "lora_scale must be a finite number, got nan (lora_scale)"),
        ("adm.py", "adm.guidance_scale=nan", "(adm.guidance_scale)"),
        ("build_benchmark.py", "benchmark.filters.max_area_frac=inf", "(benchmark.filters.max_area_frac)"),
    ],
)
def test_bad_numeric_settings_are_one_line_errors_before_anything_loads(entry, sibling, script, override, message):
    before = snapshot(sibling)
    code, err = entry(script, *BASE[script], override)
    assert_one_line_error(code, err, message)
    assert snapshot(sibling) == before


def test_a_non_finite_loss_stops_training_with_exit_2_and_saves_nothing(entry, tmp_path, subject, monkeypatch):
    """A run that diverges (here: the loss made NaN from step 1 on) stops at that step; the
    checkpoint of the good step 1 stays, no LoRA and no later checkpoint is written."""
    from dreammix.module import DreamMixLoRAModule

    original = DreamMixLoRAModule.compute_losses

    def diverging(self, batch):
        out = original(self, batch)
        if self.global_step >= 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DreamMixLoRAModule, "compute_losses", diverging)
    run = tmp_path / "run"
    code, err = entry("train.py", *TRAIN_FAST, *subject_args(subject), "trainer.max_steps=3",
                      "checkpoint.every_n_steps=1", f"run_dir={run}")
    assert_error_ends_the_run(code, err, "the training loss is nan at step 1")
    assert not (run / "lora").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step_000001.ckpt"]


def _nan_lora(tiny_model_dir, folder: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from conftest import make_real_lora

    make_real_lora(tiny_model_dir, folder)
    weights = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no items()
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(weights), metadata=metadata)
    return folder


def _image_and_mask(folder: Path, size=(64, 64)) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(folder / "image.png")
    mask = Image.new("L", size, 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png"


def test_inpaint_refuses_a_nan_lora_before_the_model_loads(entry, tmp_path, tiny_model_dir, sibling, monkeypatch):
    lora = _nan_lora(tiny_model_dir, tmp_path / "lora")
    image, mask = _image_and_mask(tmp_path / "in")
    monkeypatch.setattr("dreammix.models.loading.load_pipeline", boom)
    before = snapshot(sibling)
    code, err = entry("inpaint.py", "model=tiny", f"image={image}", f"mask={mask}", "prompt=a sks thing",
                      f"lora={lora}", f"out={tmp_path / 'out' / 'x.png'}")
    assert_one_line_error(code, err, "holds NaN or infinite values")
    assert snapshot(sibling) == before and not (tmp_path / "out" / "x.png").exists()


def test_pipeline_refuses_nan_and_foreign_loras_and_never_returns_nan_pixels(tmp_path, tiny_model_dir, one_thread):
    """The eval/inpaint loader refuses a NaN LoRA and one of another base (size mismatch); and a
    model that produces NaN pixels (here: NaN injected into a loaded adapter) is an error, not a
    black image that eval would score as a normal number."""
    from safetensors.torch import load_file, save_file

    from conftest import make_real_lora
    from dreammix.inpaint import load_pipeline

    good = make_real_lora(tiny_model_dir, tmp_path / "good")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora.down" in k else v
               for k, v in load_file(good / "pytorch_lora_weights.safetensors").items()}
    save_file(tensors, str(foreign / "pytorch_lora_weights.safetensors"))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("inpaint", ["model=tiny", f"model.pretrained={tiny_model_dir}", "image=x", "mask=x", "prompt=x"])
    pipe = load_pipeline(cfg, torch.device("cpu"))
    with pytest.raises(DreamMixError, match="NaN or infinite") as err:
        pipe.load_subject_lora(_nan_lora(tiny_model_dir, tmp_path / "nan"))
    assert err.value.where == str(tmp_path / "nan")
    with pytest.raises(DreamMixError, match="do not fit this base model") as err:
        pipe.load_subject_lora(foreign)
    assert "\n" not in str(err.value) and err.value.where == str(foreign)
    pipe.load_subject_lora(good)
    with torch.no_grad():
        next(p for n, p in pipe.unet.named_parameters() if "lora_B" in n).fill_(float("nan"))
    image, mask = _image_and_mask(tmp_path / "in")
    with pytest.raises(DreamMixError, match="NaN/infinite pixels"):
        pipe(image=Image.open(image), mask_image=Image.open(mask), prompt="a sks thing", num_inference_steps=2,
             generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------
# 3. the training crop keeps the object
# ------------------------------------------------------------------------------------------------


def _photo(size, box) -> "MaskedImage":  # noqa: F821 - imported inside
    from dreammix.data.subjects import MaskedImage

    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.float32)
    mask[box[1] : box[3], box[0] : box[2]] = 1
    pixels[mask > 0] = (250, 10, 10)  # the object is red, the background black
    return MaskedImage(Image.fromarray(pixels), mask, Path("photo.png"))


@pytest.mark.parametrize(
    "size,box",
    [((4000, 50), (5, 2, 44, 48)), ((50, 4000), (3, 3945, 47, 3990)), ((300, 100), (200, 20, 290, 80))],
    ids=["wide-object-at-left", "tall-object-at-bottom", "wide-object-at-right"],
)
def test_the_training_crop_follows_an_object_the_centre_square_would_cut(size, box):
    """The issue's case (4000x50, object at the left edge: the centre square kept 0 of its pixels)
    and its tall twin: every object pixel is in the crop, and the crop is a real square of the
    photo (pixels red exactly where the mask is)."""
    from dreammix.data.frozen import object_square, square_crop_resize

    example = _photo(size, box)
    left, top, right, bottom = object_square(example.mask)
    assert right - left == bottom - top == min(size)
    crop_mask = example.mask[top:bottom, left:right]
    assert crop_mask.sum() == example.mask.sum()  # the whole object survives
    pixels, mask = square_crop_resize(example, 32)
    red = ((pixels[0] > 0.5) & (pixels[1] < -0.5)).float()
    assert mask.sum() >= 0.9 * (box[2] - box[0]) * (box[3] - box[1]) * (32 / min(size)) ** 2
    assert red[mask > 0].mean() > 0.8 and red[mask == 0].mean() < 0.1  # same crop for pixels and mask


def test_a_centred_object_keeps_the_centre_square():
    from dreammix.data.frozen import object_square

    assert object_square(_photo((300, 100), (120, 10, 180, 90)).mask) == (100, 0, 200, 100)


def test_an_object_no_square_can_hold_is_an_error_before_the_model_loads(entry, tmp_path, monkeypatch):
    """Three far-apart parts of one mask on a 600x40 photo: any 40x40 square keeps a third of it."""
    images, masks = tmp_path / "subject" / "images", tmp_path / "subject" / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    Image.new("RGB", (600, 40)).save(images / "wide.png")
    mask = np.zeros((40, 600), np.uint8)
    for x in (0, 280, 560):
        mask[:, x : x + 40] = 255
    Image.fromarray(mask).save(masks / "wide.png")
    monkeypatch.setattr("dreammix.train.load_pipeline", boom)
    code, err = entry("train.py", *TRAIN_FAST, "subject=custom", "subject.name=wide", "subject.class_noun=thing",
                      f"subject.image_dir={images}", f"subject.mask_dir={masks}", f"run_dir={tmp_path / 'run'}")
    assert_one_line_error(code, err, "no square crop keeps most of the object (33% of its mask at best in a 600x40 photo)")
    assert "wide.png" in err


# ------------------------------------------------------------------------------------------------
# 4. concurrency: one writer per ADM set; duplicate manifest lines count once
# ------------------------------------------------------------------------------------------------


def test_a_second_adm_run_on_a_set_in_use_stops_with_one_line(entry, tmp_path, monkeypatch):
    from dreammix.locks import folder_lock

    regular = make_regular(tmp_path / "set", n=2)
    before = snapshot(regular)
    monkeypatch.setattr("dreammix.adm._generate", boom)
    with folder_lock(regular, "test"):  # what a first run holds while it generates
        code, err = entry("adm.py", *ADM, f"adm.out_dir={regular}", "adm.overwrite=true")
    assert_one_line_error(code, err, f"another run is writing to {regular}")
    after = snapshot(regular)
    after.pop(".dreammix.lock", None)
    assert after == {k: v for k, v in before.items()}


def test_duplicate_manifest_lines_are_used_once(tmp_path, caplog):
    from dreammix.adm import read_manifest
    from dreammix.data.regular import load_regular_examples

    regular = make_regular(tmp_path / "set", n=2)
    lines = (regular / "manifest.jsonl").read_text().splitlines()
    (regular / "manifest.jsonl").write_text("\n".join([lines[0], lines[1], lines[0], lines[1]]) + "\n")
    with caplog.at_level("WARNING"):
        assert [e.path.name for e in load_regular_examples(regular)] == ["000000.png", "000001.png"]
        assert [e["image"] for e in read_manifest(regular, repair=True)] == ["images/000000.png", "images/000001.png"]
    assert "twice" in caplog.text or "more than once" in caplog.text
    assert len((regular / "manifest.jsonl").read_text().splitlines()) == 2  # repaired on disk


# ------------------------------------------------------------------------------------------------
# 5. stale resume in eval: a changed case is generated and scored again
# ------------------------------------------------------------------------------------------------


def test_eval_resume_regenerates_exactly_the_cases_that_changed(compose, tmp_path):
    from types import SimpleNamespace

    from dreammix.evaluate import evaluate
    from test_eval import StubPipe, StubSuite, eval_cfg, make_bench, make_lora
    from test_eval import make_subject as make_refs

    bench = SimpleNamespace(manifest=make_bench(tmp_path / "bench"), refs=make_refs(tmp_path / "refs"),
                            lora=make_lora(tmp_path / "lora", {"tau_in": 1.5, "tau_out": 0.7, "beta": 0.4}))
    cfg = eval_cfg(compose, tmp_path, bench, "run")
    first = evaluate(cfg, pipe_factory=lambda c: StubPipe(), metric_suite=StubSuite())
    assert (first.generated, first.scored) == (6, 6)
    # the background of cases *-0 replaced on disk; the prompt of one case edited in the manifest
    Image.new("RGB", Image.open(tmp_path / "bench" / "bg" / "0.png").size, (255, 255, 255)).save(tmp_path / "bench" / "bg" / "0.png")
    lines = [json.loads(line) for line in bench.manifest.read_text().splitlines()]
    for line in lines:
        if line["case_id"] == "thing-identity-2":
            line["prompt"] = "a photo of sks thing on a table"
    bench.manifest.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    pipe = StubPipe()
    again = evaluate(cfg, pipe_factory=lambda c: pipe, metric_suite=StubSuite())
    assert sorted(c["prompt"] for c in pipe.calls) == ["a photo of sks thing", "a photo of sks thing on a table", "a red sks thing"]
    assert (again.generated, again.scored) == (3, 3)
    by_id = {r["case_id"]: r for r in again.records}
    assert by_id["thing-identity-2"]["prompt"] == "a photo of sks thing on a table"
    white = np.asarray(Image.open(tmp_path / "run" / "images" / "thing-identity-0.png"))
    assert (white[0, 0] == 255).all()  # made from the new background
    assert by_id["thing-identity-0"]["clip_i"] != {r["case_id"]: r for r in first.records}["thing-identity-0"]["clip_i"]
    third = evaluate(cfg, pipe_factory=lambda c: StubPipe(crash_at=1), metric_suite=StubSuite(crash_on_batch=1))
    assert (third.generated, third.scored) == (0, 0)


# ------------------------------------------------------------------------------------------------
# 6. paths from manifests stay inside their folder
# ------------------------------------------------------------------------------------------------


def test_a_benchmark_case_id_that_leaves_the_run_folder_is_refused(entry, tmp_path, sibling):
    from test_eval import make_bench

    manifest = make_bench(tmp_path / "bench", subjects=("thing",), backgrounds=1)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[0]["case_id"] = "../../victim/x"
    manifest.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    before = snapshot(sibling)
    code, err = entry("eval.py", "model=tiny", "logger=none", "lora_dir=null", f"manifest={manifest}", "subject=custom",
                      "subject.name=thing", "subject.class_noun=thing", f"subject.image_dir={tmp_path}", f"run_dir={tmp_path / 'run'}")
    assert_one_line_error(code, err, "'../../victim/x' is not a plain name")
    assert snapshot(sibling) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["/etc/hostname", "../victim/images/000000.png"])
def test_regular_set_paths_must_stay_inside_the_set(tmp_path, sibling, path):
    from dreammix.adm import read_manifest
    from dreammix.data.regular import load_regular_examples

    regular = make_regular(tmp_path / "set", n=1)
    line = json.loads((regular / "manifest.jsonl").read_text())
    line["image"] = path
    (regular / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    for read in (load_regular_examples, read_manifest):
        with pytest.raises(DreamMixError, match="must be relative|points outside") as err:
            read(regular)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# 7. secrets on the command line never reach a file
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["+vlm.api_key=sk-test-SECRET-0123456789abcdef", "+vlm.token=whatever-secret",
                                      "vlm.base_url=http://sk-test-SECRET-0123456789abcdef@localhost"])
def test_a_secret_on_the_command_line_is_refused_before_hydra_writes_anything(entry, tmp_path, override):
    code, err = entry("adm.py", "model=tiny", "logger=none", override)
    assert_one_line_error(code, err, "secrets are not accepted on the command line")
    assert "SECRET" not in err and "whatever-secret" not in err
    assert not (tmp_path / "outputs").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file() and b"SECRET" in p.read_bytes()] == []


# ------------------------------------------------------------------------------------------------
# 8. SIGTERM / SIGINT during training: a resumable checkpoint, exit 128 + signal
# ------------------------------------------------------------------------------------------------


def _signal_at_step(monkeypatch, step: int, signum: int) -> None:
    """Make the training loop receive ``signum`` from outside during optimizer step ``step``."""
    import lightning as L

    import dreammix.train as train_module

    class Sender(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == step - 1:
                os.kill(os.getpid(), signum)

    original = train_module._callbacks
    monkeypatch.setattr(train_module, "_callbacks", lambda *a, **k: [*original(*a, **k), Sender()])


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_saves_a_resumable_checkpoint_and_exits_128_plus_signal(entry, tmp_path, subject, monkeypatch,
                                                                         signum, code):
    _signal_at_step(monkeypatch, 2, signum)
    run = tmp_path / "run"
    exit_code, err = entry("train.py", *TRAIN_FAST, *subject_args(subject), "trainer.max_steps=50",
                           "checkpoint.every_n_steps=0", f"run_dir={run}")
    last = run / "checkpoints" / "last.ckpt"
    assert_error_ends_the_run(exit_code, err, f"stopped by {signal.Signals(signum).name} at step 2; resume with ckpt_path={last}", code)
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and all("lora_" in k for k in state["state_dict"])
    assert (run / "checkpoints" / "step_000002.ckpt").is_file() and not (run / "lora").exists()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.slow
def test_resume_after_sigterm_equals_the_uninterrupted_run(compose, tmp_path, subject, monkeypatch):
    """The README recipe: ``ckpt_path=<run>/checkpoints/last.ckpt`` after a SIGTERM at step 2 of 4
    (with gradient accumulation 2, so the signal lands inside an accumulation window) gives the
    LoRA of the run that was never stopped."""
    from safetensors.torch import load_file

    from dreammix.interrupt import TrainingInterrupted
    from dreammix.train import train

    def cfg(run, *extra):
        return compose("train", [*TRAIN_FAST, *subject_args(subject), "trainer.max_steps=4", "optim.lr=1e-2",
                                 "trainer.accumulate_grad_batches=2", "checkpoint.every_n_steps=0", "loss.beta=0",
                                 f"run_dir={tmp_path / run}", *extra])

    straight = train(cfg("straight"))
    with monkeypatch.context() as patch:
        _signal_at_step(patch, 2, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(cfg("stopped"))
    assert stopped.value.exit_code == 143
    resumed = train(cfg("resumed", f"ckpt_path={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}"))
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_sigterm_to_the_real_process_exits_143_with_a_checkpoint(tmp_path, subject):
    """What SLURM / Kubernetes do: SIGTERM to ``python src/train.py`` while it trains."""
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [sys.executable, str(SRC / "train.py"), *TRAIN_FAST, *subject_args(subject), "trainer.max_steps=100000",
         "checkpoint.every_n_steps=1", f"run_dir={run}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_000001.ckpt").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "Traceback" not in err
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] >= 1


# ------------------------------------------------------------------------------------------------
# 9. inputs that used to end in a traceback: one line, exit 2, before the model where possible
# ------------------------------------------------------------------------------------------------


class _Touch:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("kind", ["corrupt", "empty", "malicious", "other_rank", "nan", "not_a_checkpoint"])
def test_bad_checkpoints_are_refused_before_the_model_loads(entry, tmp_path, subject, monkeypatch, kind):
    ckpt = tmp_path / "bad.ckpt"
    lora_key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.default.weight"
    if kind == "corrupt":
        ckpt.write_bytes(os.urandom(4096))
    elif kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "malicious":
        torch.save({"state_dict": {}, "x": _Touch(tmp_path / "pwned")}, ckpt)
    elif kind == "other_rank":
        torch.save({"state_dict": {lora_key: torch.zeros(8, 64)},
                    "dreammix_lora": {"rank": 8, "alpha": 4.0, "target_modules": ["to_k", "to_v"]}}, ckpt)
    elif kind == "nan":
        torch.save({"state_dict": {lora_key: torch.full((4, 64), float("nan"))}}, ckpt)
    else:
        torch.save([1, 2, 3], ckpt)
    monkeypatch.setattr("dreammix.train.load_pipeline", boom)
    code, err = entry("train.py", *TRAIN_FAST, *subject_args(subject), f"ckpt_path={ckpt}", f"run_dir={tmp_path / 'run'}")
    message = {"corrupt": "not a readable training checkpoint", "empty": "not a readable training checkpoint",
               "malicious": "holds objects other than tensors and plain data (refused",
               "other_rank": "does not match the configured LoRA", "nan": "holds NaN or infinite values",
               "not_a_checkpoint": "not a Lightning training checkpoint"}[kind]
    assert_one_line_error(code, err, message)
    assert "weights_only=False" not in err and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("script", ["inpaint.py", "train.py", "build_benchmark.py", "eval.py"])
def test_an_unwritable_output_location_fails_before_any_generation(entry, tmp_path, subject, monkeypatch, script):
    """/proc refuses new files even to root (this suite may run as root, where chmod proves nothing)."""
    image, mask = _image_and_mask(tmp_path / "in")
    monkeypatch.setattr("dreammix.models.loading.load_pipeline", boom)
    monkeypatch.setattr("dreammix.train.load_pipeline", boom)
    args = {
        "inpaint.py": ["model=tiny", f"image={image}", f"mask={mask}", "prompt=a sks thing", "out=/proc/dreammix/x.png"],
        "train.py": [*TRAIN_FAST, *subject_args(subject), "run_dir=/proc/dreammix-run"],
        "build_benchmark.py": ["benchmark.out_dir=/proc/dreammix-bench"],
        "eval.py": ["model=tiny", "logger=none", "lora_dir=null", f"manifest={_one_case_manifest(tmp_path)}",
                    "subject=custom", "subject.name=thing", "subject.class_noun=thing",
                    f"subject.image_dir={subject.image_dir}", "run_dir=/proc/dreammix-eval"],
    }[script]
    code, err = entry(script, *args)
    assert_one_line_error(code, err, "cannot write to /proc/dreammix")


def _one_case_manifest(tmp_path) -> Path:
    from test_eval import make_bench

    return make_bench(tmp_path / "bench", subjects=("thing",), backgrounds=1)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels (all PIL reads before refusing a bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("pixels", [100_000 * 100_000, pytest.param(12_000 * 8_000, marks=pytest.mark.slow)],
                         ids=["bomb", "warning-size"])
def test_decompression_bombs_are_one_line_errors(entry, tmp_path, monkeypatch, pixels):
    image, mask = _image_and_mask(tmp_path / "in")
    side = int(pixels**0.5)
    image.write_bytes(_png_header(side, pixels // side))
    monkeypatch.setattr("dreammix.models.loading.load_pipeline", boom)
    code, err = entry("inpaint.py", "model=tiny", f"image={image}", f"mask={mask}", "prompt=a sks thing",
                      f"out={tmp_path / 'o.png'}")
    assert_one_line_error(code, err, "image too large (DecompressionBomb")


def test_adm_out_dir_that_is_a_file_is_one_line(entry, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    code, err = entry("adm.py", *ADM, f"adm.out_dir={target}")
    assert_one_line_error(code, err, "exists and is not a folder (adm.out_dir)")
    assert target.read_text() == "mine"


def test_a_lora_of_another_base_is_one_line_in_inpaint(entry, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from conftest import make_real_lora

    good = make_real_lora(tiny_model_dir, tmp_path / "good")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora.down" in k else v
               for k, v in load_file(good / "pytorch_lora_weights.safetensors").items()}
    save_file(tensors, str(foreign / "pytorch_lora_weights.safetensors"))
    image, mask = _image_and_mask(tmp_path / "in")
    code, err = entry("inpaint.py", "model=tiny", f"model.pretrained={tiny_model_dir}", f"image={image}", f"mask={mask}",
                      "prompt=a sks thing", f"lora={foreign}", f"out={tmp_path / 'o.png'}", "progress=false")
    assert_error_ends_the_run(code, err, "cannot load LoRA: its tensor shapes do not fit this base model")
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------------
# 10. late errors come before the base model loads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("defect", ["empty_file", "not_an_image", "empty_mask"])
def test_bad_subject_data_is_reported_before_the_model_loads(entry, tmp_path, monkeypatch, defect):
    bad = make_subject(tmp_path / "subject", n=2)
    if defect == "empty_file":
        (bad.image_dir / "01.jpg").write_bytes(b"")
    elif defect == "not_an_image":
        (bad.image_dir / "01.jpg").write_text("hello")
    else:
        Image.new("L", (64, 64), 0).save(bad.mask_dir / "01.png")
    monkeypatch.setattr("dreammix.train.load_pipeline", boom)
    code, err = entry("train.py", *TRAIN_FAST, *subject_args(bad), f"run_dir={tmp_path / 'run'}")
    message = "mask is empty" if defect == "empty_mask" else "cannot read image"
    assert_one_line_error(code, err, message)
    assert "01." in err


# ------------------------------------------------------------------------------------------------
# 11. fuzz: every numeric key of every entry point's config, with hostile values
# ------------------------------------------------------------------------------------------------

#: Each entry point's config with its mandatory values filled in (what the fuzz starts from).
ENTRY_CONFIGS = {
    "train": ["model=tiny", "logger=none"],
    "adm": ["model=tiny", "logger=none", "vlm=offline", "run_dir=unused"],
    "eval": ["model=tiny", "logger=none", "lora_dir=null", "run_dir=unused"],
    "inpaint": ["model=tiny", "image=x.png", "mask=m.png", "prompt=a sks thing", "run_dir=unused"],
    "build_benchmark": [],
}
HOSTILE = [float("nan"), float("inf"), -1, 10**30, "", "abc"]


def _numeric_keys(cfg) -> list[str]:
    from dreammix.validation import _leaves

    return [k for k, v in _leaves(cfg) if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _pre_model_checks(name: str, cfg, subject) -> None:
    """What each entry point checks before any model loads (beyond validate_config)."""
    from dreammix.adm import _check_config
    from dreammix.benchmark.builder import BoxFilters
    from dreammix.models.loading import model_spec_from_config
    from dreammix.train import train_specs
    from dreammix.vlm import make_vlm_client

    if name == "train":
        train_specs(cfg)
    if name == "adm":
        _check_config(cfg.adm)
        make_vlm_client(cfg.get("vlm"))
    if name == "build_benchmark":
        from omegaconf import OmegaConf

        BoxFilters.from_config(OmegaConf.to_container(cfg.benchmark.filters, resolve=True))
    if "model" in cfg:
        model_spec_from_config(cfg.model)


@pytest.mark.parametrize("name", list(ENTRY_CONFIGS))
def test_fuzz_every_numeric_setting_gives_success_or_a_one_line_error(compose, name, subject, tmp_path):
    """nan / inf / negative / huge / empty / wrong-typed values in every numeric key: the config
    validator (what ``hydra_entry`` runs on every job) and the entry point's own pre-model checks
    either accept the value or raise a one-line DreamMixError, never anything else; non-finite
    values are always refused; and every numeric key has a rule (a new setting needs one)."""
    from omegaconf import OmegaConf, open_dict

    from dreammix.validation import RULES, validate_config

    overrides = list(ENTRY_CONFIGS[name])
    if name == "train":
        overrides += [*subject_args(subject), f"run_dir={tmp_path}"]
    base = compose(name, overrides)
    keys = _numeric_keys(base)
    assert keys
    unruled = [k for k in keys if k.split("[")[0] not in RULES]
    assert not unruled, f"add a rule to dreammix.validation.RULES for {unruled}"
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    for key in keys:
        parent_key, _, last = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        index = last
        if last.endswith("]"):  # a list item: "adm.mask_area[0]"
            list_key, _, number = last[:-1].partition("[")
            parent, index = parent[list_key], int(number)
        original = parent[index]
        for value in HOSTILE:
            with open_dict(cfg):
                parent[index] = value
            try:
                validate_config(cfg)
                _pre_model_checks(name, cfg, subject)
            except DreamMixError as exc:
                assert "\n" not in str(exc), (key, value, str(exc))
            else:
                assert not (isinstance(value, float) and not np.isfinite(value)), f"{key}={value} accepted"
        with open_dict(cfg):
            parent[index] = original


def test_eval_refuses_a_nan_lora_before_the_model_and_nan_scores(compose, tmp_path, tiny_model_dir):
    from types import SimpleNamespace

    from dreammix.evaluate import evaluate
    from test_eval import StubPipe, StubSuite, eval_cfg, make_bench, make_lora
    from test_eval import make_subject as make_refs

    lora = _nan_lora(tiny_model_dir, tmp_path / "nan")
    bench = SimpleNamespace(manifest=make_bench(tmp_path / "bench", subjects=("thing",), backgrounds=1),
                            refs=make_refs(tmp_path / "refs"), lora=lora)
    with pytest.raises(DreamMixError, match="holds NaN or infinite values"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run"), pipe_factory=boom)

    class NanSuite(StubSuite):
        def score(self, *args):
            return [{**s, "clip_i": float("nan")} for s in super().score(*args)]

    bench.lora = make_lora(tmp_path / "lora", {"tau_in": 1.5, "tau_out": 0.7, "beta": 0.4})
    with pytest.raises(DreamMixError, match="non-finite score for case thing-identity-0"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run2"), pipe_factory=lambda c: StubPipe(), metric_suite=NanSuite())
    assert not (tmp_path / "run2" / "records.jsonl").is_file() or not (tmp_path / "run2" / "records.jsonl").read_text()


def test_the_real_entry_point_refuses_a_secret_before_writing(tmp_path):
    """One real process (the in-process runs above share pytest's): nothing under the cwd at all."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, str(SRC / "adm.py"), "+vlm.api_key=sk-test-SECRET-0123456789abcdef"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, "secrets are not accepted on the command line")
    assert "SECRET" not in result.stdout + result.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_a_run_folder_of_someone_elses_is_refused(entry, tmp_path, subject, sibling, monkeypatch, script):
    """``run_dir=<a user's folder>``: train would replace its ``lora/``, eval write ``images/`` and
    ``summary.json`` there; both refuse a non-empty folder that is not one of their runs."""
    monkeypatch.setattr("dreammix.train.load_pipeline", boom)
    args = {
        "train.py": [*TRAIN_FAST, *subject_args(subject)],
        "eval.py": ["model=tiny", "logger=none", "lora_dir=null", f"manifest={_one_case_manifest(tmp_path)}",
                    "subject=custom", "subject.name=thing", "subject.class_noun=thing", f"subject.image_dir={subject.image_dir}"],
    }[script]
    before = snapshot(sibling)
    code, err = entry(script, *args, f"run_dir={sibling}")
    assert_one_line_error(code, err, "is not empty and is not a")
    assert snapshot(sibling) == before
