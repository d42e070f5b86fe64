"""The benchmark as a graph of independent jobs (``make benchmark``, :mod:`dreammix.benchmark.run`).

Each :class:`Job` is exactly one command a user could type — ``python src/<entry>.py <overrides>``
(:meth:`Job.command`) — and runs as the same function call in whatever process an executor gives it
(:func:`run_job`: compose ``conf/<entry>.yaml`` with the overrides, call the entry's function). The
graph (:func:`plan_jobs`)::

    manifest (all subjects, once)
      → adm/<subject>                 regular set, for training variants with loss.beta > 0
      → train/<variant>/<subject>     one LoRA per subject and training variant (rows share them)
      → eval/<row>/<subject>[/shard-i-of-K]   generation + scores (K case shards: ``bench.shards``)
      → eval/<row>/<subject>          (K > 1) the unsharded command: adopts the shards, nothing redone
    then the tables, in the driver.

Every job is idempotent and resumable because its command is: the done test (:meth:`Job.done`)
looks at the job's outputs on disk (manifest file, regular set size, LoRA files, evaluation
summary), a job that is not done resumes from what it left (training from ``checkpoints/last.ckpt``,
evaluation from its images and records). So a rerun of the benchmark redoes only unfinished work,
whichever executor ran the first attempt and however it ended.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dreammix.benchmark.manifest import MANIFEST_NAME
from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
#: Entry script of each primary config: a job's command line.
SCRIPTS = {"build_benchmark": "src/build_benchmark.py", "adm": "src/adm.py", "train": "src/train.py", "eval": "src/eval.py"}


@dataclass(frozen=True)
class Job:
    """One command of the benchmark and how to tell that its work is on disk."""

    name: str
    config: str  # primary config = entry script (SCRIPTS)
    overrides: tuple[str, ...]
    deps: tuple[str, ...] = ()
    gpu: bool = True
    done_files: tuple[str, ...] = ()  # done when all exist (manifest, LoRA)
    regular: tuple[str, int] | None = None  # (adm.out_dir, adm.num_prompts): done when that many items
    summary: str | None = None  # evaluation: done when its summary covers every recorded case
    resume: str | None = None  # training: ckpt_path=<this> when the file exists when the job starts

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[0]

    def current_overrides(self) -> list[str]:
        """The overrides as the job starts: training resumes from its last checkpoint if any."""
        extra = [kv("ckpt_path", self.resume)] if self.resume and Path(self.resume).is_file() else []
        return [*self.overrides, *extra]

    def command(self) -> str:
        return " ".join(["python", SCRIPTS[self.config], *(shlex.quote(o) for o in self.current_overrides())])

    def done(self) -> bool:
        if self.done_files and not all(Path(p).is_file() for p in self.done_files):
            return False
        if self.regular is not None:
            from dreammix.adm import read_manifest as read_regular

            folder, wanted = self.regular
            if len(read_regular(folder)) < wanted:
                return False
        if self.summary is not None:
            return summary_complete(Path(self.summary))
        return bool(self.done_files or self.regular)

    def log_name(self) -> str:
        return self.name.replace("/", "__") + ".log"


def summary_complete(summary: Path) -> bool:
    """An evaluation run finished: ``summary.json`` (written last) counts every case recorded."""
    from dreammix.benchmark.records import RecordLog
    from dreammix.evaluate import RECORDS_NAME

    if not summary.is_file():
        return False
    try:
        cases = json.loads(summary.read_text(encoding="utf-8")).get("cases")
    except json.JSONDecodeError:
        return False
    return cases == len(RecordLog(summary.parent / RECORDS_NAME).load())


_SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:@+,-[]")


def kv(key: str, value: Any) -> str:
    """A Hydra override ``key=value``, quoting values with characters the override grammar reads."""
    text = str(value)
    if set(text) <= _SAFE:
        return f"{key}={text}"
    return f"{key}='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ------------------------------------------------------------------------------------------------
# Running one job (in the driver, a Ray worker or a submitit job)
# ------------------------------------------------------------------------------------------------


class ModelCache:
    """One base pipeline and one metric suite per process, reloaded only when the model / metrics
    config changes: evaluation jobs running one after another in the same process (the local
    executor, a Ray worker) swap the LoRA instead of reloading SDXL."""

    def __init__(self) -> None:
        self._pipe_key: str | None = None
        self._pipe: Any = None
        self._suite_key: str | None = None
        self._suite: Any = None

    @staticmethod
    def _key(*parts: Any) -> str:
        return json.dumps([OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts], sort_keys=True, default=str)

    def pipeline(self, cfg: DictConfig) -> Any:
        from dreammix.evaluate import load_base_pipeline, prepare_pipeline

        key = self._key(cfg.model, str(cfg.get("device", "auto")))
        if key != self._pipe_key:
            self._pipe = None  # free the old model before loading the next
            self._pipe, self._pipe_key = load_base_pipeline(cfg), key
        return prepare_pipeline(self._pipe, cfg)

    def suite(self, cfg: DictConfig) -> Any:
        from dreammix.metrics import MetricSuite

        key = self._key(cfg.metrics)
        if key != self._suite_key:
            self._suite, self._suite_key = MetricSuite.from_config(cfg.metrics), key
        return self._suite


MODELS = ModelCache()


class _LazySuite:
    """The process's metric suite for ``cfg``, loaded when first used: a finished or merging
    evaluation scores nothing and should not load CLIP and DINO for it."""

    def __init__(self, cfg: DictConfig):
        self._cfg = cfg

    def __getattr__(self, name: str) -> Any:
        return getattr(MODELS.suite(self._cfg), name)


def compose_config(name: str, overrides: Sequence[str], conf_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with overrides — inside a running Hydra app (its config tree)
    or standalone (``conf_dir``, default the repository's ``conf/``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    log.info("compose %s %s", name, " ".join(overrides))
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(conf_dir or CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _call_entry(config: str, cfg: DictConfig) -> None:
    if config == "build_benchmark":
        from dreammix.benchmark.builder import build_benchmark

        build_benchmark(cfg)
    elif config == "adm":
        from dreammix.adm import run_adm

        run_adm(cfg)
    elif config == "train":
        from dreammix.train import train

        train(cfg)
    elif config == "eval":
        from dreammix.evaluate import evaluate

        evaluate(cfg, pipe_factory=MODELS.pipeline, metric_suite=_LazySuite(cfg))
    else:  # pragma: no cover - plan_jobs makes only the four
        raise ValueError(config)


def run_job(job: Job, conf_dir: str | None, log_dir: str, cwd: str, torch_threads: int | None = None) -> dict[str, Any]:
    """Run ``job`` here: skip it when done, else compose its config and call its entry point.

    Its log goes to ``<log_dir>/<job>.log``. Exceptions do not escape: the result says
    ``failed`` with the one-line reason (the traceback is in the log), so one failing job never
    takes the executor's process down with it. A process that dies is the executor's to report.
    """
    from dreammix.cli import one_line

    os.chdir(cwd)  # relative paths of the config mean the same on every worker
    log_path = Path(log_dir) / job.log_name()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    result: dict[str, Any] = {"job": job.name, "host": socket.gethostname(), "pid": os.getpid(), "log": str(log_path), "start": time.time()}
    previous_threads = None
    try:
        if torch_threads:
            import torch

            previous_threads = torch.get_num_threads()
            torch.set_num_threads(int(torch_threads))
        if job.done():
            result["status"] = "skipped"
        else:
            log.info("job %s: %s", job.name, job.command())
            _call_entry(job.config, compose_config(job.config, job.current_overrides(), Path(conf_dir) if conf_dir else None))
            if not job.done():
                raise DreamMixError("the command finished but its outputs are not complete", job.name)
            result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported with the job, the traceback goes to its log
        log.error("job %s failed:\n%s", job.name, traceback.format_exc())
        result.update(status="failed", reason=f"{exc.__class__.__name__}: {one_line(exc)}")
    finally:
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    result["end"] = time.time()
    return result


# ------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The jobs of a benchmark config, in a valid order, and where their results go."""

    jobs: list[Job]
    subjects: list[str]
    experiments: list[str]
    manifest: Path
    out: Path
    eval_overrides: list[str]  # common to every evaluation (the tables compose with them too)
    eval_dirs: dict[str, dict[str, Path]] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)  # row → training variant
    train_of: dict[str, str] = field(default_factory=dict)  # row → the conf/experiment its LoRA is trained with
    preset: Any = None  # dreammix.benchmark.presets.BenchPreset


