"""The COCO benchmark of paper §4.1: builder, manifest and per-case result records.

``build_benchmark(cfg)`` (``src/build_benchmark.py``) writes ``manifest.jsonl`` + masks;
``read_manifest`` gives the cases back; ``RecordLog`` is the resumable per-case results log
that generation/evaluation appends to.
"""

from dreammix.benchmark.builder import BenchmarkResult, BoxFilters, build_benchmark
from dreammix.benchmark.manifest import Case, read_manifest, write_manifest
from dreammix.benchmark.prompts import SubjectSpec, attribute_prompts, identity_prompts
from dreammix.benchmark.records import RecordLog

__all__ = [
    "BenchmarkResult",
    "BoxFilters",
    "Case",
    "RecordLog",
    "SubjectSpec",
    "attribute_prompts",
    "build_benchmark",
    "identity_prompts",
    "read_manifest",
    "write_manifest",
]
