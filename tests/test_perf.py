"""The performance harness runs end to end and reports what the issue asks (no timing asserts)."""

import json

import pytest
import torch

from dreammix import perf


def _training(ratio, calls=0, res=64, batch=1):
    return {"model": "tiny", "resolution": res, "batch": batch, "device": "cpu", "precision": "fp32",
            "ours_step_s": ratio, "bare_step_s": 1.0, "ours_peak_bytes": 2**30, "bare_peak_bytes": 2**30,
            "frozen_encoder_calls_during_training": calls, "train_step_ratio": ratio}


def _sampling(ratio, ours_calls=10, their_calls=10, res=64, batch=1):
    return {"model": "tiny", "resolution": res, "batch": batch, "device": "cpu", "steps": 5,
            "ours_s_per_image": ratio, "diffusers_s_per_image": 1.0, "unet_calls_ours": ours_calls,
            "unet_calls_diffusers": their_calls, "ours_peak_bytes": 2**30, "diffusers_peak_bytes": 2**30,
            "sampler_ratio": ratio}


def test_report_targets_pass_and_fail_on_the_numbers():
    good = perf.build_report([_training(1.05)], [_sampling(1.02)], "tiny", "cpu", None)
    assert set(good["targets"].values()) == {"PASS"}
    assert good["train_step_ratio"] == 1.05 and good["unet_calls_ours"] == 10
    bad = perf.build_report([_training(1.05), _training(1.3, calls=2, res=128)], [_sampling(1.02, ours_calls=12)], "tiny", "cpu", None)
    assert bad["targets"]["train_step_ratio <= 1.10"] == "FAIL"
    assert bad["targets"]["frozen encoders never called during training"] == "FAIL"
    assert bad["targets"]["same UNet calls as diffusers"] == "FAIL"
    assert "| 128 | 1 | fp32 |" in perf.report_markdown(bad)


def test_gpu_targets_use_the_1024_run():
    t = _training(1.0, res=1024)
    t.update(device="cuda", ours_peak_bytes=11 * 2**30, achieved_tflops=420.0)
    s = _sampling(1.0, res=1024)
    s.update(device="cuda", ours_peak_bytes=11 * 2**30)
    report = perf.build_report([t], [s], "sdxl_arch", "cuda", 989.0)
    assert report["targets"]["GPU train peak <= 12 GB (1024 px, batch 1)"] == "PASS"
    assert report["targets"]["MFU >= 40 %"] == "PASS" and report["model_flop_utilisation"] == pytest.approx(420 / 989)
    assert report["targets"]["GPU inference peak <= 10 GB"] == "FAIL"


def test_call_counter_counts_forward_calls():
    layer = torch.nn.Linear(2, 2)
    counter = perf.CallCounter([layer, None])
    layer(torch.zeros(1, 2))
    layer(torch.zeros(1, 2))
    counter.remove()
    layer(torch.zeros(1, 2))
    assert counter.count == 2


def test_harness_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    report = perf.main([
        "--model", "tiny", "--train-cases", "64x1", "--sample-cases", "64x1", "--train-steps", "3",
        "--sample-steps", "3", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path),
        "--cache-dir", str(tiny_model_dir.parent),
    ])
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("train_step_ratio", "sampler_ratio", "unet_calls_ours", "unet_calls_diffusers",
                "frozen_encoder_calls_during_training", "training_runs", "sampling_runs", "targets"):
        assert key in saved
    assert saved["frozen_encoder_calls_during_training"] == 0
    # DIF splits the same schedule: no extra UNet calls (one call per step, guidance batched in it)
    assert saved["unet_calls_ours"] == saved["unet_calls_diffusers"] == 3
    run = saved["training_runs"][0]
    assert run["ours_step_s"] > 0 and run["bare_step_s"] > 0 and run["resolution"] == 64
    assert (tmp_path / "report.md").read_text().startswith("# Performance report (tiny on cpu)")
    assert report["model"] == "tiny"
