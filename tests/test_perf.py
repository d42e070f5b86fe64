"""The performance harness runs end to end and reports what the issue asks (no timing asserts)."""

import json
import os
from pathlib import Path

import numpy as np
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
            "vae_images_ours": 6, "vae_images_diffusers": 2, "ours_gflop_per_image": 2.0, "diffusers_gflop_per_image": 1.9,
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


@pytest.mark.slow  # 10–25 s: keeps `make test` under 6 min; run by `make test-all`
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
    sampling = saved["sampling_runs"][0]
    # diffusers: encode the masked image, decode the result; DIF: crop and x^G, each with its
    # blending target, and a decode at the switch
    assert (sampling["vae_images_diffusers"], sampling["vae_images_ours"]) == (2, 6)
    assert sampling["ours_gflop_per_image"] > sampling["diffusers_gflop_per_image"] > 0
    run = saved["training_runs"][0]
    assert run["ours_step_s"] > 0 and run["bare_step_s"] > 0 and run["resolution"] == 64
    assert run["flops_per_step"] > 0 and run["achieved_tflops"] > 0
    assert run["ours_peak_bytes"] > 100 * 2**20 and saved["sampling_runs"][0]["diffusers_peak_bytes"] > 100 * 2**20
    assert (tmp_path / "report.md").read_text().startswith("# Performance report (tiny on cpu)")
    assert report["model"] == "tiny"


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_is_the_blocks_own():
    """An allocation inside the block shows in its peak; one freed before the block does not."""
    cpu = torch.device("cpu")
    before = np.ones(300 * 2**20 // 8)
    del before
    with perf.peak_memory(cpu) as quiet:
        pass
    with perf.peak_memory(cpu) as busy:
        inside = np.ones(300 * 2**20 // 8)
        del inside
    assert busy["peak_bytes"] - quiet["peak_bytes"] > 250 * 2**20
    assert quiet["peak_bytes"] > 0


def test_isolated_runs_in_a_fresh_process_and_raises_its_errors():
    assert perf.isolated(os.getpid) != os.getpid()
    with pytest.raises(ValueError):
        perf.isolated(int, "not a number")


def test_model_flops_count_forward_and_backward(tiny_model_dir):
    """Training FLOPs of one step exceed the forward's: backward through the frozen base is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreammix.module import inpaint_unet_forward

    spec = perf.RunSpec("tiny", 64, 1, torch.device("cpu"), torch.float32, False, Path(tiny_model_dir).parent)
    loop = perf._BareLoop(spec)
    batch = next(loop.batches())
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        inpaint_unet_forward(loop.unet, batch["latents"], torch.tensor([10]), batch["mask"], batch["masked_latents"],
                             batch["prompt_embeds"], batch["pooled_embeds"], batch["time_ids"])
    step = loop.model_flops()
    # frozen base: backward computes activation gradients (~1x forward), weight gradients only for LoRA
    assert 1.5 * forward.get_total_flops() < step < 3.2 * forward.get_total_flops()


@pytest.mark.parametrize("args, message", [
    (["--train-cases", "64xa"], "not RESOLUTIONxBATCH"),
    (["--sample-cases", "60x1"], "multiple of 8"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        perf.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow  # 10–25 s: keeps `make test` under 6 min; run by `make test-all`
def test_sdxl_sampling_costs_add_dif_vae_work_to_equal_unet_work():
    out = perf.sdxl_sampling_costs(resolution=256, steps=4)
    unet, enc, dec = out["unet_call_tflop"], out["vae_encode_tflop"], out["vae_decode_tflop"]
    assert unet > 0 and enc > 0 and dec > 0
    assert out["diffusers_tflop_per_image"] == pytest.approx(4 * unet + enc + dec)
    assert out["ours_tflop_per_image"] == pytest.approx(4 * unet + 4 * enc + 2 * dec)
    # the real parameter counts (2.567 B UNet in bf16, 83.7 M VAE in fp32)
    assert out["weights_gib"]["unet"] == pytest.approx(2.567e9 * 2 / 2**30, rel=0.01)
    assert out["weights_gib"]["vae"] == pytest.approx(83.65e6 * 4 / 2**30, rel=0.01)
    assert all(v > 0 for v in out["activation_peak_gib"].values())
    assert out["images_per_encoder_call"] == 16  # (1024² pixels per call) / 256²
    assert out["projected_peak_gib"] == pytest.approx(sum(out["weights_gib"].values()) + max(out["activation_peak_gib"].values()))


def test_vae_image_counts_behind_the_flop_projection_match_the_measured_ones(tmp_path, tiny_model_dir):
    spec = perf.RunSpec("tiny", 64, 1, torch.device("cpu"), torch.float32, False, Path(tiny_model_dir).parent)
    for side, counts in perf.VAE_IMAGES_PER_CALL.items():
        run = perf.isolated(perf.sampling_side_run, side, spec, 2, 0)  # own process: it pins CPU threads
        assert (run["vae_encoded_images"], run["vae_decoded_images"]) == (counts["encode"], counts["decode"])
