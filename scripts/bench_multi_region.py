"""UNet calls and wall time of multi-subject inpainting, 1 vs 2 regions (README table).

    python scripts/bench_multi_region.py [--steps 30] [--lambda 0.7] [--repeats 3]

Tiny random model on CPU (built into the cache if missing), one LoRA per region; the UNet calls are
counted with a forward pre-hook, the wall time is the median of ``--repeats`` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="square photo side in pixels")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dreammix.models.tiny import ensure_tiny_pipeline
    from dreammix.multi_region import Region
    from dreammix.pipeline import DreamMixInpaintPipeline
    from lora_runs import make_lora

    cache = Path(os.environ.get("DREAMMIX_CACHE", ".cache"))
    model = ensure_tiny_pipeline(cache / "tiny-sdxl-inpaint")
    pipe = DreamMixInpaintPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    s = args.size
    image = np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)
    left, right = np.zeros((s, s), np.float32), np.zeros((s, s), np.float32)
    left[s // 4 : s // 2, s // 8 : s // 2 - 4] = 1
    right[s // 2 : 3 * s // 4, s // 2 + 4 : 7 * s // 8] = 1
    calls = [0]
    pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with tempfile.TemporaryDirectory() as tmp:
        loras = [make_lora(model, Path(tmp) / name, seed) for seed, name in enumerate(("a", "b"))]
        rows = []
        for n in (1, 2):
            regions = [Region(m, f"a photo of sks thing {i}", lora=loras[i]) for i, m in enumerate((left, right)[:n])]

            def run():
                return pipe.inpaint_regions(image, regions, num_inference_steps=args.steps, lambda_=args.lambda_,
                                            generator=torch.Generator().manual_seed(0))  # fmt: skip

            run()  # warm-up (adapters loaded once here)
            times = []
            for _ in range(args.repeats):
                calls[0] = 0
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            rows.append((n, calls[0], statistics.median(times)))
    print(f"| regions | UNet calls (T={args.steps}, λ={args.lambda_}) | wall time, tiny model, CPU, {s}² px |")
    print("|---|---|---|")
    for n, c, t in rows:
        print(f"| {n} | {c} | {t:.2f} s ({t / rows[0][2]:.2f}×) |")


if __name__ == "__main__":
    main()
