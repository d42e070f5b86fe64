"""Performance harness: our code against a baseline measured in the same run.

``python -m dreammix.perf --model tiny`` (or ``make perf``) writes ``outputs/perf/report.json`` and
``report.md``. Every figure is a median over repeated runs after warm-up, and every speed figure
is also a ratio against a baseline measured in the same process on the same model and inputs:

1. training step — our Lightning module + datamodule vs a bare PyTorch loop over the same UNet,
   LoRA, loss and optimizer (what diffusers' example scripts do);
2. sampling — ``DreamMixInpaintPipeline`` (DIF + TAS) vs diffusers'
   ``StableDiffusionXLInpaintPipeline`` at equal steps (seconds per image, UNet calls per image);
3. scaling — both at several resolutions and batch sizes.

With ``--model sdxl_arch`` (real SDXL shapes, random weights) on a GPU it also records bf16 step
time, peak CUDA memory and model FLOP utilisation (FLOPs from ``torch.utils.flop_counter``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Targets of the performance issue.
TRAIN_STEP_RATIO_MAX = 1.10
SAMPLER_RATIO_MAX = 1.10
GPU_TRAIN_PEAK_GB_MAX = 12.0
GPU_MFU_MIN = 0.40
GPU_INFER_PEAK_GB_MAX = 10.0


# ---- measurement helpers ----------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device):
    """Peak CUDA bytes allocated (GPU) or peak resident set size sampled every 20 ms (CPU)."""
    result = {"peak_bytes": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            result["peak_bytes"] = max(result["peak_bytes"], _rss_bytes())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_bytes"] = max(result["peak_bytes"], _rss_bytes())


class CallCounter:
    """Counts forward calls of modules (UNet calls per image, frozen-encoder calls per step)."""

    def __init__(self, modules):
        self.count = 0
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules if m is not None]

    def _hook(self, module, args):
        self.count += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _median_step_seconds(ends: list[float], warmup: int) -> float:
    """Median of the gaps between consecutive step-end timestamps after ``warmup`` steps."""
    gaps = np.diff(ends[warmup:])
    return float(statistics.median(gaps))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- models and inputs --------------------------------------------------------------------------

def make_pipeline(model: str, device: torch.device, dtype: torch.dtype, cache_dir: Path):
    """The base pipeline for a perf run: the tiny model (CPU) or SDXL shapes with random weights."""
    if model == "tiny":
        from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
        from dreammix.models.tiny import ensure_tiny_pipeline

        path = ensure_tiny_pipeline(cache_dir / "tiny-sdxl-inpaint")
        pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(path), resolution=64), dtype)
    elif model == "sdxl_arch":
        from dreammix.models.sdxl_arch import build_sdxl_arch_pipeline

        pipe = build_sdxl_arch_pipeline(dtype, device=device)
    else:
        raise ValueError(f"unknown perf model {model!r} (tiny | sdxl_arch)")
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        part.to(device)
    return pipe


def synthetic_examples(n: int, size: int, seed: int = 0):
    """``n`` random RGB images with a centred box mask (object region)."""
    from dreammix.data.subjects import MaskedImage

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        mask = np.zeros((size, size), np.float32)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        out.append(MaskedImage(image=image, mask=mask, path=Path(f"synthetic_{i}.png")))
    return out


# ---- 1. training step ---------------------------------------------------------------------------

@dataclass
class RunSpec:
    model: str
    resolution: int
    batch: int
    device: torch.device
    dtype: torch.dtype  # frozen-weight dtype
    mixed_bf16: bool  # autocast bf16 in both ours and the baseline
    cache_dir: Path


def _cached_set(pipe, spec: RunSpec):
    from dreammix.data.frozen import FrozenInputEncoder, encode_examples

    encoder = FrozenInputEncoder(pipe, spec.device)
    return encode_examples(synthetic_examples(max(4, spec.batch), spec.resolution), ["a photo of sks can"], encoder, spec.resolution)


def bare_training_loop(spec: RunSpec, steps: int, warmup: int) -> dict:
    """The baseline: a plain PyTorch loop (diffusers example-script style) on the same pieces."""
    from diffusers import DDPMScheduler

    from dreammix.losses import reweighted_mse
    from dreammix.models.lora import LoraSpec, add_lora
    from dreammix.module import inpaint_unet_forward

    pipe = make_pipeline(spec.model, spec.device, spec.dtype, spec.cache_dir)
    cached = _cached_set(pipe, spec)
    unet = pipe.unet
    params = add_lora(unet, LoraSpec())
    unet_dtype = unet.dtype
    if spec.model != "tiny":
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=spec.device.type == "cuda")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loader = torch.utils.data.DataLoader(cached, batch_size=spec.batch, shuffle=True, drop_last=True)
    counter = CallCounter([pipe.text_encoder, pipe.text_encoder_2, pipe.vae.encoder])
    ends: list[float] = []
    flops = None

    def step(batch):
        batch = {k: v.to(spec.device, non_blocking=True) for k, v in batch.items()}
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=spec.device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(spec.device.type, dtype=torch.bfloat16, enabled=spec.mixed_bf16):
            pred = inpaint_unet_forward(unet, noisy, t, batch["mask"], batch["masked_latents"],
                                        batch["prompt_embeds"], batch["pooled_embeds"], batch["time_ids"], dtype=unet_dtype)
        loss = reweighted_mse(pred, noise, batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with peak_memory(spec.device) as mem:
        done = 0
        while done < warmup + steps + 1:
            for batch in loader:
                if done == warmup and spec.device.type == "cuda":
                    from torch.utils.flop_counter import FlopCounterMode

                    with FlopCounterMode(display=False) as fc:
                        step(batch)
                    flops = fc.get_total_flops()
                else:
                    step(batch)
                _sync(spec.device)
                ends.append(time.perf_counter())
                done += 1
                if done >= warmup + steps + 1:
                    break
    counter.remove()
    result = {"step_s": _median_step_seconds(ends, warmup + 1), "peak_bytes": mem["peak_bytes"],
              "frozen_encoder_calls": counter.count, "flops_per_step": flops}
    del pipe, unet, optimizer, params, cached
    _free(spec.device)
    return result


def lightning_training(spec: RunSpec, steps: int, warmup: int) -> dict:
    """Ours: the project's DreamMixLoRAModule + datamodule under a lightning.Trainer."""
    import lightning as L
    from diffusers import DDPMScheduler

    from dreammix.data.datamodule import DataSpec, DreamMixDataModule
    from dreammix.data.frozen import FrozenInputEncoder
    from dreammix.models.lora import LoraSpec
    from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

    pipe = make_pipeline(spec.model, spec.device, spec.dtype, spec.cache_dir)
    datamodule = DreamMixDataModule(
        subject=None, spec=DataSpec(source_prompt="a photo of sks can", batch_size=spec.batch, mask_variants=1),
        encoder=FrozenInputEncoder(pipe, spec.device), resolution=spec.resolution, use_regular=False,
    )
    datamodule.source = _cached_set(pipe, spec)  # encoded up front, exactly like train()
    module = DreamMixLoRAModule(
        pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), LoraSpec(), LossSpec(beta=0.0), OptimSpec(),
        gradient_checkpointing=spec.model != "tiny",
    )
    counter = CallCounter([pipe.text_encoder, pipe.text_encoder_2, pipe.vae.encoder])
    ends: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(spec.device)
            ends.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator=spec.device.type, devices=1, precision="bf16-mixed" if spec.mixed_bf16 else "32-true",
        max_steps=warmup + steps + 1, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
        callbacks=[StepTimer()], num_sanity_val_steps=0, limit_val_batches=0,
    )
    with peak_memory(spec.device) as mem:
        trainer.fit(module, datamodule=datamodule)
    counter.remove()
    result = {"step_s": _median_step_seconds(ends, warmup + 1), "peak_bytes": mem["peak_bytes"],
              "frozen_encoder_calls": counter.count}
    del pipe, module, trainer, datamodule
    _free(spec.device)
    return result


