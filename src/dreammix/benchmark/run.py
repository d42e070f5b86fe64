"""``run_benchmark(cfg)``: the whole reproduction behind ``make benchmark`` (``src/benchmark.py``).

1. **Benchmark.** ``<bench.benchmark_dir>/manifest.jsonl`` is built (``build_benchmark``) if missing.
2. **LoRAs.** Each row (``bench.experiments``) names a training variant through
   ``conf/experiment/<row>.yaml`` (``loss.*``); rows with the same variant share one LoRA per subject
   (``<out>/loras/<variant>/<subject>``). A LoRA is trained only if its ``lora/dreammix_run.json``
   (written last by ``train``) is missing; an interrupted training resumes from its
   ``checkpoints/last.ckpt``. Variants with regular data (``loss.beta > 0``) first get their ADM
   set (``run_adm``, itself resumable) when it is missing or short.
3. **Evaluation.** ``evaluate`` for every row × subject in ``<out>/eval/<row>/<subject>`` — fixed
   folders, so a rerun resumes each run where it stopped.
4. **Tables.** Records of a row are pooled over subjects (:func:`~dreammix.benchmark.report.merge_runs`);
   FID over the row's whole generated set per task; the "Real images" row from the training images;
   ``table1.md``, ``table3.md`` and ``results.json`` in ``<out>``.

Sub-configs are composed from the same ``conf/`` tree as the entry points (train.yaml, adm.yaml,
eval.yaml, build_benchmark.yaml) with the preset's override lists, so a chain step is exactly the
command a user would type (each composed config is logged as that command line).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dreammix.atomic import atomic_write_bytes
from dreammix.benchmark.manifest import MANIFEST_NAME, read_manifest
from dreammix.benchmark.wandb_log import log_benchmark
from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
_SAFE = re.compile(r"^[A-Za-z0-9_./:@+,\-\[\]]*$")


@dataclass
class BenchmarkRun:
    out_dir: Path
    table1: Path
    table3: Path
    results: Path
    trained: list[str] = field(default_factory=list)
    adm_built: list[str] = field(default_factory=list)
    eval_dirs: dict[str, dict[str, Path]] = field(default_factory=dict)


class ModelCache:
    """One base pipeline and one metric suite for the whole chain (reloaded only when the model /
    metrics config changes): every evaluation swaps the LoRA instead of reloading SDXL, and the
    suite keeps its reference-image features between rows."""

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


def kv(key: str, value: Any) -> str:
    """A Hydra override ``key=value``, quoting values with characters the override grammar reads."""
    text = str(value)
    if _SAFE.match(text):
        return f"{key}={text}"
    return f"{key}='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_config(name: str, overrides: list[str], conf_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with overrides — inside a running Hydra app (its config tree)
    or standalone (``conf_dir``, default the repository's ``conf/``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    log.info("compose %s %s", name, " ".join(overrides))
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=overrides)
    with initialize_config_dir(config_dir=str(conf_dir or CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def loss_variant(loss: Any) -> str:
    """Folder name of a training variant: ``tau1-1_beta0`` (DreamBooth), ``tau1.5-0.7_beta0.4`` …"""
    name = f"tau{float(loss.tau_in):g}-{float(loss.tau_out):g}_beta{float(loss.beta):g}"
    if float(loss.beta) > 0 and str(loss.get("regular_mode", "paired")) != "paired":
        name += f"_{loss.regular_mode}{float(loss.regular_prob):g}"
    if str(loss.get("weighting", "squared_error")) != "squared_error":
        name += f"_{loss.weighting}"
    return name


def _lists(bench: DictConfig) -> dict[str, list[str]]:
    keys = ("paths_overrides", "build_overrides", "overrides", "train_overrides", "adm_overrides", "eval_overrides")
    return {key: [str(v) for v in (bench.get(key) or [])] for key in keys}


def ensure_manifest(bench: DictConfig, ov: dict[str, list[str]], conf_dir: Path | None) -> Path:
    """The manifest, built first if missing; every requested subject must be in it."""
    from dreammix.benchmark.builder import build_benchmark

    bench_dir = Path(str(bench.benchmark_dir))
    manifest = bench_dir / MANIFEST_NAME
    if not manifest.is_file():
        subjects = [kv("benchmark.subjects", "[" + ",".join(map(str, bench.subjects)) + "]")] if bench.get("subjects") else []
        cfg = compose_config(
            "build_benchmark", [*ov["paths_overrides"], kv("benchmark.out_dir", bench_dir), *subjects, *ov["build_overrides"]], conf_dir
        )
        build_benchmark(cfg)
    return manifest


def ensure_regular_set(
    subject: str, regular_dir: Path, out: Path, ov: dict[str, list[str]], conf_dir: Path | None, experiment: str | None = None
) -> bool:
    """Run ADM for ``subject`` unless ``regular_dir`` already holds ``adm.num_prompts`` items.
    ``experiment`` picks the kind of set (``dreambooth_prior``: class-prior images, Eq. 2)."""
    from dreammix.adm import read_manifest as read_regular, run_adm

    cfg = compose_config(
        "adm",
        [*ov["paths_overrides"], *ov["overrides"], *ov["adm_overrides"], kv("subject", subject),
         kv("adm.out_dir", regular_dir), kv("run_dir", out / "adm_runs" / regular_dir.name),
         *([kv("experiment", experiment)] if experiment else [])],
        conf_dir,
    )  # fmt: skip
    have = len(read_regular(regular_dir))  # 0 without a manifest
    if have >= int(cfg.adm.num_prompts):
        return False
    log.info("ADM regular set of %s: %d of %d items, building", subject, have, int(cfg.adm.num_prompts))
    run_adm(cfg)
    return True


def ensure_lora(
    experiment: str, subject: str, out: Path, ov: dict[str, list[str]], bench: DictConfig, conf_dir: Path | None, result: BenchmarkRun
) -> Path:
    """The LoRA folder of ``subject`` for ``experiment``'s training variant, trained if missing."""
    from dreammix.models.lora import LORA_WEIGHTS_NAME
    from dreammix.train import RUN_INFO_NAME, train

    base = [*ov["paths_overrides"], *ov["overrides"], *ov["train_overrides"], kv("experiment", experiment), kv("subject", subject)]
    probe = compose_config("train", [*base, kv("run_dir", out / "loras" / "_probe")], conf_dir)
    run_dir = out / "loras" / loss_variant(probe.loss) / subject
    lora = run_dir / "lora"
    if (lora / RUN_INFO_NAME).is_file() and (lora / LORA_WEIGHTS_NAME).is_file():
        return lora
    if float(probe.loss.beta) > 0 and bool(bench.get("adm", True)):
        if ensure_regular_set(subject, Path(str(probe.data.regular_dir)), out, ov, conf_dir, experiment):
            result.adm_built.append(subject)
    resume = run_dir / "checkpoints" / "last.ckpt"
    extra = [kv("ckpt_path", resume)] if resume.is_file() else []
    log.info("training the %s LoRA of %s%s", loss_variant(probe.loss), subject, " (resuming)" if extra else "")
    train(compose_config("train", [*base, kv("run_dir", run_dir), *extra], conf_dir))
    result.trained.append(f"{loss_variant(probe.loss)}/{subject}")
    return lora