def loss_variant(loss: Any) -> str:
    """Folder name of a training variant: ``tau1-1_beta0`` (DreamBooth), ``tau1.5-0.7_beta0.4`` …"""
    name = f"tau{float(loss.tau_in):g}-{float(loss.tau_out):g}_beta{float(loss.beta):g}"
    if float(loss.beta) > 0 and str(loss.get("regular_mode", "paired")) != "paired":
        name += f"_{loss.regular_mode}{float(loss.regular_prob):g}"
    if str(loss.get("weighting", "squared_error")) != "squared_error":
        name += f"_{loss.weighting}"
    return name


def override_lists(bench: DictConfig) -> dict[str, list[str]]:
    keys = ("paths_overrides", "build_overrides", "overrides", "train_overrides", "adm_overrides", "eval_overrides")
    return {key: [str(v) for v in (bench.get(key) or [])] for key in keys}


def all_subjects(conf: Path) -> list[str]:
    """The benchmark's subjects before a manifest exists: the DreamBooth subjects of ``conf/subject``."""
    return sorted(p.stem for p in (conf / "subject").glob("*.yaml") if p.stem != "custom")


def plan_jobs(cfg: DictConfig, subjects: Sequence[str], conf: Path | None) -> Plan:
    """The job graph of ``cfg.bench`` for ``subjects`` (module docstring), with the preset's
    training experiment per row (``conf/preset``) and its extra overrides."""
    from dreammix.benchmark.presets import BenchPreset
    from dreammix.evaluate import RUN_INFO_NAME
    from dreammix.models.lora import LORA_WEIGHTS_NAME

    bench = cfg.bench
    ov = override_lists(bench)
    preset = BenchPreset.from_config(cfg.get("preset"))
    preset.check([str(e) for e in bench.experiments], conf or CONF_DIR)
    ov["train_overrides"] += list(preset.train_overrides)
    ov["eval_overrides"] += list(preset.eval_overrides)
    out = Path(str(bench.out_dir)).absolute()
    bench_dir = Path(str(bench.benchmark_dir)).absolute()
    manifest = bench_dir / MANIFEST_NAME
    experiments = [str(e) for e in bench.experiments]
    shards = int(bench.get("shards") or 1)
    if shards < 1:
        raise DreamMixError(f"must be >= 1, got {shards}", "bench.shards")
    # no benchmark.subjects: the manifest holds every subject, so any later subset runs on it
    jobs = [Job("manifest", "build_benchmark", (*ov["paths_overrides"], kv("benchmark.out_dir", bench_dir), *ov["build_overrides"]),
                gpu=False, done_files=(str(manifest),))]  # fmt: skip
    plan = Plan(jobs, list(subjects), experiments, manifest, out,
                [*ov["paths_overrides"], *ov["overrides"], *ov["eval_overrides"], kv("benchmark.out_dir", bench_dir)],
                preset=preset)  # fmt: skip
    if not subjects:
        return plan
    train_base = [*ov["paths_overrides"], *ov["overrides"], *ov["train_overrides"]]
    trainer_row: dict[str, tuple[str, float]] = {}  # variant → (training experiment, beta)
    row_loss: dict[str, list[str]] = {}  # evaluation checks each LoRA against the loss it was trained with
    for row in experiments:
        plan.train_of[row] = preset.train_experiment(row)
        probe = compose_config("train", [*train_base, kv("experiment", plan.train_of[row]), kv("subject", subjects[0]),
                                         kv("run_dir", out / "_probe")], conf)  # fmt: skip
        if row == experiments[0]:
            preset.check_base(probe.model)
        plan.variants[row] = loss_variant(probe.loss)
        trainer_row.setdefault(plan.variants[row], (plan.train_of[row], float(probe.loss.beta)))
        row_loss[row] = [kv(f"loss.{k}", probe.loss[k]) for k in ("tau_in", "tau_out", "beta")]
    adm_jobs: dict[str, str] = {}  # regular-set folder → its ADM job
    for subject in subjects:
        for variant, (experiment, beta) in trainer_row.items():
            base = [*train_base, kv("experiment", experiment), kv("subject", subject)]
            run_dir = out / "loras" / variant / subject
            deps: tuple[str, ...] = ()
            if beta > 0 and bool(bench.get("adm", True)):
                regular_dir = str(compose_config("train", [*base, kv("run_dir", run_dir)], conf).data.regular_dir)
                if regular_dir not in adm_jobs:  # the experiment picks the kind of set (dreambooth_prior: Eq. 2)
                    overrides = (*ov["paths_overrides"], *ov["overrides"], *ov["adm_overrides"], kv("subject", subject),
                                 kv("adm.out_dir", regular_dir), kv("run_dir", out / "adm_runs" / Path(regular_dir).name),
                                 kv("experiment", experiment))  # fmt: skip
                    wanted = int(compose_config("adm", overrides, conf).adm.num_prompts)
                    name = f"adm/{subject}" if Path(regular_dir).name == subject else f"adm/{Path(regular_dir).name}/{subject}"
                    jobs.append(Job(name, "adm", overrides, regular=(regular_dir, wanted)))
                    adm_jobs[regular_dir] = jobs[-1].name
                deps = (adm_jobs[regular_dir],)
            lora = run_dir / "lora"
            jobs.append(Job(f"train/{variant}/{subject}", "train", (*base, kv("run_dir", run_dir)), deps,
                            done_files=(str(lora / RUN_INFO_NAME), str(lora / LORA_WEIGHTS_NAME)),
                            resume=str(run_dir / "checkpoints" / "last.ckpt")))  # fmt: skip
    for row in experiments:
        plan.eval_dirs[row] = {}
        for subject in subjects:
            run_dir = out / "eval" / row / subject
            plan.eval_dirs[row][subject] = run_dir
            lora = out / "loras" / plan.variants[row] / subject / "lora"
            base = (*plan.eval_overrides, kv("experiment", row), *row_loss[row], kv("subject", subject), kv("lora_dir", lora),
                    kv("run_dir", run_dir), "fid=false")  # fmt: skip  (FID: over the row's whole set, in the tables)
            upstream = ("manifest", f"train/{plan.variants[row]}/{subject}")
            name = f"eval/{row}/{subject}"
            if shards == 1:
                jobs.append(Job(name, "eval", base, upstream, summary=str(run_dir / "summary.json")))
                continue
            parts = []
            for i in range(shards):
                part = f"{i}-of-{shards}"
                jobs.append(Job(f"{name}/shard-{part}", "eval", (*base, f"shard={i}/{shards}"), upstream,
                                summary=str(run_dir / "shards" / part / "summary.json")))  # fmt: skip
                parts.append(jobs[-1].name)
            jobs.append(Job(name, "eval", base, tuple(parts), summary=str(run_dir / "summary.json")))
    return plan
