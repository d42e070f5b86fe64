"""Performance harness: our code against a baseline measured in the same run.

``python -m dreammix.perf --model tiny`` (or ``make perf``) writes ``outputs/perf/report.json`` and
``report.md``. Every figure is a median over repeated runs after warm-up, and every speed figure
is also a ratio against a baseline measured in the same run on the same model and inputs:

1. training step — our Lightning module + datamodule vs a bare PyTorch loop over the same UNet,
   LoRA, loss and optimizer (what diffusers' example scripts do);
2. sampling — ``DreamMixInpaintPipeline`` (DIF + TAS) vs diffusers'
   ``StableDiffusionXLInpaintPipeline`` at equal steps (seconds per image, UNet calls per image);
3. scaling — both at several resolutions and batch sizes.

Speed comes from alternating short chunks of both sides inside one fresh process (a slow spell
of a shared machine then slows both sides of a pair, not one side's whole run), repeated in
``--repeats`` processes; the ratio is the median of the per-pair ratios. Peak memory (CUDA max
allocated on a GPU, peak RSS on the CPU), UNet calls and frozen-encoder calls come from one run of
each side alone in its own process. Processes are forked from a server that has only imported the
libraries, so none inherits another run's allocator state, caches or leftover memory. Model FLOPs
per training step come from ``torch.utils.flop_counter`` (forward + backward, no checkpoint
recomputation); with ``--model sdxl_arch`` (real SDXL shapes, random weights) on a GPU the report
adds bf16 step time, images/s, peak GPU memory and model FLOP utilisation at 1024 px.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
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

# What the run processes need, imported once by the fork server so each run starts in milliseconds.
_PRELOAD = ["torch", "lightning", "diffusers", "transformers", "peft", "dreammix.module", "dreammix.pipeline",
            "dreammix.data.datamodule", "dreammix.models.loading"]


# ---- measurement helpers ----------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) of this process; False where it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process lifetime, Linux units


@contextmanager
def peak_memory(device: torch.device):
    """Peak memory of the block: CUDA max allocated (GPU) or the kernel's peak RSS (CPU).

    On the CPU the counter is reset at the start of the block where Linux allows it
    (``/proc/self/clear_refs``); elsewhere it covers the process since its start, which is still
    one side's own figure because every run is a fresh process.
    """
    result = {"peak_bytes": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    try:
        yield result
    finally:
        if device.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        else:
            result["peak_bytes"] = _peak_rss_bytes()


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


def _pin_cpu_threads(device: torch.device) -> None:
    """CPU runs compute on one thread: on a small shared machine two threads of tiny kernels are
    at the mercy of every other process, and run-to-run spread grows from a few % to tens of %."""
    if device.type == "cpu":
        torch.set_num_threads(1)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _quiet() -> None:
    """No progress bars or info logs from the libraries, in this process and the run processes
    (the environment is inherited by the fork server; the loggers are set in each process)."""
    import logging

    for var, value in (("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(var, value)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


_CONTEXT = None


def isolated(fn, *args):
    """``fn(*args)`` in a fresh child process (forked from a server that preloaded ``_PRELOAD``).

    The child's result (or exception) comes back pickled; nothing the run allocated outlives it.
    """
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=_CONTEXT, initializer=_quiet) as pool:
        return pool.submit(fn, *args).result()


# ---- models and inputs --------------------------------------------------------------------------

def make_pipeline(model: str, device: torch.device, dtype: torch.dtype, cache_dir: Path, compile: bool = False):
    """The base pipeline for a perf run: the tiny model (CPU) or SDXL shapes with random weights;
    ``compile`` as ``model.compile_unet`` does it (lazy ``torch.compile`` of the UNet in place)."""
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
    if compile:
        pipe.unet.compile()
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

@dataclass(frozen=True)
class RunSpec:
    model: str
    resolution: int
    batch: int
    device: torch.device
    dtype: torch.dtype  # frozen-weight dtype
    mixed_bf16: bool  # autocast bf16 in both ours and the baseline
    cache_dir: Path
    compile: bool = False  # torch.compile the UNet on both sides


def _cached_set(pipe, spec: RunSpec):
    from dreammix.data.frozen import FrozenInputEncoder, encode_examples

    encoder = FrozenInputEncoder(pipe, spec.device)
    return encode_examples(synthetic_examples(max(4, spec.batch), spec.resolution), ["a photo of sks can"], encoder, spec.resolution)


class _BareLoop:
    """The baseline: a plain PyTorch loop (diffusers example-script style) on the same pieces."""

    def __init__(self, spec: RunSpec):
        from diffusers import DDPMScheduler

        from dreammix.models.lora import LoraSpec, add_lora

        self.spec = spec
        self.pipe = make_pipeline(spec.model, spec.device, spec.dtype, spec.cache_dir, spec.compile)
        self.unet = self.pipe.unet
        self.params = add_lora(self.unet, LoraSpec())
        self.unet.train()  # as DreamMixLoRAModule does
        self.unet_dtype = self.unet.dtype
        self.checkpointing = spec.model != "tiny"
        if self.checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4, fused=spec.device.type == "cuda")
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.loader = torch.utils.data.DataLoader(_cached_set(self.pipe, spec), batch_size=spec.batch, shuffle=True, drop_last=True)
        self._batches = self.batches()

    def batches(self):
        while True:
            yield from self.loader

    def step(self, batch: dict) -> None:
        from dreammix.losses import reweighted_mse
        from dreammix.module import inpaint_unet_forward

        spec = self.spec
        batch = {k: v.to(spec.device, non_blocking=True) for k, v in batch.items()}
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=spec.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with torch.autocast(spec.device.type, dtype=torch.bfloat16, enabled=spec.mixed_bf16):
            pred = inpaint_unet_forward(self.unet, noisy, t, batch["mask"], batch["masked_latents"],
                                        batch["prompt_embeds"], batch["pooled_embeds"], batch["time_ids"], dtype=self.unet_dtype)
        loss = reweighted_mse(pred, noise, batch["mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_seconds(self, n: int) -> list[float]:
        """``n`` step times: the gaps between the ends of ``n + 1`` consecutive steps."""
        ends = []
        for _ in range(n + 1):
            self.step(next(self._batches))
            _sync(self.spec.device)
            ends.append(time.perf_counter())
        return np.diff(ends).tolist()

    def model_flops(self) -> int:
        """FLOPs of one training step as the model defines it: forward + backward, counted with
        gradient checkpointing off so recomputed activations do not inflate MFU."""
        from torch.utils.flop_counter import FlopCounterMode

        if self.checkpointing:
            self.unet.disable_gradient_checkpointing()
        with FlopCounterMode(display=False) as counter:
            self.step(next(self._batches))
        if self.checkpointing:
            self.unet.enable_gradient_checkpointing()
        return counter.get_total_flops()


class _LightningRun:
    """Ours: the project's DreamMixLoRAModule + datamodule, each timed chunk one ``Trainer.fit``."""

    def __init__(self, spec: RunSpec):
        from diffusers import DDPMScheduler

        from dreammix.data.datamodule import DataSpec, DreamMixDataModule
        from dreammix.data.frozen import FrozenInputEncoder
        from dreammix.models.lora import LoraSpec
        from dreammix.module import DreamMixLoRAModule, LossSpec, OptimSpec

        self.spec = spec
        self.pipe = make_pipeline(spec.model, spec.device, spec.dtype, spec.cache_dir, spec.compile)
        self.datamodule = DreamMixDataModule(
            subject=None, spec=DataSpec(source_prompt="a photo of sks can", batch_size=spec.batch, mask_variants=1),
            encoder=FrozenInputEncoder(self.pipe, spec.device), resolution=spec.resolution, use_regular=False,
        )
        self.datamodule.source = _cached_set(self.pipe, spec)  # encoded up front, exactly like train()
        self.module = DreamMixLoRAModule(
            self.pipe.unet, DDPMScheduler.from_config(self.pipe.scheduler.config), LoraSpec(), LossSpec(beta=0.0),
            OptimSpec(), gradient_checkpointing=spec.model != "tiny",
        )

    def step_seconds(self, n: int) -> list[float]:
        """``n`` step times from a fit of ``n + 1`` steps (the gaps between step ends, so the fit's
        start-up is not counted: it is paid once per training run, not per step)."""
        import lightning as L

        spec, ends = self.spec, []

        class StepTimer(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync(spec.device)
                ends.append(time.perf_counter())

        trainer = L.Trainer(
            accelerator=spec.device.type, devices=1, precision="bf16-mixed" if spec.mixed_bf16 else "32-true",
            max_steps=n + 1, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
            callbacks=[StepTimer()], num_sanity_val_steps=0, limit_val_batches=0,
        )
        trainer.fit(self.module, datamodule=self.datamodule)
        return np.diff(ends).tolist()


def training_side_run(side: str, spec: RunSpec, steps: int, warmup: int) -> dict:
    """One side alone in its process: median step time, peak memory, frozen-encoder calls
    during the steps, and (baseline) the model FLOPs of one step."""
    _pin_cpu_threads(spec.device)
    run = _BareLoop(spec) if side == "bare" else _LightningRun(spec)
    out = {"flops_per_step": run.model_flops() if side == "bare" else None}
    run.step_seconds(warmup)
    _free(spec.device)
    counter = CallCounter([run.pipe.text_encoder, run.pipe.text_encoder_2, run.pipe.vae.encoder])
    with peak_memory(spec.device) as mem:
        seconds = run.step_seconds(steps)
    counter.remove()
    out.update(step_s=float(statistics.median(seconds)), peak_bytes=mem["peak_bytes"], frozen_encoder_calls=counter.count)
    return out


def training_interleaved(spec: RunSpec, chunks: int, chunk_steps: int, warmup: int) -> list[tuple[float, float]]:
    """Both sides in one process, ``chunks`` alternating chunks of ``chunk_steps`` steps each:
    (bare, ours) median step seconds per chunk pair. Adjacent chunks share the machine's state,
    so a slow spell of a shared machine slows both sides of a pair instead of one side's run."""
    _pin_cpu_threads(spec.device)
    bare, ours = _BareLoop(spec), _LightningRun(spec)
    bare.step_seconds(warmup)
    ours.step_seconds(warmup)
    pairs = []
    for i in range(chunks):
        order = (bare, ours) if i % 2 == 0 else (ours, bare)
        times = {id(run): statistics.median(run.step_seconds(chunk_steps)) for run in order}
        pairs.append((times[id(bare)], times[id(ours)]))
    return pairs


def _quartiles(values: list[float]) -> list[float]:
    """First and third quartile: how far single pairs scatter around the median ratio."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [q1, q3]


def measure_training(spec: RunSpec, steps: int, warmup: int, repeats: int) -> dict:
    """Speed from ``repeats`` isolated processes of interleaved chunks (``steps`` steps per side
    and process); peak memory, encoder calls and FLOPs from one isolated run of each side."""
    chunk_steps = max(2, min(10, steps))
    chunks = max(2, steps // chunk_steps)
    pairs = [pair for _ in range(repeats) for pair in isolated(training_interleaved, spec, chunks, chunk_steps, warmup)]
    bare = isolated(training_side_run, "bare", spec, steps, warmup)
    ours = isolated(training_side_run, "ours", spec, steps, warmup)
    out = {
        "model": spec.model, "resolution": spec.resolution, "batch": spec.batch, "device": spec.device.type,
        "precision": "bf16-mixed" if spec.mixed_bf16 else "fp32", "repeats": repeats, "steps_per_side": chunks * chunk_steps * repeats,
        "chunk_steps": chunk_steps,
        "ours_step_s": float(statistics.median(o for _, o in pairs)),
        "bare_step_s": float(statistics.median(b for b, _ in pairs)),
        "train_step_ratio": float(statistics.median(o / b for b, o in pairs)),
        "ours_peak_bytes": ours["peak_bytes"], "bare_peak_bytes": bare["peak_bytes"],
        "ours_alone_step_s": ours["step_s"], "bare_alone_step_s": bare["step_s"],
        "frozen_encoder_calls_during_training": ours["frozen_encoder_calls"],
        "chunk_ratios": [o / b for b, o in pairs],
        "train_step_ratio_iqr": _quartiles([o / b for b, o in pairs]),
    }
    flops = bare["flops_per_step"]
    if flops:
        out["flops_per_step"] = flops
        out["achieved_tflops"] = flops / out["ours_step_s"] / 1e12
        out["bare_achieved_tflops"] = flops / out["bare_step_s"] / 1e12
    return out


# ---- 2. sampling --------------------------------------------------------------------------------

def _sampling_inputs(size: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 255
    return image, Image.fromarray(mask, mode="L")


def _sampler_call(side: str, pipe, spec: RunSpec, steps: int, pre_encoded: bool = False):
    """A function making one pipeline call of ``side`` (``spec.batch`` images); ``pre_encoded``
    (ours): the prompt's conditions encoded once ahead, as ``eval.py`` runs the pipeline."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from dreammix.pipeline import DreamMixInpaintPipeline

    res, n = spec.resolution, spec.batch
    image, mask = _sampling_inputs((res, res))
    prompt = "a photo of sks red can"
    if side == "ours":
        ours = DreamMixInpaintPipeline.from_base(pipe)
        ours.set_progress_bar_config(disable=True)
        text = dict(prompt=prompt, eliminate=["silver"], guidance_scale=5.0, num_images_per_prompt=n)
        conditions = ours.encode_conditions(**text) if pre_encoded else None
        return lambda: ours(
            image=image, mask_image=mask, num_inference_steps=steps, lambda_=0.7, resolution=res,
            generator=torch.Generator().manual_seed(0), output_type="pil", conditions=conditions, **text,
        )
    theirs = StableDiffusionXLInpaintPipeline(**pipe.components)
    theirs.set_progress_bar_config(disable=True)  # same (no) progress-bar cost on both sides
    return lambda: theirs(
        prompt=prompt, image=image, mask_image=mask, height=res, width=res, strength=1.0,
        num_inference_steps=steps, guidance_scale=5.0, num_images_per_prompt=n,
        generator=torch.Generator().manual_seed(0), output_type="pil",
    )


class ImageCounter(CallCounter):
    """Counts the images that pass through modules (batch sizes of their first inputs)."""

    def _hook(self, module, args):
        self.count += int(args[0].shape[0])


def sampling_side_run(side: str, spec: RunSpec, steps: int, warmup: int) -> dict:
    """One side alone in its process: per pipeline call, the UNet calls (classifier-free guidance
    and the ``batch`` images share each call), the images through the VAE encoder and decoder, the
    FLOPs of the whole call, and the peak memory over one more call. Ours runs as ``eval.py`` runs
    it: prompt encoded ahead, text encoders parked off the GPU (a no-op on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreammix.pipeline import text_encoders_parked

    _pin_cpu_threads(spec.device)
    pipe = make_pipeline(spec.model, spec.device, spec.dtype, spec.cache_dir, spec.compile)
    call = _sampler_call(side, pipe, spec, steps, pre_encoded=side == "ours")
    with text_encoders_parked(pipe, enabled=side == "ours"):
        for _ in range(warmup):
            call()
        unet, encoded, decoded = CallCounter([pipe.unet]), ImageCounter([pipe.vae.encoder]), ImageCounter([pipe.vae.decoder])
        with FlopCounterMode(display=False) as flops:
            call()
        for counter in (unet, encoded, decoded):
            counter.remove()
        _free(spec.device)
        with peak_memory(spec.device) as mem:
            call()
    return {"unet_calls": unet.count, "vae_encoded_images": encoded.count, "vae_decoded_images": decoded.count,
            "flops_per_call": flops.get_total_flops(), "peak_bytes": mem["peak_bytes"]}


def sampling_interleaved(spec: RunSpec, steps: int, warmup: int, calls: int) -> list[tuple[float, float]]:
    """Both pipelines on the same weights in one process, ``calls`` alternating call pairs:
    (diffusers, ours) seconds per image of each pair."""
    _pin_cpu_threads(spec.device)
    pipe = make_pipeline(spec.model, spec.device, spec.dtype, spec.cache_dir, spec.compile)
    theirs, ours = _sampler_call("diffusers", pipe, spec, steps), _sampler_call("ours", pipe, spec, steps)
    for _ in range(warmup):
        theirs()
        ours()
    pairs = []
    for i in range(calls):
        seconds = {}
        for name, call in ((("diffusers", theirs), ("ours", ours)) if i % 2 == 0 else (("ours", ours), ("diffusers", theirs))):
            _sync(spec.device)
            start = time.perf_counter()
            call()
            _sync(spec.device)
            seconds[name] = (time.perf_counter() - start) / spec.batch
        pairs.append((seconds["diffusers"], seconds["ours"]))
    return pairs


def measure_sampling(spec: RunSpec, steps: int, warmup: int, repeats: int, calls: int = 3) -> dict:
    """Seconds and UNet calls per image: DreamMix (DIF λ=0.7 + TAS) vs diffusers' SDXL inpainting.

    Same model, weights, device, inputs and steps, classifier-free guidance on, at the model
    resolution. Speed from ``repeats`` isolated processes of ``calls`` alternating call pairs;
    UNet calls and peak memory from one isolated run of each side.
    """
    pairs = [pair for _ in range(repeats) for pair in isolated(sampling_interleaved, spec, steps, warmup, calls)]
    theirs = isolated(sampling_side_run, "diffusers", spec, steps, warmup)
    ours = isolated(sampling_side_run, "ours", spec, steps, warmup)
    return {
        "model": spec.model, "resolution": spec.resolution, "batch": spec.batch, "device": spec.device.type,
        "steps": steps, "repeats": repeats, "calls_per_side": calls * repeats,
        "ours_s_per_image": float(statistics.median(o for _, o in pairs)),
        "diffusers_s_per_image": float(statistics.median(d for d, _ in pairs)),
        "sampler_ratio": float(statistics.median(o / d for d, o in pairs)),
        "unet_calls_ours": ours["unet_calls"], "unet_calls_diffusers": theirs["unet_calls"],
        "vae_images_ours": ours["vae_encoded_images"] + ours["vae_decoded_images"],
        "vae_images_diffusers": theirs["vae_encoded_images"] + theirs["vae_decoded_images"],
        "ours_gflop_per_image": ours["flops_per_call"] / spec.batch / 1e9,
        "diffusers_gflop_per_image": theirs["flops_per_call"] / spec.batch / 1e9,
        "ours_peak_bytes": ours["peak_bytes"], "diffusers_peak_bytes": theirs["peak_bytes"],
        "call_ratios": [o / d for d, o in pairs],
        "sampler_ratio_iqr": _quartiles([o / d for d, o in pairs]),
    }


# VAE images per generated image (batch 1), as ``sampling_side_run`` counts them: diffusers encodes
# the masked image and decodes the result; DIF encodes the crop and x^G, each with its blending
# target, and decodes at the LCG→GCH switch and at the end.
VAE_IMAGES_PER_CALL = {"diffusers": {"encode": 1, "decode": 1}, "ours": {"encode": 4, "decode": 2}}


def _meta_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _meta_peak_bytes(fn, *modules) -> int:
    """Peak bytes of ``fn`` (weights of ``modules`` included) from torch's MemTracker, which follows
    every allocation at dispatch level, also of meta tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*modules)
    with torch.no_grad(), tracker:
        fn()
    return sum(int(v["Total"]) for v in tracker.get_tracker_snapshot("peak").values())


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def sdxl_sampling_costs(resolution: int = 1024, steps: int = 30) -> dict:
    """FLOPs and memory per image of both samplers at SDXL scale, without a GPU: the real
    architectures (bf16 UNet and text encoders, fp32 VAE) run on meta tensors, FLOPs counted by
    ``torch.utils.flop_counter``, memory by torch's MemTracker (no memory used, nothing computed).
    One UNet call carries the guidance batch of 2; the text encoders' FLOPs (<0.1 %) are left out.
    ``projected_peak_gib`` = all weights + the largest activation peak of one phase: an estimate
    of the CUDA peak before allocator overhead, not a measurement."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreammix.models import sdxl_arch
    from dreammix.pipeline import VAE_ENCODE_PIXELS_PER_CALL

    r, gib = resolution // 8, 1024**3
    with torch.device("meta"):
        with sdxl_arch.default_dtype(torch.bfloat16):
            unet = UNet2DConditionModel(**sdxl_arch.UNET_CONFIG)
            text_encoders = [CLIPTextModel(CLIPTextConfig(**sdxl_arch.TEXT_ENCODER_CONFIG, vocab_size=49408)),
                             CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_arch.TEXT_ENCODER_2_CONFIG, vocab_size=49408))]
        vae = AutoencoderKL(**sdxl_arch.VAE_CONFIG)
        bf16 = torch.bfloat16
        unet_inputs = dict(sample=torch.randn(2, 9, r, r, dtype=bf16), timestep=torch.tensor(500.0),
                           encoder_hidden_states=torch.randn(2, 77, 2048, dtype=bf16),
                           added_cond_kwargs={"text_embeds": torch.randn(2, 1280, dtype=bf16), "time_ids": torch.randn(2, 6, dtype=bf16)})
        encode_batch = max(1, VAE_ENCODE_PIXELS_PER_CALL // (resolution * resolution))
        image, latent = torch.randn(encode_batch, 3, resolution, resolution), torch.randn(1, 4, r, r)
        flops = {
            "unet_call": _meta_flops(lambda: unet(**unet_inputs)),
            "vae_encode": _meta_flops(lambda: vae.encode(image[:1])),
            "vae_decode": _meta_flops(lambda: vae.decode(latent)),
        }
        weights = {"unet": _param_bytes(unet), "text_encoders": sum(map(_param_bytes, text_encoders)), "vae": _param_bytes(vae)}
        activations = {
            "unet_call": _meta_peak_bytes(lambda: unet(**unet_inputs), unet) - weights["unet"],
            "vae_encode_call": _meta_peak_bytes(lambda: vae.encode(image), vae) - weights["vae"],
            "vae_decode": _meta_peak_bytes(lambda: vae.decode(latent), vae) - weights["vae"],
        }
    out = {"resolution": resolution, "steps": steps, **{f"{k}_tflop": v / 1e12 for k, v in flops.items()}}
    for side, vae_images in VAE_IMAGES_PER_CALL.items():
        total = steps * flops["unet_call"] + vae_images["encode"] * flops["vae_encode"] + vae_images["decode"] * flops["vae_decode"]
        out[f"{side}_tflop_per_image"] = total / 1e12
    out["flop_ratio"] = out["ours_tflop_per_image"] / out["diffusers_tflop_per_image"]
    out["images_per_encoder_call"] = encode_batch
    out["weights_gib"] = {k: v / gib for k, v in weights.items()}
    out["activation_peak_gib"] = {k: v / gib for k, v in activations.items()}
    out["projected_peak_gib"] = (sum(weights.values()) + max(activations.values())) / gib
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
        gb = 1e9  # the targets are in decimal GB (12 GB = 11.2 GiB): the stricter reading
        t1024 = [t for t in training if t["resolution"] == 1024 and t["batch"] == 1]
        s1024 = [s for s in sampling if s["resolution"] == 1024 and s["batch"] == 1]
        if t1024:
            targets["GPU train peak <= 12 GB (1024 px, batch 1)"] = _verdict(t1024[0]["ours_peak_bytes"] / gb <= GPU_TRAIN_PEAK_GB_MAX)
            if peak_tflops and "achieved_tflops" in t1024[0]:
                mfu = t1024[0]["achieved_tflops"] / peak_tflops
                report["model_flop_utilisation"] = mfu
                targets["MFU >= 40 %"] = _verdict(mfu >= GPU_MFU_MIN)
            report["bf16_step_s_1024"] = t1024[0]["ours_step_s"]
        if s1024:
            targets["GPU inference peak <= 10 GB"] = _verdict(s1024[0]["ours_peak_bytes"] / gb <= GPU_INFER_PEAK_GB_MAX)
            report["images_per_s_1024"] = 1.0 / s1024[0]["ours_s_per_image"]
    report["targets"] = targets
    return report


def _spread(run: dict, key: str) -> str:
    return f" ({run[key][0]:.2f}–{run[key][1]:.2f})" if key in run else ""


def report_markdown(report: dict) -> str:
    mib = 1024**2
    compiled = ", torch.compile" if report.get("compile") else ""
    lines = [f"# Performance report ({report['model']} on {report['device']}{compiled})", "",
             "Every figure is a median after warm-up; ratios are the median of per-pair ratios ours / baseline "
             "(the two sides run alternately in the same processes), with the quartiles of the pair ratios "
             "in brackets.", "",
             "## Targets", "", "| target | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["targets"].items()]
    lines += ["", "## Training step (ours = Lightning module + datamodule; baseline = bare PyTorch loop)", "",
              "| res | batch | precision | ours s/step | bare s/step | ratio | ours peak MiB | bare peak MiB | "
              "encoder calls | model GFLOP/step | ours TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["training_runs"]:
        flops = f"{t['flops_per_step'] / 1e9:.1f} | {t['achieved_tflops']:.3f}" if t.get("flops_per_step") else "– | –"
        lines.append(f"| {t['resolution']} | {t['batch']} | {t['precision']} | {t['ours_step_s']:.4f} | {t['bare_step_s']:.4f} | "
                     f"{t['train_step_ratio']:.3f}{_spread(t, 'train_step_ratio_iqr')} | {t['ours_peak_bytes'] / mib:.0f} | {t['bare_peak_bytes'] / mib:.0f} | "
                     f"{t['frozen_encoder_calls_during_training']} | {flops} |")
    lines += ["", "## Sampling (ours = DreamMixInpaintPipeline, DIF λ=0.7 + TAS; baseline = diffusers SDXL inpainting)", "",
              "| res | batch | steps | ours s/img | diffusers s/img | ratio | UNet calls ours / diffusers | "
              "VAE images ours / diffusers | GFLOP/img ours / diffusers | peak MiB ours / diffusers |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["sampling_runs"]:
        lines.append(f"| {s['resolution']} | {s['batch']} | {s['steps']} | {s['ours_s_per_image']:.4f} | "
                     f"{s['diffusers_s_per_image']:.4f} | {s['sampler_ratio']:.3f}{_spread(s, 'sampler_ratio_iqr')} | {s['unet_calls_ours']} / "
                     f"{s['unet_calls_diffusers']} | {s['vae_images_ours']} / {s['vae_images_diffusers']} | "
                     f"{s['ours_gflop_per_image']:.1f} / {s['diffusers_gflop_per_image']:.1f} | "
                     f"{s['ours_peak_bytes'] / mib:.0f} / {s['diffusers_peak_bytes'] / mib:.0f} |")
    lines += ["", "UNet calls are per pipeline call (guidance and the batch's images share each call). VAE images: "
              "encoder + decoder images per call; DIF also encodes the blending targets of the crop and of x^G and "
              "decodes at the LCG→GCH switch, which is what the GFLOP columns differ by. Speeds come from "
              "alternating chunks of both sides in fresh processes; peak memory from each side alone in its own "
              "process (CUDA max allocated on a GPU, peak RSS on the CPU)."]
    if "model_flop_utilisation" in report:
        lines += ["", f"Model FLOP utilisation at 1024 px: {report['model_flop_utilisation']:.1%}"]
    return "\n".join(lines) + "\n"


DEFAULT_CASES = {"tiny": "64x1,128x1,128x2", "sdxl_arch": "1024x1,768x1,1024x2"}
DEFAULT_PEAK_TFLOPS = 989.0  # H100/H200 SXM bf16 dense


def _pairs(text: str) -> list[tuple[int, int]]:
    """``"64x1,128x2"`` → ``[(64, 1), (128, 2)]`` (resolution x batch; resolution a multiple of 8)."""
    out = []
    for item in text.split(","):
        res, _, batch = item.strip().partition("x")
        try:
            pair = (int(res), int(batch or 1))
        except ValueError:
            raise ValueError(f"case {item.strip()!r} is not RESOLUTIONxBATCH, e.g. 128x2") from None
        if pair[0] < 8 or pair[0] % 8 or pair[1] < 1:
            raise ValueError(f"case {item.strip()!r}: resolution must be a positive multiple of 8, batch >= 1")
        out.append(pair)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dreammix.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sdxl_arch"], default="tiny")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--train-cases", default=None, help="resolution x batch list, e.g. 64x1,128x1,128x2")
    parser.add_argument("--sample-cases", default=None, help="resolution x batch list for sampling")
    parser.add_argument("--train-steps", type=int, default=40, help="timed optimizer steps per side and repeat")
    parser.add_argument("--sample-steps", type=int, default=30, help="denoising steps per image (paper: 30)")
    parser.add_argument("--sample-calls", type=int, default=4, help="timed pipeline calls per side and repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes of interleaved timing per case")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="accelerator bf16 dense peak for MFU (default on CUDA: 989, H100/H200)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet on both sides (model.compile_unet)")
    parser.add_argument("--sdxl-costs", action="store_true",
                        help="only print both samplers' FLOPs and projected memory per image at SDXL scale "
                             "(meta tensors, no GPU) for the sample cases' resolutions")
    parser.add_argument("--out", default="outputs/perf")
    parser.add_argument("--cache-dir", default=os.environ.get("DREAMMIX_CACHE", ".cache"))
    args = parser.parse_args(argv)
    for name in ("train_steps", "sample_steps", "sample_calls", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    try:
        train_cases = _pairs(args.train_cases or DEFAULT_CASES[args.model])
        sample_cases = _pairs(args.sample_cases or DEFAULT_CASES[args.model])
    except ValueError as exc:
        parser.error(str(exc))
    if args.sdxl_costs:
        resolutions = sorted({r for r, _ in (_pairs(args.sample_cases) if args.sample_cases else [(1024, 1)])})
        result = [sdxl_sampling_costs(r, args.sample_steps) for r in resolutions]
        print(json.dumps(result, indent=2))
        return {"sdxl_sampling_costs": result}
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    gpu = device.type == "cuda"
    if args.model == "sdxl_arch" and not gpu and not args.train_cases:
        print("note: sdxl_arch on the CPU needs ~16 GB of RAM and minutes per step at 1024 px; "
              "pass small --train-cases/--sample-cases (e.g. 128x1) for a smoke run")
    _quiet()
    # bf16 frozen weights + bf16 autocast wherever the real model runs (and for SDXL shapes on
    # the CPU, where fp32 copies of both sides would not fit in memory); fp32 for the tiny model.
    bf16 = gpu or args.model == "sdxl_arch"
    dtype = torch.bfloat16 if bf16 else torch.float32
    cache = Path(args.cache_dir)
    training = [
        measure_training(RunSpec(args.model, r, b, device, dtype, bf16, cache, args.compile), args.train_steps, args.warmup, args.repeats)
        for r, b in train_cases
    ]
    sampling = [
        measure_sampling(RunSpec(args.model, r, b, device, dtype, bf16, cache, args.compile), args.sample_steps,
                         max(1, args.warmup // 2), args.repeats, args.sample_calls)
        for r, b in sample_cases
    ]
    peak = args.peak_tflops or (DEFAULT_PEAK_TFLOPS if gpu else None)
    report = build_report(training, sampling, args.model, device.type, peak)
    report["compile"] = args.compile
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    print(report_markdown(report))
    return report


if __name__ == "__main__":
    main()
