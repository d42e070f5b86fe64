"""``evaluate(cfg)``: the COCO benchmark (paper §4) for one subject, called by ``src/eval.py``,
the benchmark chain (:mod:`dreammix.benchmark.run`) and tests.

Two phases, each resumable, so a crash or a pre-empted job costs at most the case in flight:

1. **Generate.** Every manifest case of the subject (and ``tasks``) without an image on disk is
   inpainted with DIF/TAS as configured and written atomically to ``images/<case_id>.png`` as soon
   as it is done. The model is loaded only when there is something to generate.
2. **Score from disk.** Cases without a record in ``records.jsonl`` are read back in batches and
   scored (CLIP-T with ``sks`` removed, CLIP-I and DINO against the subject's own images, each on
   the crop of the inpainted region — the table value — and on the full image); one JSON line per
   case is appended (:class:`~dreammix.benchmark.records.RecordLog`: a torn last line is dropped,
   duplicates are resolved by ``case_id``). Then FID of the generated set (per task) against
   ``metrics.fid.reference_dir``, ``summary.json`` / ``summary.md`` (per-subject and overall means
   per task) and a W&B run with a table of cases and thumbnails.

Scoring from disk rather than from memory is deliberate: the scores are then those of the files a
user can look at, and a resumed run scores generated-before-the-crash images exactly like the rest.

``settings.json`` fingerprints everything that determines the pixels (model, LoRA file hash, DIF,
TAS, steps, …) and the scores (metric models): resuming into a folder made with other settings is
an error instead of a silent mix of two experiments.
"""

from __future__ import annotations


import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dreammix.atomic import atomic_save_image, atomic_write_bytes
from dreammix.benchmark.manifest import TASKS, Case, read_manifest
from dreammix.benchmark.records import (  # noqa: F401 - the run's file names, re-exported for callers
    IMAGES_DIR,
    RECORDS_NAME,
    SCORE_KEYS,
    SETTINGS_NAME,
    SUMMARY_JSON,
    SUMMARY_MD,
    RecordLog,
    summarize,
)
from dreammix.benchmark.shards import SHARDS_DIR, Shard, adopt_shards
from dreammix.benchmark.staleness import drop_stale, write_sidecar
from dreammix.cli import config_value
from dreammix.errors import DreamMixError
from dreammix.eval_wandb import EvalTracker
from dreammix.inference_setup import load_base_pipeline  # noqa: F401 - also this module's API
from dreammix.paths import check_own_folder, ensure_writable_dir
from dreammix.validation import check_lora_file

log = logging.getLogger(__name__)

#: Written last by ``dreammix.train.train`` into the LoRA folder (not imported from there: that
#: module pulls in Lightning, seconds of import time an evaluation does not need).
RUN_INFO_NAME = "dreammix_run.json"
#: The three columns of the paper's tables, in their order.
TABLE_KEYS = ("clip_t", "clip_i", "dino")


@dataclass
class EvalResult:
    """What one evaluation run produced (also on disk in ``run_dir``)."""

    run_dir: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    generated: int = 0
    scored: int = 0
    fid: dict[str, float | None] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Cases, settings, references
# ------------------------------------------------------------------------------------------------


def select_cases(cases: Iterable[Case], subject: str, tasks: Sequence[str], limit: int | None = None) -> list[Case]:
    """The manifest's cases of ``subject`` and ``tasks`` (manifest order), at most ``limit`` per task."""
    for task in tasks:
        if task not in TASKS:
            raise DreamMixError(f"unknown task {task!r}; known: {list(TASKS)}", "tasks")
    chosen: list[Case] = []
    per_task: dict[str, int] = {}
    for case in cases:
        if case.subject != subject or case.task not in tasks:
            continue
        if limit is not None and per_task.get(case.task, 0) >= limit:
            continue
        per_task[case.task] = per_task.get(case.task, 0) + 1
        chosen.append(case)
    return chosen