def run_benchmark(cfg: DictConfig, conf_dir: str | Path | None = None) -> BenchmarkRun:
    """The chain of the module docstring for ``cfg.bench``; returns where everything went."""
    threads = cfg.bench.get("torch_threads")
    if threads:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return _run(cfg, conf_dir)
        finally:
            torch.set_num_threads(previous)
    return _run(cfg, conf_dir)


def evaluate_rows(
    experiments: list[str], subjects: list[str], loras: dict[tuple[str, str], Path], common: list[str], out: Path,
    conf: Path | None, models: ModelCache, row_overrides: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, Path]]:
    """``evaluate`` every row × subject into ``<out>/eval/<row>/<subject>``, without FID (the tables
    compute it over a row's whole generated set); returns the run folders by row and subject.
    ``row_overrides[row]``: extra overrides of that row (the loss its preset trained it with)."""
    from dreammix.evaluate import evaluate

    eval_dirs: dict[str, dict[str, Path]] = {}
    for experiment in experiments:
        eval_dirs[experiment] = {}
        for subject in subjects:
            run_dir = out / "eval" / experiment / subject
            ecfg = compose_config(
                "eval",
                [*common, kv("experiment", experiment), *(row_overrides or {}).get(experiment, []), kv("subject", subject),
                 kv("lora_dir", loras[(experiment, subject)]), kv("run_dir", run_dir), "fid=false"],
                conf,
            )  # fmt: skip
            evaluate(ecfg, pipe_factory=models.pipeline, metric_suite=models.suite(ecfg))
            eval_dirs[experiment][subject] = run_dir
    return eval_dirs


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


