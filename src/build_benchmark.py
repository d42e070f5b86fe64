"""Build the COCO benchmark of paper §4.1: ``python src/build_benchmark.py [overrides]``.

Examples::

    python src/build_benchmark.py                                   # data/coco → data/benchmark
    python src/build_benchmark.py benchmark.coco_images=DIR \\
        benchmark.coco_annotations=DIR/instances_val2017.json benchmark.out_dir=OUT
    python src/build_benchmark.py 'benchmark.subjects=[can,clock]' benchmark.per_subject=20
"""

from __future__ import annotations

from pathlib import Path

from dreammix.benchmark.builder import build_benchmark
from dreammix.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry(build_benchmark, "build_benchmark", Path(__file__).resolve().parents[1] / "conf")