def measure_training(spec: RunSpec, steps: int, warmup: int, repeats: int) -> dict:
    """``repeats`` alternating runs of the baseline and ours: medians of each, median paired ratio."""
    bare, ours = [], []
    for _ in range(repeats):
        bare.append(bare_training_loop(spec, steps, warmup))
        ours.append(lightning_training(spec, steps, warmup))
    med = lambda runs, key: float(statistics.median(r[key] for r in runs))  # noqa: E731
    out = {
        "model": spec.model, "resolution": spec.resolution, "batch": spec.batch, "device": spec.device.type,
        "precision": "bf16-mixed" if spec.mixed_bf16 else "fp32",
        "ours_step_s": med(ours, "step_s"), "bare_step_s": med(bare, "step_s"),
        "ours_peak_bytes": max(r["peak_bytes"] for r in ours), "bare_peak_bytes": max(r["peak_bytes"] for r in bare),
        "frozen_encoder_calls_during_training": sum(r["frozen_encoder_calls"] for r in ours),
    }
    # Median of the per-repeat ratios: each pair ran back to back, so slow drifts of a shared
    # machine cancel within a pair instead of landing on one side.
    out["train_step_ratio"] = float(statistics.median(o["step_s"] / b["step_s"] for o, b in zip(ours, bare)))
    flops = bare[0].get("flops_per_step")
    if flops:
        out["flops_per_step"] = flops
        out["achieved_tflops"] = flops / out["ours_step_s"] / 1e12
    return out