def _run(cfg: DictConfig, conf_dir: str | Path | None) -> BenchmarkRun:
    from dreammix.benchmark.presets import BenchPreset, describe_setup
    from dreammix.benchmark.report import merge_runs, table1_markdown, table3_markdown
    from dreammix.evaluate import fid_of, make_fid_extractor

    bench = cfg.bench
    conf = Path(str(conf_dir)) if conf_dir else None
    ov = _lists(bench)
    experiments = [str(e) for e in bench.experiments]
    if not experiments:
        raise DreamMixError("no experiments to run", "bench.experiments")
    for name in experiments:
        if not ((conf or CONF_DIR) / "experiment" / f"{name}.yaml").is_file():
            raise DreamMixError(f"unknown experiment {name!r} (no conf/experiment/{name}.yaml)", "bench.experiments")
    # The preset: each row's training experiment, extra overrides; checked before anything runs.
    preset = BenchPreset.from_config(cfg.get("preset"))
    preset.check(experiments, conf or CONF_DIR)
    ov["train_overrides"] += list(preset.train_overrides)
    ov["eval_overrides"] += list(preset.eval_overrides)
    train_of = {e: preset.train_experiment(e) for e in experiments}
    probe_overrides = [*ov["paths_overrides"], *ov["overrides"], *ov["train_overrides"], "run_dir=/nonexistent"]
    probes = {e: compose_config("train", [*probe_overrides, kv("experiment", train_of[e])], conf) for e in experiments}
    preset.check_base(probes[experiments[0]].model)
    # Evaluation checks each LoRA against the loss it was trained with (the preset's, not the row's).
    row_loss = {e: [kv(f"loss.{k}", probes[e].loss[k]) for k in ("tau_in", "tau_out", "beta")] for e in experiments}
    out = Path(str(bench.out_dir))
    out.mkdir(parents=True, exist_ok=True)

    # 1. benchmark
    manifest = ensure_manifest(bench, ov, conf)
    cases = read_manifest(manifest)
    available = sorted({c.subject for c in cases})
    subjects = [str(s) for s in bench.subjects] if bench.get("subjects") else available
    missing = [s for s in subjects if s not in available]
    if missing:
        raise DreamMixError(
            f"subjects {missing} are not in the manifest (delete it to rebuild, or use another bench.benchmark_dir)", str(manifest)
        )
    result = BenchmarkRun(out_dir=out, table1=out / "table1.md", table3=out / "table3.md", results=out / "results.json")

    # 2. LoRAs (all first: the expensive, GPU-bound part; shared between rows of the same variant)
    loras = {(e, s): ensure_lora(train_of[e], s, out, ov, bench, conf, result) for e in experiments for s in subjects}

    # 3. evaluation (per subject; FID is computed over the whole row below, not per subject)
    common = [*ov["paths_overrides"], *ov["overrides"], *ov["eval_overrides"], kv("benchmark.out_dir", manifest.parent)]
    models = ModelCache()
    result.eval_dirs = evaluate_rows(experiments, subjects, loras, common, out, conf, models, row_loss)

    # 4. tables
    report_cfg = compose_config("eval", [*common, "lora_dir=null", kv("run_dir", out / "report")], conf)
    rows = {e: merge_runs(result.eval_dirs[e].values()) for e in experiments}
    fid: dict[str, dict[str, float | None]] = {}
    real_fid = None
    extractor = None
    if bool(bench.get("fid", True)):
        extractor = make_fid_extractor(str(report_cfg.fid_extractor), report_cfg.metrics)
        fid = row_fids(rows, report_cfg.metrics, extractor)
        backgrounds = sorted({c.image_path for c in cases if c.subject in subjects})
        real_fid = fid_of(backgrounds, report_cfg.metrics, extractor)
    real: dict[str, Any] | None = None
    if bool(bench.get("real_images", True)):
        real = real_images(models.suite(report_cfg), subjects, common, out, conf)

    paper = OmegaConf.to_container(cfg.paper, resolve=True) if "paper" in cfg else {}
    note = (
        f"Benchmark `{bench.name}`: {len(subjects)} subjects ({', '.join(subjects)}), manifest `{manifest}`. "
        + describe_setup(report_cfg.model, preset)
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
        "preset": preset.name,
        "base_model": {"name": str(report_cfg.model.name), "pretrained": str(report_cfg.model.pretrained)},
        "train_experiments": train_of,
        "subjects": subjects,
        "manifest": str(manifest),
        "rows": {e: {"tasks": rows[e]["tasks"], "fid": fid.get(e), "runs": {s: str(p) for s, p in result.eval_dirs[e].items()}} for e in experiments},
        "real_images": real,
        "real_images_fid": real_fid,
        "fid_extractor": str(report_cfg.fid_extractor) if extractor is not None else None,
        "paper": paper,
    }
    atomic_write_bytes(result.results, (json.dumps(payload, indent=2, default=str) + "\n").encode("utf-8"))
    log_benchmark(cfg, out, payload, result.eval_dirs)  # W&B summary run: tables, job runs, contact sheets
    log.info("benchmark %s: %s, %s", bench.name, result.table1, result.table3)
    print(f"wrote {result.table1} and {result.table3}")
    return result
