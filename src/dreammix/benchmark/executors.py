"""Where the benchmark's jobs run: ``bench.executor=local|ray|slurm`` (``submitit_local`` for tests).

The engines do the scheduling: Ray places each job on a worker with a free CPU (and one GPU per
job where the cluster has GPUs) and queues the rest; SLURM (through submitit) queues them on the
cluster. This module only hands a job to the engine once the jobs it depends on have finished
(:func:`execute`), retries a failed one ``bench.retries`` times, reports one line per finished job
(k/N, elapsed, ETA) and, for a job that still fails, its name, log file and reason — while the
other jobs go on. Each attempt's start/end time, host and outcome are appended to
``<out>/jobs.jsonl``.

- ``local``: one job after another in this process (one model cache: evaluations reuse the base
  model). A job that raises is reported and the others go on; a crash of the process ends the
  run, and the rerun continues where it stopped.
- ``ray``: ``ray.init()`` starts a local Ray instance (``bench.ray.num_workers`` parallel jobs,
  default one per CPU) or joins an existing cluster (``bench.ray.address=auto`` / ``ray://…``).
  A worker that dies fails only its own job.
- ``slurm``: one SLURM job per benchmark job (``bench.slurm.*``: partition, GPUs, CPUs, memory,
  time); ``submitit_local``: the same through submitit's local executor (every job its own process).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dreammix.benchmark.jobs import Job, run_job
from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray", "slurm", "submitit_local")
#: Environment a local Ray worker must see like the driver does (offline hub, W&B mode, sources).
_ENV = ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_HOME", "WANDB_MODE", "WANDB_SILENT", "OMP_NUM_THREADS", "DREAMMIX_CACHE",
        "DREAMMIX_SHARED_DATA")  # fmt: skip


class LocalExecutor:
    """Runs each job right away, in this process."""

    name = "local"
    max_in_flight = 1  # one after another: a progress line per job as it finishes

    def __init__(self) -> None:
        self._results: dict[int, Any] = {}
        self._next = 0

    def submit(self, job: Job, fn: Callable[..., dict], *args: Any) -> int:
        self._next += 1
        self._results[self._next] = fn(job, *args)
        return self._next

    def wait(self, handles: Sequence[int]) -> list[tuple[int, Any]]:
        return [(h, self._results.pop(h)) for h in handles]

    def close(self) -> None:
        pass


class RayExecutor:
    """Jobs as Ray tasks; Ray's scheduler bounds how many run at once (CPUs, GPUs)."""

    name = "ray"
    max_in_flight = None  # every ready job is handed to Ray, which runs as many as it has room for

    def __init__(self, rcfg: DictConfig):
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - a dependency
            raise DreamMixError("Ray is not installed (pip install 'ray[default]')", "bench.executor=ray") from exc
        self.ray = ray
        address = rcfg.get("address")
        cpus = float(rcfg.get("cpus_per_job") or 1)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": bool(rcfg.get("log_to_driver", False)),
                                  "logging_level": logging.WARNING}  # fmt: skip
        if address in (None, "", "local"):
            workers = rcfg.get("num_workers")
            if workers is not None:
                if int(workers) < 1:
                    raise DreamMixError(f"must be >= 1, got {workers}", "bench.ray.num_workers")
                kwargs["num_cpus"] = int(workers) * cpus
            if rcfg.get("object_store_memory"):
                kwargs["object_store_memory"] = int(rcfg.object_store_memory)
            kwargs["runtime_env"] = {"env_vars": {k: os.environ[k] for k in _ENV if k in os.environ}}
        else:
            kwargs["address"] = str(address)
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - any reason Ray cannot start is the user's to fix
            from dreammix.cli import one_line

            raise DreamMixError(f"Ray cannot start: {one_line(exc)}", f"bench.executor=ray, bench.ray.address={address}") from exc
        gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus_per_job = float(rcfg.get("gpus_per_job") or 0) if gpus else 0.0
        self.cpus_per_job = cpus
        self._remote = ray.remote(run_job)
        log.info("Ray: %s", ray.cluster_resources())

    def submit(self, job: Job, fn: Callable[..., dict], *args: Any) -> Any:
        return self._remote.options(
            num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job if job.gpu else 0, max_retries=0, name=job.name
        ).remote(job, *args)

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, Any]]:
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - the worker died or the task could not run
                out.append((ref, exc))
        return out

    def close(self) -> None:
        self.ray.shutdown()