# ---- 2. sampling --------------------------------------------------------------------------------

def _sampling_inputs(size: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 255
    return image, Image.fromarray(mask, mode="L")


def measure_sampling(spec: RunSpec, steps: int, warmup: int, repeats: int) -> dict:
    """Seconds and UNet calls per image: DreamMix (DIF λ=0.7 + TAS) vs diffusers' SDXL inpainting.

    Both run on the same pipeline object (same weights, same device), at the model resolution,
    classifier-free guidance on, ``repeats`` alternating timed calls after ``warmup`` calls each.
    """
    from diffusers import StableDiffusionXLInpaintPipeline

    from dreammix.pipeline import DreamMixInpaintPipeline

    pipe = make_pipeline(spec.model, spec.device, spec.dtype, spec.cache_dir)
    ours = DreamMixInpaintPipeline.from_base(pipe)
    theirs = StableDiffusionXLInpaintPipeline(**pipe.components)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)  # same (no) progress-bar cost on both sides
    res = spec.resolution
    image, mask = _sampling_inputs((res, res))
    prompt, n = "a photo of sks red can", spec.batch
    counter = CallCounter([pipe.unet])

    def run_ours():
        ours(image=image, mask_image=mask, prompt=prompt, num_inference_steps=steps, guidance_scale=5.0,
             lambda_=0.7, eliminate=["silver"], num_images_per_prompt=n, resolution=res,
             generator=torch.Generator().manual_seed(0), output_type="pil")

    def run_theirs():
        theirs(prompt=prompt, image=image, mask_image=mask, height=res, width=res, strength=1.0,
               num_inference_steps=steps, guidance_scale=5.0, num_images_per_prompt=n,
               generator=torch.Generator().manual_seed(0), output_type="pil")

    timings = {"ours": [], "diffusers": []}
    calls = {}
    with torch.autocast(spec.device.type, dtype=torch.bfloat16, enabled=False):
        for name, fn in (("ours", run_ours), ("diffusers", run_theirs)):
            for _ in range(warmup):
                fn()
            counter.count = 0
            fn()
            calls[name] = counter.count
        peaks = {}
        for _ in range(repeats):
            for name, fn in (("diffusers", run_theirs), ("ours", run_ours)):
                with peak_memory(spec.device) as mem:
                    _sync(spec.device)
                    start = time.perf_counter()
                    fn()
                    _sync(spec.device)
                    timings[name].append((time.perf_counter() - start) / n)
                peaks[name] = max(peaks.get(name, 0), mem["peak_bytes"])
    counter.remove()
    out = {
        "model": spec.model, "resolution": res, "batch": n, "device": spec.device.type, "steps": steps,
        "ours_s_per_image": float(statistics.median(timings["ours"])),
        "diffusers_s_per_image": float(statistics.median(timings["diffusers"])),
        "unet_calls_ours": calls["ours"], "unet_calls_diffusers": calls["diffusers"],
        "ours_peak_bytes": peaks["ours"], "diffusers_peak_bytes": peaks["diffusers"],
    }
    out["sampler_ratio"] = float(statistics.median(o / d for o, d in zip(timings["ours"], timings["diffusers"])))
    del pipe, ours, theirs
    _free(spec.device)
    return out