def lora_info(lora_dir: str | Path | None) -> dict[str, Any] | None:
    """The LoRA's identity for the settings: weights hash + its ``dreammix_run.json`` (if any)."""
    if not lora_dir:
        return None
    from dreammix.models.lora import LORA_WEIGHTS_NAME

    folder = Path(str(lora_dir)).expanduser()
    weights = folder / LORA_WEIGHTS_NAME
    if not folder.is_dir():
        raise DreamMixError("LoRA folder not found", f"lora_dir={lora_dir}")
    if not weights.is_file():
        raise DreamMixError(f"LoRA folder has no {LORA_WEIGHTS_NAME}", f"lora_dir={lora_dir}")
    check_lora_file(weights, f"lora_dir={lora_dir}")  # unreadable or NaN weights: before any model loads
    with weights.open("rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    info: dict[str, Any] = {"dir": str(folder.resolve()), "sha256": sha256}
    run_file = folder / RUN_INFO_NAME
    if run_file.is_file():
        try:
            info["run"] = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DreamMixError(f"invalid JSON ({exc.msg})", str(run_file)) from exc
    return info


def check_lora_variant(cfg: DictConfig, info: dict[str, Any] | None) -> None:
    """Warn (or fail, ``check_lora=error``) when the LoRA was trained with other loss settings than
    the experiment's ``loss.*``: e.g. the ++ADM row evaluated with a DreamBooth LoRA."""
    mode = str(cfg.get("check_lora", "warn"))
    if mode not in ("warn", "error", "off"):
        raise DreamMixError(f"must be warn, error or off, got {mode!r}", "check_lora")
    if mode == "off" or info is None or "loss" not in cfg:
        return
    trained = (info.get("run") or {}).get("loss")
    if not trained:
        return
    expected = OmegaConf.to_container(cfg.loss, resolve=True)
    keys = ("tau_in", "tau_out", "beta")
    differ = [k for k in keys if k in trained and not math.isclose(float(trained[k]), float(expected[k]))]
    if not differ:
        return
    message = (
        f"the LoRA was trained with {', '.join(f'{k}={trained[k]}' for k in differ)} but experiment "
        f"'{cfg.get('row', '?')}' expects {', '.join(f'{k}={expected[k]}' for k in differ)}"
    )
    if mode == "error":
        raise DreamMixError(message, f"lora_dir={cfg.lora_dir}")
    log.warning("%s (check_lora=error makes this an error)", message)


def run_settings(cfg: DictConfig, lora: dict[str, Any] | None) -> dict[str, Any]:
    """Everything that determines the generated pixels (``generation``) and the scores (``scoring``)."""
    generation = {
        "model": {k: cfg.model.get(k) for k in ("name", "pretrained", "revision", "variant", "patch_file", "head_file")},
        "lora": None if lora is None else {"sha256": lora["sha256"], "scale": float(cfg.lora_scale)},
        "steps": int(cfg.steps),
        "guidance_scale": float(cfg.guidance_scale),
        "negative_prompt": cfg.get("negative_prompt"),
        "scheduler": str(cfg.scheduler),
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") is not None else None,
        "resolution": None if cfg.get("resolution") is None else int(cfg.resolution),
        "dif": OmegaConf.to_container(cfg.dif, resolve=True),
        "tas": OmegaConf.to_container(cfg.tas, resolve=True),
    }
    m = cfg.metrics
    scoring = {
        "clip": str(m.clip.model),
        "dino": {"model": str(m.dino.model), "resize": int(m.dino.resize), "crop": int(m.dino.crop)},
        "crop_scale": float(m.get("crop_scale", 1.0)),
        "identifier": str(m.identifier),
        "references": [str(p) for p in reference_images(cfg)],
    }
    return {"generation": generation, "scoring": scoring}


def check_settings(run_dir: Path, settings: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """Write ``settings.json`` on the first run; on a resume, refuse other settings."""
    path = run_dir / SETTINGS_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DreamMixError(f"invalid JSON ({exc.msg})", str(path)) from exc
        for part, hint in (
            ("generation", "its images were made with other settings; delete the folder or use a new run_dir"),
            ("scoring", f"its records were scored with other metrics; delete {RECORDS_NAME} to rescore, or use a new run_dir"),
        ):
            before, now = old.get(part, {}), json.loads(json.dumps(settings[part]))
            differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if differ:
                raise DreamMixError(f"cannot resume into this run_dir: {', '.join(differ)} differ ({hint})", str(path))
        return
    payload = {**json.loads(json.dumps(dict(extra))), **json.loads(json.dumps(dict(settings)))}
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def reference_images(cfg: DictConfig) -> list[Path]:
    """The subject's own images (CLIP-I / DINO references): ``references`` or ``subject.image_dir``."""
    from dreammix.data.images import list_images

    folder = Path(str(cfg.references if cfg.get("references") else cfg.subject.image_dir))
    if not cfg.get("references"):
        from dreammix.data.subjects import Subject, ensure_subject_images

        ensure_subject_images(Subject.from_config(cfg.subject), OmegaConf.select(cfg, "paths.dreambooth_dir"))
    if not folder.is_dir():
        raise DreamMixError("reference image folder not found", "references" if cfg.get("references") else "subject.image_dir")
    paths = list_images(folder)
    if not paths:
        raise DreamMixError("no reference images in folder", str(folder))
    return paths


def image_path(run_dir: Path, case: Case) -> Path:
    return run_dir / IMAGES_DIR / f"{case.case_id}.png"


# ------------------------------------------------------------------------------------------------
# Phase 1: generation
# ------------------------------------------------------------------------------------------------


def eliminate_words(cfg: DictConfig, cases: Sequence[Case]) -> dict[str, list[str]]:
    """TAS words per case (same selection as ``src/inpaint.py``), decided before any model loads."""
    from dreammix.inpaint import resolve_eliminate

    words: dict[str, list[str]] = {}
    cache: dict[str, list[str]] = {}
    for case in cases:
        if case.prompt not in cache:
            cache[case.prompt] = list(resolve_eliminate(cfg, case.prompt))
        words[case.case_id] = cache[case.prompt]
    return words


def prepare_pipeline(pipe, cfg: DictConfig):
    """Scheduler and subject LoRA of ``cfg`` on an already loaded base pipeline.

    A LoRA of an earlier run is deleted first (peft adapter on the one UNet), and the model's own
    scheduler restored before ``cfg.scheduler`` is applied, so the benchmark chain can reuse one
    loaded base model for every subject and row instead of loading SDXL 120 times.
    """
    from dreammix.inpaint import set_scheduler
    from dreammix.pipeline import LORA_ADAPTER

    pipe.set_progress_bar_config(disable=not cfg.get("progress", False))
    pipe.scheduler = getattr(pipe, "_dreammix_default_scheduler", pipe.scheduler)
    set_scheduler(pipe, cfg.scheduler)
    if LORA_ADAPTER in (getattr(pipe.unet, "peft_config", None) or {}):
        pipe.delete_adapters(LORA_ADAPTER)
    if cfg.get("lora_dir"):
        pipe.load_subject_lora(cfg.lora_dir, scale=config_value(cfg, "lora_scale", float))
    else:
        log.warning("lora_dir=null: evaluating the base model without a subject LoRA")
    return pipe


def load_eval_pipeline(cfg: DictConfig):
    """A freshly loaded base model with ``cfg``'s scheduler and subject LoRA."""
    return prepare_pipeline(load_base_pipeline(cfg), cfg)


def generate_cases(
    cfg: DictConfig,
    cases: Sequence[Case],
    run_dir: Path,
    eliminate: Mapping[str, Sequence[str]],
    pipe_factory: Callable[[DictConfig], Any] = load_eval_pipeline,
    on_generated: Callable[[int, int, str], None] | None = None,
) -> int:
    """Inpaint every case without an image on disk; each image is written atomically when done
    (then ``on_generated(done, pending, case_id)``).

    Returns how many were generated. The seed is the case's own (``torch.Generator("cpu")``), so an
    image does not depend on which other cases ran before it, in this process or an earlier one.
    """
    import torch

    from dreammix.data.images import load_image, load_mask

    pending = [c for c in cases if not image_path(run_dir, c).is_file()]
    if not pending:
        return 0
    log.info("generating %d of %d cases", len(pending), len(cases))
    from dreammix.inpaint import sampler_spec

    sampler = sampler_spec(cfg)
    pipe = pipe_factory(cfg)
    stages = list(cfg.tas.stages) if cfg.tas.enabled else []
    text = {  # what the text encoders see, per case
        case.case_id: dict(prompt=case.prompt, negative_prompt=cfg.get("negative_prompt"),
                           eliminate=list(eliminate.get(case.case_id, [])), tas_stages=stages,
                           guidance_scale=config_value(cfg, "guidance_scale", float))
        for case in pending
    }
    conditions: dict[tuple, Any] = {}
    if cfg.get("park_text_encoders", False):
        for case in pending:  # each distinct prompt setting encoded once
            key = _text_key(text[case.case_id])
            if key not in conditions:
                conditions[key] = pipe.encode_conditions(**text[case.case_id], tas_context=sampler.tas_context)
    from dreammix.pipeline import text_encoders_parked

    with text_encoders_parked(pipe, enabled=bool(conditions)):
        for number, case in enumerate(pending, start=1):
            image = load_image(case.image_path)
            mask = load_mask(case.mask_path, size=image.size)
            result = pipe(
                image=image,
                mask_image=mask,
                **text[case.case_id],
                conditions=conditions.get(_text_key(text[case.case_id])),
                num_inference_steps=config_value(cfg, "steps", int),
                lambda_=config_value(cfg, "dif.lambda_", float),
                generator=torch.Generator("cpu").manual_seed(int(case.seed)),
                resolution=cfg.get("resolution"),
                crop_scale=config_value(cfg, "dif.crop_scale", float),
                min_crop_frac=config_value(cfg, "dif.min_crop_frac", float),
                blend=bool(cfg.dif.blend),
                feather_radius=cfg.dif.get("feather_radius"),
                sampler=sampler,
            )
            atomic_save_image(result.images[0], image_path(run_dir, case))
            write_sidecar(image_path(run_dir, case), case)  # what it was made from (resume staleness)
            log.info("[%d/%d] %s", number, len(pending), case.case_id)
            if on_generated is not None:
                on_generated(number, len(pending), case.case_id)
    return len(pending)


def _text_key(text: Mapping[str, Any]) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(text.items()))



# ------------------------------------------------------------------------------------------------
# Phase 2: scoring
# ------------------------------------------------------------------------------------------------


def _case_fields(case: Case) -> dict[str, Any]:
    return {"prompt": case.prompt, "seed": int(case.seed), "box": list(case.box)}


def check_records_match(records: Mapping[str, Mapping[str, Any]], cases: Sequence[Case], where: Path) -> None:
    """A record of a case whose prompt/seed/box changed means the manifest was rebuilt differently."""
    for case in cases:
        record = records.get(case.case_id)
        if record is None:
            continue
        if {k: record.get(k) for k in ("prompt", "seed", "box")} != _case_fields(case):
            raise DreamMixError(
                f"case {case.case_id} differs from its record (the manifest changed since this run); use a new run_dir",
                str(where),
            )


def score_cases(
    suite: Any,
    cases: Sequence[Case],
    run_dir: Path,
    references: Sequence[Path],
    records: RecordLog,
    eliminate: Mapping[str, Sequence[str]],
    batch_size: int,
    extra: Mapping[str, Any] | None = None,
    on_scored: Callable[[int, int], None] | None = None,
) -> int:
    """Score the cases without a record, from their images on disk, ``batch_size`` at a time
    (after each batch ``on_scored(done, pending)``)."""
    from dreammix.data.images import load_image

    pending = records.pending(cases)
    missing = [c.case_id for c in pending if not image_path(run_dir, c).is_file()]
    if missing:
        raise DreamMixError(f"{len(missing)} generated image(s) missing, e.g. {missing[0]}", str(run_dir / IMAGES_DIR))
    for start in range(0, len(pending), max(1, int(batch_size))):
        batch = pending[start : start + max(1, int(batch_size))]
        images = [load_image(image_path(run_dir, c)) for c in batch]
        scores = suite.score(images, [c.box for c in batch], [c.prompt for c in batch], references)
        for case, score in zip(batch, scores):
            if not all(math.isfinite(float(score[k])) for k in SCORE_KEYS):  # never a NaN into the means
                raise DreamMixError(f"non-finite score for case {case.case_id}: {dict(score)}", str(image_path(run_dir, case)))
            records.append(
                {
                    "case_id": case.case_id,
                    "subject": case.subject,
                    "class_noun": case.class_noun,
                    "task": case.task,
                    "prompt_index": case.prompt_index,
                    "image": f"{IMAGES_DIR}/{case.case_id}.png",
                    "background": str(case.image_path),
                    "eliminate": list(eliminate.get(case.case_id, [])),
                    **_case_fields(case),
                    **{k: float(score[k]) for k in SCORE_KEYS},
                    **dict(extra or {}),
                }
            )
        log.info("scored %d of %d pending cases", min(start + len(batch), len(pending)), len(pending))
        if on_scored is not None:
            on_scored(min(start + len(batch), len(pending)), len(pending))
    return len(pending)


def fmt(value: Any, digits: int = 3) -> str:
    """Table cell: a number with ``digits`` decimals, ``n/a`` for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def summary_markdown(summary: Mapping[str, Any], title: str) -> str:
    """Markdown: overall means per task (crop and full image), FID, then per-subject means."""
    fid = summary.get("fid", {}) or {}
    lines = [f"# {title}", "", "Crop = the inpainted region (table value); full = the whole image. Raw cosine.", ""]
    lines += ["| task | n | CLIP-T | CLIP-I | DINO | CLIP-T full | CLIP-I full | DINO full | FID |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    tasks = summary.get("tasks", {})
    for task, entry in tasks.items():
        m = entry["mean"]
        cells = [fmt(m.get(k)) for k in SCORE_KEYS]
        lines.append(f"| {task} | {entry['n']} | " + " | ".join(cells) + f" | {fmt(fid.get(task), 2)} |")
    lines += ["", "## Per subject (crop)", "", "| task | subject | n | CLIP-T | CLIP-I | DINO |", "|---|---|---:|---:|---:|---:|"]
    for task, entry in tasks.items():
        if task == "all":
            continue
        for subject, sub in entry["per_subject"].items():
            lines.append(f"| {task} | {subject} | {sub['n']} | " + " | ".join(fmt(sub["mean"].get(k)) for k in TABLE_KEYS) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# FID, real images
# ------------------------------------------------------------------------------------------------


def make_fid_extractor(name: str, metrics_cfg: Any):
    """``inception`` (torch-fidelity, ``metrics.fid.*``) or ``color_stats`` (CPU smoke runs)."""
    from dreammix.metrics.fid import ColorStatsExtractor, InceptionExtractor

    if name == "color_stats":
        return ColorStatsExtractor()
    if name == "inception":
        return InceptionExtractor.from_config(metrics_cfg)
    raise DreamMixError(f"must be inception or color_stats, got {name!r}", "fid_extractor")


def fid_of(paths: Sequence[Path], metrics_cfg: Any, extractor: Any) -> float | None:
    """FID of ``paths`` against ``metrics.fid.reference_dir``; None (with a warning) below 2 images."""
    from dreammix.metrics.fid import fid_from_config

    if len(paths) < 2:
        log.warning("FID needs at least 2 images, got %d: reported as n/a", len(paths))
        return None
    return float(fid_from_config(metrics_cfg, list(paths), extractor=extractor))


def fid_by_task(records: Sequence[Mapping[str, Any]], base_dirs: Mapping[str, Path], metrics_cfg: Any, extractor: Any) -> dict[str, float | None]:
    """FID of the generated images per task and over all; ``base_dirs`` maps case_id → run dir."""
    by_task: dict[str, list[Path]] = {}
    for record in records:
        path = base_dirs[record["case_id"]] / record["image"]
        by_task.setdefault(str(record["task"]), []).append(path)
        by_task.setdefault("all", []).append(path)
    return {task: fid_of(paths, metrics_cfg, extractor) for task, paths in by_task.items()}


def score_real_images(suite: Any, paths: Sequence[Path], class_noun: str) -> dict[str, float]:
    """The paper's "Real images" upper bound for one subject (Table 1): each training image against
    the subject's *other* training images (CLIP-I, DINO; self-pairs excluded, they are always 1)
    and against the text ``a photo of <class>`` (CLIP-T), whole images, averaged over images."""
    import torch

    if len(paths) < 2:
        raise DreamMixError(f"need at least 2 images of the subject, got {len(paths)}", "real images")
    out: dict[str, float] = {}
    clip_features = suite.clip.reference_features(paths)
    for key, features in (("clip_i", clip_features), ("dino", suite.dino.reference_features(paths))):
        f = torch.nn.functional.normalize(features.float(), dim=-1)
        sim = f @ f.T
        n = sim.shape[0]
        off_diagonal = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
        out[key] = float(off_diagonal)
    out["clip_t"] = float(suite.clip.clip_t(clip_features, [f"a photo of {class_noun}"] * len(paths), suite.identifier).mean())
    out["n"] = len(paths)
    return out


# ------------------------------------------------------------------------------------------------
# W&B
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Entry
# ------------------------------------------------------------------------------------------------


def evaluate(cfg: DictConfig, *, pipe_factory: Callable[[DictConfig], Any] | None = None, metric_suite: Any = None) -> EvalResult:
    """Generate and score the benchmark cases of ``cfg.subject``; see the module docstring.

    ``pipe_factory`` / ``metric_suite`` replace the model loading (tests count calls through them).
    """
    if cfg.get("multi_subject"):  # `src/eval.py -cn eval_multi`: two subjects per photo
        from dreammix.multi_eval import evaluate_multi

        return evaluate_multi(cfg)
    # 1. Everything checkable before loading a model
    run_dir = Path(str(cfg.run_dir))
    row = str(cfg.get("row", "custom"))
    subject = str(cfg.subject.name)
    tasks = [str(t) for t in cfg.tasks]
    limit = None if cfg.get("limit") is None else config_value(cfg, "limit", int)
    steps = config_value(cfg, "steps", int)
    lambda_ = config_value(cfg, "dif.lambda_", float)
    if steps < 1:
        raise DreamMixError(f"must be >= 1, got {steps}", "steps")
    if not 0.0 <= lambda_ <= 1.0:
        raise DreamMixError(f"must be in [0, 1], got {lambda_}", "dif.lambda_")
    shard = Shard.parse(cfg.get("shard"))
    from dreammix.inpaint import sampler_spec

    sampler_spec(cfg)  # sampler knobs and the base that must honour them
    cases = select_cases(read_manifest(str(cfg.manifest)), subject, tasks, limit)
    if not cases:
        raise DreamMixError(f"the manifest has no case of subject '{subject}' for tasks {tasks}", str(cfg.manifest))
    if shard is not None:  # a disjoint slice in its own folder; the unsharded run merges (shards.py)
        cases, run_dir = shard.select(cases), shard.run_dir(run_dir)
    lora = lora_info(cfg.get("lora_dir"))
    check_lora_variant(cfg, lora)
    references = reference_images(cfg)
    settings = run_settings(cfg, lora)
    check_own_folder(run_dir, (SETTINGS_NAME, RECORDS_NAME, SHARDS_DIR), "an evaluation run", "run_dir")
    ensure_writable_dir(run_dir, "run_dir")
    check_settings(
        run_dir, settings,
        {"row": row, "subject": subject, "class_noun": str(cfg.subject.class_noun),
         "manifest": str(Path(str(cfg.manifest)).resolve()), "lora_training": None if lora is None else lora.get("run"),
         "lora_dir": None if lora is None else lora["dir"]},
    )  # fmt: skip
    records = RecordLog(run_dir / RECORDS_NAME)
    if shard is None:  # the shards' finished cases (checked for staleness below like our own)
        adopt_shards(run_dir, cases, settings, records, lambda case: image_path(Path(), case))
    drop_stale(cases, lambda case: image_path(run_dir, case), run_dir / RECORDS_NAME)  # changed cases: redo
    check_records_match(records.load(), cases, records.path)
    eliminate = eliminate_words(cfg, cases)
    tracker = EvalTracker.start(cfg, run_dir)  # W&B: open before generation, progress as it goes

    # 2. Generate what is missing, 3. score what is unscored (both resume)
    started = time.perf_counter()
    generated = generate_cases(cfg, cases, run_dir, eliminate, pipe_factory or load_eval_pipeline, tracker.generated)
    log.info("generation: %d case(s) in %.1f s", generated, time.perf_counter() - started)
    started = time.perf_counter()
    scored = 0
    if records.pending(cases):
        from dreammix.metrics import MetricSuite

        suite = metric_suite or MetricSuite.from_config(cfg.metrics)
        batch = config_value(cfg, "score_batch_size", int)
        wanted = {c.case_id for c in cases}
        scored = score_cases(suite, cases, run_dir, references, records, eliminate, batch, {"row": row},
                             lambda done, total: tracker.scored(done, total, summarize(
                                 [r for k, r in records.load().items() if k in wanted])))
    log.info("scoring: %d case(s) in %.1f s", scored, time.perf_counter() - started)
    stored = records.load()
    mine = [stored[c.case_id] for c in cases]  # exactly one record per case, in manifest order

    # 4. FID, summaries, W&B
    fid: dict[str, float | None] = {}
    if bool(cfg.get("fid", True)) and shard is None:  # FID of a slice is not the set's: once, at the merge
        extractor = make_fid_extractor(str(cfg.get("fid_extractor", "inception")), cfg.metrics)
        fid = fid_by_task(mine, {r["case_id"]: run_dir for r in mine}, cfg.metrics, extractor)
    summary = {
        "row": row,
        "subject": subject,
        "cases": len(mine),
        "shard": None if shard is None else f"{shard.index}/{shard.count}",
        "tasks": summarize(mine),
        "fid": fid,
        "fid_extractor": str(cfg.get("fid_extractor", "inception")) if fid else None,
        "dif": OmegaConf.to_container(cfg.dif, resolve=True),
        "tas": OmegaConf.to_container(cfg.tas, resolve=True),
        "lora_training": None if lora is None else (lora.get("run") or {}).get("loss"),
        "base_model": {"name": str(cfg.model.name), "pretrained": str(cfg.model.pretrained)},
    }
    atomic_write_bytes(run_dir / SUMMARY_JSON, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    title = f"Evaluation: {row} / {subject} on `{cfg.model.name}` (λ={lambda_:g}, TAS {'on' if cfg.tas.enabled else 'off'})"
    atomic_write_bytes(run_dir / SUMMARY_MD, summary_markdown(summary, title).encode("utf-8"))
    tracker.finish(mine, summary, SCORE_KEYS)
    log.info("evaluation of %s: %d generated, %d scored, %d cases -> %s", subject, generated, scored, len(mine), run_dir)
    return EvalResult(run_dir=run_dir, records=mine, summary=summary, generated=generated, scored=scored, fid=fid)