class SubmititExecutor:
    """Jobs as SLURM jobs (or local processes: ``submitit_local``) through submitit."""

    max_in_flight = None  # SLURM queues them

    def __init__(self, scfg: DictConfig, folder: Path, local: bool):
        import submitit

        self.name = "submitit_local" if local else "slurm"
        if not local and shutil.which("sbatch") is None:
            raise DreamMixError("sbatch not found on PATH: run on a SLURM login node, or use bench.executor=ray|local", "bench.executor=slurm")
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else "slurm")
        params: dict[str, Any] = {"timeout_min": int(scfg.get("timeout_min") or 240), "cpus_per_task": int(scfg.get("cpus_per_task") or 4)}
        if not local:
            params.update(gpus_per_node=int(scfg.get("gpus_per_job") or 0), mem_gb=float(scfg.get("mem_gb") or 32))
            if scfg.get("partition"):
                params["slurm_partition"] = str(scfg.partition)
            if scfg.get("additional_parameters"):
                params["slurm_additional_parameters"] = dict(scfg.additional_parameters)
            if scfg.get("setup"):
                params["slurm_setup"] = [str(s) for s in scfg.setup]
        self.executor.update_parameters(**params)
        self.poll_s = float(scfg.get("poll_s") or (0.5 if local else 10))

    def submit(self, job: Job, fn: Callable[..., dict], *args: Any) -> Any:
        self.executor.update_parameters(name=job.name.replace("/", "_"))
        return self.executor.submit(fn, job, *args)

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, Any]]:
        while True:
            ready = [h for h in handles if h.done()]
            if ready:
                break
            time.sleep(self.poll_s)
        out = []
        for handle in ready:
            try:
                out.append((handle, handle.result()))
            except Exception as exc:  # noqa: BLE001 - killed, timed out, pre-empted
                out.append((handle, exc))
        return out

    def close(self) -> None:
        pass


def make_executor(bench: DictConfig, out: Path) -> Any:
    """The executor named by ``bench.executor``; bad names or an engine that cannot start: exit 2."""
    name = str(bench.get("executor", "local"))
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(bench.get("ray") or DictConfig({}))
    if name in ("slurm", "submitit_local"):
        return SubmititExecutor(bench.get("slurm") or DictConfig({}), out / "submitit", local=name == "submitit_local")
    raise DreamMixError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}", "bench.executor")


@dataclass
class Execution:
    """What :func:`execute` did: finished job names, failures (job → log, reason), blocked jobs."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done before this run
    failed: dict[str, dict[str, str]] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)  # not run: a job they depend on failed


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def execute(
    jobs: Sequence[Job], executor: Any, *, retries: int, out: Path, conf_dir: Path | None, torch_threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> Execution:
    """Run the jobs that are not done on ``executor``, each once the jobs it needs are done."""
    result = Execution()
    by_name = {j.name: j for j in jobs}
    todo = {}
    for job in jobs:
        if job.done():
            result.skipped.append(job.name)
        else:
            todo[job.name] = job
    done = set(result.skipped)
    total, finished, started = len(todo), 0, time.time()
    attempts: dict[str, int] = {}
    running: dict[Any, Job] = {}
    commands: dict[str, str] = {}
    log_dir = out / "logs"
    args = (str(conf_dir) if conf_dir else None, str(log_dir), os.getcwd(), torch_threads)
    record_path = out / "jobs.jsonl"
    echo(f"benchmark: {total} job(s) to run on {executor.name}, {len(result.skipped)} already done")

    def record(entry: dict[str, Any]) -> None:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        with record_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    def failed_upstream(job: Job) -> bool:
        return any(d in result.failed or d in result.blocked for d in job.deps)

    while True:
        in_flight = {j.name for j in running.values()}
        for job in list(todo.values()):
            if job.name in in_flight:
                continue
            if failed_upstream(job):
                todo.pop(job.name)
                result.blocked.append(job.name)
                continue
            if executor.max_in_flight is not None and len(running) >= executor.max_in_flight:
                break
            if all(d in done or d not in by_name for d in job.deps):
                attempts[job.name] = attempts.get(job.name, 0) + 1
                commands[job.name] = job.command()  # as submitted (a training may resume from a checkpoint)
                running[executor.submit(job, run_job, *args)] = job
        if not running:
            break
        for handle, outcome in executor.wait(list(running)):
            job = running.pop(handle)
            if isinstance(outcome, BaseException):
                from dreammix.cli import one_line

                outcome = {"job": job.name, "status": "failed", "reason": f"{outcome.__class__.__name__}: {one_line(outcome)}",
                           "log": str(log_dir / job.log_name())}  # fmt: skip
            record({**outcome, "attempt": attempts[job.name], "executor": executor.name, "command": commands[job.name]})
            if outcome.get("status") in ("ok", "skipped"):
                done.add(job.name)
                todo.pop(job.name)
                result.done.append(job.name)
                status = "done"
            elif attempts[job.name] <= retries:
                echo(f"retrying {job.name} (attempt {attempts[job.name] + 1} of {retries + 1}): {outcome.get('reason')}")
                continue
            else:
                todo.pop(job.name)
                result.failed[job.name] = {"log": str(outcome.get("log")), "reason": str(outcome.get("reason"))}
                status = "FAILED"
            finished += 1
            elapsed = time.time() - started
            eta = elapsed / finished * (total - finished)
            took = f" in {outcome['end'] - outcome['start']:.1f} s" if "end" in outcome and "start" in outcome else ""
            echo(f"[{finished}/{total}] {status} {job.name}{took} | elapsed {_duration(elapsed)}, ETA {_duration(eta)}")
            if status == "FAILED":
                echo(f"  job {job.name} failed: {outcome.get('reason')} (log: {outcome.get('log')})")
    for name in todo:  # never became ready (cannot happen with a valid graph; reported rather than lost)
        result.blocked.append(name)
    sys.stdout.flush()
    return result