# ---- report -------------------------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def build_report(training: list[dict], sampling: list[dict], model: str, device: str, peak_tflops: float | None) -> dict:
    """Headline figures (first case = reference case) + targets with pass/fail + all raw runs."""
    head_t, head_s = training[0], sampling[0]
    report = {
        "model": model, "device": device,
        "train_step_ratio": head_t["train_step_ratio"], "sampler_ratio": head_s["sampler_ratio"],
        "unet_calls_ours": head_s["unet_calls_ours"], "unet_calls_diffusers": head_s["unet_calls_diffusers"],
        "frozen_encoder_calls_during_training": sum(t["frozen_encoder_calls_during_training"] for t in training),
        "training_runs": training, "sampling_runs": sampling,
    }
    targets = {
        "train_step_ratio <= 1.10": _verdict(all(t["train_step_ratio"] <= TRAIN_STEP_RATIO_MAX for t in training)),
        "frozen encoders never called during training": _verdict(report["frozen_encoder_calls_during_training"] == 0),
        "sampler_ratio <= 1.10": _verdict(all(s["sampler_ratio"] <= SAMPLER_RATIO_MAX for s in sampling)),
        "same UNet calls as diffusers": _verdict(all(s["unet_calls_ours"] == s["unet_calls_diffusers"] for s in sampling)),
    }
    if device == "cuda":
        gib = 1024**3
        t1024 = [t for t in training if t["resolution"] == 1024 and t["batch"] == 1]
        s1024 = [s for s in sampling if s["resolution"] == 1024 and s["batch"] == 1]
        if t1024:
            targets["GPU train peak <= 12 GB (1024 px, batch 1)"] = _verdict(t1024[0]["ours_peak_bytes"] / gib <= GPU_TRAIN_PEAK_GB_MAX)
            if peak_tflops and "achieved_tflops" in t1024[0]:
                mfu = t1024[0]["achieved_tflops"] / peak_tflops
                report["model_flop_utilisation"] = mfu
                targets["MFU >= 40 %"] = _verdict(mfu >= GPU_MFU_MIN)
            report["bf16_step_s_1024"] = t1024[0]["ours_step_s"]
        if s1024:
            targets["GPU inference peak <= 10 GB"] = _verdict(s1024[0]["ours_peak_bytes"] / gib <= GPU_INFER_PEAK_GB_MAX)
            report["images_per_s_1024"] = 1.0 / s1024[0]["ours_s_per_image"]
    report["targets"] = targets
    return report


