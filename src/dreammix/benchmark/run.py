"""``run_benchmark(cfg)``: the whole reproduction behind ``make benchmark`` (``src/benchmark.py``).

The work is a graph of independent jobs (:mod:`dreammix.benchmark.jobs`), each exactly a command a
user could type, run by ``bench.executor`` (:mod:`dreammix.benchmark.executors`: in this process,
on Ray, on SLURM through submitit):

1. **Benchmark.** ``<bench.benchmark_dir>/manifest.jsonl``, built once for every subject (so
   ``bench.subjects=[can]`` then ``[dog]`` run on the same manifest).
2. **LoRAs.** Each row (``bench.experiments``) names a training variant through
   ``conf/experiment/<row>.yaml`` (``loss.*``); rows with the same variant share one LoRA per subject
   (``<out>/loras/<variant>/<subject>``), trained unless its ``lora/dreammix_run.json`` (written
   last by ``train``) is there, resumed from ``checkpoints/last.ckpt`` after an interruption.
   Variants with regular data (``loss.beta > 0``) first get their ADM set (``adm/<subject>``).
3. **Evaluation.** ``evaluate`` for every row × subject in ``<out>/eval/<row>/<subject>`` (fixed
   folders: a rerun resumes each run where it stopped), optionally as ``bench.shards`` case shards
   merged by the unsharded command.
4. **Tables** (here, after the jobs). Records of a row are pooled over subjects
   (:func:`~dreammix.benchmark.report.merge_runs`); FID over the row's whole generated set per task;
   the "Real images" row from the training images; ``table1.md``, ``table3.md`` and
   ``results.json`` in ``<out>``. A row missing cases (a job that failed) shows ``missing`` cells
   and how many cases it has, instead of means over fewer cases.

``bench.dry_run=true`` prints every planned job with its command, and the job count of the
benchmark over all subjects, without running anything.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dreammix.atomic import atomic_write_bytes
from dreammix.benchmark.executors import EXECUTORS, Execution, execute, make_executor
from dreammix.benchmark.jobs import CONF_DIR, MODELS, ModelCache, Plan, all_subjects, compose_config, kv, loss_variant, plan_jobs
from dreammix.benchmark.jobs import override_lists as _lists  # noqa: F401 - the name tests and older callers use
from dreammix.benchmark.manifest import MANIFEST_NAME, read_manifest
from dreammix.benchmark.wandb_log import log_benchmark
from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

__all__ = ["BenchmarkRun", "CONF_DIR", "ModelCache", "compose_config", "kv", "loss_variant", "main", "run_benchmark"]


@dataclass
class BenchmarkRun:
    out_dir: Path
    table1: Path
    table3: Path
    results: Path
    trained: list[str] = field(default_factory=list)
    adm_built: list[str] = field(default_factory=list)
    eval_dirs: dict[str, dict[str, Path]] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)  # every planned job, in order
    execution: Execution | None = None


def main(cfg: DictConfig) -> None:
    """``src/benchmark.py``: exit 1 when a job failed (after writing the tables of what finished)."""
    result = run_benchmark(cfg)
    if result.execution is not None and (result.execution.failed or result.execution.blocked):
        sys.exit(1)


def run_benchmark(cfg: DictConfig, conf_dir: str | Path | None = None) -> BenchmarkRun:
    """The chain of the module docstring for ``cfg.bench``; returns where everything went."""
    bench = cfg.bench
    conf = Path(str(conf_dir)) if conf_dir else None
    experiments = [str(e) for e in bench.experiments]
    if not experiments:
        raise DreamMixError("no experiments to run", "bench.experiments")
    for name in experiments:
        if not ((conf or CONF_DIR) / "experiment" / f"{name}.yaml").is_file():
            raise DreamMixError(f"unknown experiment {name!r} (no conf/experiment/{name}.yaml)", "bench.experiments")
    executor_name = str(bench.get("executor", "local"))
    if executor_name not in EXECUTORS:
        raise DreamMixError(f"unknown executor {executor_name!r}; known: {', '.join(EXECUTORS)}", "bench.executor")
    retries = int(bench.get("retries") or 0)
    if retries < 0:
        raise DreamMixError(f"must be >= 0, got {retries}", "bench.retries")

    manifest = Path(str(bench.benchmark_dir)).absolute() / MANIFEST_NAME
    universe = sorted({c.subject for c in read_manifest(manifest)}) if manifest.is_file() else all_subjects(conf or CONF_DIR)
    subjects = [str(s) for s in bench.subjects] if bench.get("subjects") else universe
    missing = [s for s in subjects if s not in universe]
    if missing:
        where = str(manifest) if manifest.is_file() else "bench.subjects"
        raise DreamMixError(f"subjects {missing} are not in the benchmark (subjects: {', '.join(universe)})", where)
    dry_run = bool(bench.get("dry_run", False))
    out = Path(str(bench.out_dir)).absolute()
    executor = None if dry_run else make_executor(bench, out)  # an engine that cannot start: before any planning
    try:
        plan = plan_jobs(cfg, subjects, conf)
    except BaseException:
        if executor is not None:
            executor.close()
        raise
    result = BenchmarkRun(out_dir=out, table1=out / "table1.md", table3=out / "table3.md", results=out / "results.json",
                          eval_dirs=plan.eval_dirs, jobs=[j.name for j in plan.jobs])  # fmt: skip
    if executor is None:
        print_plan(plan, len(universe))
        return result

    out.mkdir(parents=True, exist_ok=True)
    try:
        threads = bench.get("torch_threads")
        result.execution = execute(plan.jobs, executor, retries=retries, out=out, conf_dir=conf, torch_threads=threads)
    finally:
        executor.close()
    ran = set(result.execution.done)
    result.trained = [j.name.removeprefix("train/") for j in plan.jobs if j.kind == "train" and j.name in ran]
    result.adm_built = [j.name.rsplit("/", 1)[-1] for j in plan.jobs if j.kind == "adm" and j.name in ran]  # subjects
    for name, failure in result.execution.failed.items():
        print(f"FAILED {name}: {failure['reason']} (log: {failure['log']})")
    if result.execution.blocked:
        print(f"not run (a job they need failed): {', '.join(result.execution.blocked)}")
    if not manifest.is_file():
        print("no manifest: no tables")
        return result
    threads = bench.get("torch_threads")
    if threads:  # the tables score the real images and compute FID here, like a job would
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            write_tables(cfg, plan, result, conf)
        finally:
            torch.set_num_threads(previous)
    else:
        write_tables(cfg, plan, result, conf)
    return result


def job_counts(plan: Plan, subjects: int) -> dict[str, int]:
    """Jobs of each kind for ``subjects`` subjects with ``plan``'s rows, variants and shards (every
    subject gets the same jobs, so this is the plan's per-subject count times ``subjects``)."""
    per_subject: dict[str, int] = {}
    for job in plan.jobs:
        if job.kind != "manifest":
            per_subject[job.kind] = per_subject.get(job.kind, 0) + 1
    n = max(1, len(plan.subjects))
    return {"manifest": 1, **{kind: count // n * subjects for kind, count in per_subject.items()}}


def print_plan(plan: Plan, universe: int) -> None:
    """``bench.dry_run``: every job (``[done]`` if its outputs are on disk) and its command."""
    for number, job in enumerate(plan.jobs, start=1):
        state = "done" if job.done() else "todo"
        after = f" (after {', '.join(job.deps)})" if job.deps else ""
        print(f"{number:4d}. [{state}] {job.name}{after}\n      {job.command()}")
    todo = sum(not j.done() for j in plan.jobs)
    print(f"planned: {len(plan.jobs)} jobs ({todo} to run) for {len(plan.subjects)} subject(s) x {len(plan.experiments)} row(s)")
    counts = job_counts(plan, universe)
    print(f"all {universe} subjects: {sum(counts.values())} jobs (" + ", ".join(f"{k} {n}" for k, n in counts.items()) + ")")


def row_fids(rows: dict[str, dict[str, Any]], metrics_cfg: DictConfig, extractor: Any) -> dict[str, dict[str, float | None]]:
    """FID per row and task over the row's generated images, all subjects pooled: FID of a single
    subject's few dozen images would be mostly estimator noise."""
    from dreammix.evaluate import fid_of

    fid: dict[str, dict[str, float | None]] = {}
    for experiment, row in rows.items():
        by_task: dict[str, list[Path]] = {}
        for record in row["records"]:
            by_task.setdefault(record["task"], []).append(row["image_paths"][record["case_id"]])
        fid[experiment] = {task: fid_of(paths, metrics_cfg, extractor) for task, paths in by_task.items()}
    return fid


def real_images(suite: Any, subjects: list[str], common: list[str], out: Path, conf: Path | None) -> dict[str, Any]:
    """The "Real images" row of Table 1: each subject's training images scored by our metrics."""
    from dreammix.benchmark.report import real_images_row
    from dreammix.evaluate import reference_images, score_real_images

    per_subject = {}
    for subject in subjects:
        scfg = compose_config("eval", [*common, "lora_dir=null", kv("subject", subject), kv("run_dir", out / "report")], conf)
        per_subject[subject] = score_real_images(suite, reference_images(scfg), str(scfg.subject.class_noun))
    return real_images_row(per_subject)


def mark_missing(rows: dict[str, dict[str, Any]], expected: dict[str, dict[str, set[str]]]) -> dict[str, dict[str, str]]:
    """Per row and task, ``"<have> of <expected>"`` where cases are missing (a failed or unfinished
    job); such a task gets ``incomplete`` in ``rows`` so the tables print ``missing`` cells instead of
    means over fewer cases."""
    incomplete: dict[str, dict[str, str]] = {}
    for row, merged in rows.items():
        have: dict[str, int] = {}
        for record in merged["records"]:
            if record["case_id"] in expected[row].get(record["task"], set()):
                have[record["task"]] = have.get(record["task"], 0) + 1
        for task, wanted in expected[row].items():
            if have.get(task, 0) < len(wanted):
                note = f"{have.get(task, 0)} of {len(wanted)}"
                incomplete.setdefault(row, {})[task] = note
                merged["tasks"].setdefault(task, {"n": have.get(task, 0), "mean": {}})["incomplete"] = note
    return incomplete


def write_tables(cfg: DictConfig, plan: Plan, result: BenchmarkRun, conf: Path | None) -> None:
    """``table1.md``, ``table3.md``, ``results.json`` from the evaluation runs on disk."""
    from dreammix.benchmark.presets import describe_setup
    from dreammix.benchmark.report import merge_runs, table1_markdown, table3_markdown
    from dreammix.evaluate import fid_of, make_fid_extractor, select_cases

    bench = cfg.bench
    out, manifest, subjects, experiments, common = plan.out, plan.manifest, plan.subjects, plan.experiments, plan.eval_overrides
    cases = read_manifest(manifest)
    report_cfg = compose_config("eval", [*common, "lora_dir=null", kv("run_dir", out / "report")], conf)
    rows = {e: merge_runs(p for p in result.eval_dirs[e].values() if p.is_dir()) for e in experiments}
    expected: dict[str, dict[str, set[str]]] = {}
    for e in experiments:
        ecfg = compose_config("eval", [*common, kv("experiment", e), "lora_dir=null", kv("run_dir", out / "report")], conf)
        limit = None if ecfg.get("limit") is None else int(ecfg.limit)
        expected[e] = {}
        for s in subjects:
            for case in select_cases(cases, s, [str(t) for t in ecfg.tasks], limit):
                expected[e].setdefault(case.task, set()).add(case.case_id)
    incomplete = mark_missing(rows, expected)
    fid: dict[str, dict[str, float | None]] = {}
    real_fid = None
    extractor = None
    if bool(bench.get("fid", True)):
        extractor = make_fid_extractor(str(report_cfg.fid_extractor), report_cfg.metrics)
        fid = row_fids(rows, report_cfg.metrics, extractor)
        for row, tasks in incomplete.items():  # FID of fewer images is another number: not reported
            for task in tasks:
                fid.get(row, {})[task] = None
        backgrounds = sorted({c.image_path for c in cases if c.subject in subjects})
        real_fid = fid_of(backgrounds, report_cfg.metrics, extractor)
    real: dict[str, Any] | None = None
    if bool(bench.get("real_images", True)):
        real = real_images(MODELS.suite(report_cfg), subjects, common, out, conf)

    paper = OmegaConf.to_container(cfg.paper, resolve=True) if "paper" in cfg else {}
    note = (
        f"Benchmark `{bench.name}`: {len(subjects)} subjects ({', '.join(subjects)}), manifest `{manifest}`. "
        + describe_setup(report_cfg.model, plan.preset)
        + (" Tiny random models: the values only show that the chain runs." if str(bench.name) == "tiny" else "")
    )
    fid_note = (
        f"FID: `{report_cfg.fid_extractor}` features against `{report_cfg.metrics.fid.reference_dir}`"
        + (" (colour statistics, not comparable with published FID)." if str(report_cfg.fid_extractor) != "inception" else ".")
        if extractor is not None else "FID: not computed (bench.fid=false)."
    )  # fmt: skip
    if any("fid" in (v or {}) for v in ((paper.get("table1") or {}).get("dreammix") or {}).values()):
        fid_note += (" The published FID of the DreamMix (paper) row is unverified: the paper text we reproduce from"
                     " has numbers for Table 3 only (CLIP-T / CLIP-I / DINO, equal to its ++ADM row).")
    table1_row = str(bench.get("table1_experiment", "dif_tas_adm"))
    atomic_write_bytes(result.table3, table3_markdown(rows, paper.get("table3") or {}, experiments, note=note).encode("utf-8"))
    atomic_write_bytes(
        result.table1,
        table1_markdown(rows.get(table1_row), real, paper.get("table1") or {}, fid=fid.get(table1_row), real_fid=real_fid,
                        fid_note=fid_note, note=note).encode("utf-8"),
    )  # fmt: skip
    payload = {
        "benchmark": bench.name,
        "preset": plan.preset.name,
        "base_model": {"name": str(report_cfg.model.name), "pretrained": str(report_cfg.model.pretrained)},
        "train_experiments": plan.train_of,
        "subjects": subjects,
        "manifest": str(manifest),
        "rows": {e: {"tasks": rows[e]["tasks"], "fid": fid.get(e), "runs": {s: str(p) for s, p in result.eval_dirs[e].items()}} for e in experiments},
        "real_images": real,
        "real_images_fid": real_fid,
        "incomplete": incomplete,
        "failed_jobs": result.execution.failed if result.execution else {},
        "fid_extractor": str(report_cfg.fid_extractor) if extractor is not None else None,
        "paper": paper,
    }
    atomic_write_bytes(result.results, (json.dumps(payload, indent=2, default=str) + "\n").encode("utf-8"))
    log_benchmark(cfg, out, payload, result.eval_dirs)  # W&B summary run: tables, job runs, contact sheets
    log.info("benchmark %s: %s, %s", bench.name, result.table1, result.table3)
    print(f"wrote {result.table1} and {result.table3}" + (f" (cases missing: {incomplete})" if incomplete else ""))