def report_markdown(report: dict) -> str:
    mib = 1024**2
    lines = [f"# Performance report ({report['model']} on {report['device']})", "",
             "Every figure is a median after warm-up; ratios are ours / baseline measured in the same run.", "",
             "## Targets", "", "| target | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["targets"].items()]
    lines += ["", "## Training step (ours = Lightning module + datamodule; baseline = bare PyTorch loop)", "",
              "| res | batch | precision | ours s/step | bare s/step | ratio | ours peak MiB | bare peak MiB | encoder calls |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in report["training_runs"]:
        lines.append(f"| {t['resolution']} | {t['batch']} | {t['precision']} | {t['ours_step_s']:.4f} | {t['bare_step_s']:.4f} | "
                     f"{t['train_step_ratio']:.3f} | {t['ours_peak_bytes'] / mib:.0f} | {t['bare_peak_bytes'] / mib:.0f} | "
                     f"{t['frozen_encoder_calls_during_training']} |")
    lines += ["", "## Sampling (ours = DreamMixInpaintPipeline, DIF λ=0.7 + TAS; baseline = diffusers SDXL inpainting)", "",
              "| res | batch | steps | ours s/img | diffusers s/img | ratio | UNet calls ours | UNet calls diffusers | ours peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in report["sampling_runs"]:
        lines.append(f"| {s['resolution']} | {s['batch']} | {s['steps']} | {s['ours_s_per_image']:.4f} | "
                     f"{s['diffusers_s_per_image']:.4f} | {s['sampler_ratio']:.3f} | {s['unet_calls_ours']} | "
                     f"{s['unet_calls_diffusers']} | {s['ours_peak_bytes'] / mib:.0f} |")
    if "model_flop_utilisation" in report:
        lines += ["", f"Model FLOP utilisation at 1024 px: {report['model_flop_utilisation']:.1%}"]
    return "\n".join(lines) + "\n"


def _pairs(text: str) -> list[tuple[int, int]]:
    """``"64x1,128x2"`` → ``[(64, 1), (128, 2)]`` (resolution x batch)."""
    out = []
    for item in text.split(","):
        res, _, batch = item.strip().partition("x")
        out.append((int(res), int(batch or 1)))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dreammix.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sdxl_arch"], default="tiny")
    parser.add_argument("--train-cases", default=None, help="resolution x batch list, e.g. 64x1,128x1,128x2")
    parser.add_argument("--sample-cases", default=None, help="resolution x batch list for sampling")
    parser.add_argument("--train-steps", type=int, default=40, help="timed optimizer steps per run")
    parser.add_argument("--sample-steps", type=int, default=30, help="denoising steps per image (paper: 30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats of baseline and ours")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 dense peak (H100/H200: 989)")
    parser.add_argument("--out", default="outputs/perf")
    parser.add_argument("--cache-dir", default=os.environ.get("DREAMMIX_CACHE", ".cache"))
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "sdxl_arch" and device.type != "cuda":
        parser.error("--model sdxl_arch needs a CUDA GPU (random SDXL weights are 10 GB in fp32)")
    gpu = device.type == "cuda"
    default_train = "1024x1,768x1,1024x2" if args.model == "sdxl_arch" else "64x1,128x1,128x2"
    default_sample = "1024x1,768x1,1024x2" if args.model == "sdxl_arch" else "64x1,128x1,128x2"
    dtype = torch.bfloat16 if gpu else torch.float32
    cache = Path(args.cache_dir)
    training = [
        measure_training(RunSpec(args.model, r, b, device, dtype, gpu, cache), args.train_steps, args.warmup, args.repeats)
        for r, b in _pairs(args.train_cases or default_train)
    ]
    sampling = [
        measure_sampling(RunSpec(args.model, r, b, device, dtype, gpu, cache), args.sample_steps, max(1, args.warmup // 2), args.repeats)
        for r, b in _pairs(args.sample_cases or default_sample)
    ]
    report = build_report(training, sampling, args.model, device.type, args.peak_tflops if gpu else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    print(report_markdown(report))
    return report


if __name__ == "__main__":
    main()
