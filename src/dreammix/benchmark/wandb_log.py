"""``make benchmark`` on a W&B dashboard: one summary run per benchmark with Table 1 and Table 3
as W&B tables (ours beside the paper), a table linking every job's own W&B run (trainings,
evaluations) and, per subject, a contact sheet — rows = the ablation rows, columns = the cases —
so the four rows' images of the same case sit one above the other.

Everything comes from what the chain wrote (``results.json`` payload, the evaluation folders'
``records.jsonl`` and ``images/``, the job folders' ``wandb/`` runs), so this module only reads.
A no-op when the config has no W&B logger.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dreammix.benchmark.records import IMAGES_DIR, RECORDS_NAME, RecordLog
from dreammix.benchmark.report import METRIC_TITLES, ROW_LABELS, TASK_TITLES

log = logging.getLogger(__name__)

TASKS = tuple(TASK_TITLES)
METRICS = tuple(METRIC_TITLES)


def table3_rows(payload: Mapping[str, Any], experiments: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of Table 3: per ablation row and task, ours and the paper's scores."""
    paper = (payload.get("paper") or {}).get("table3") or {}
    columns = ["row", "method", "task", *[c for m in METRICS for c in (m, f"{m} (paper)")], "fid", "cases"]
    rows = []
    for name in experiments:
        entry = (payload.get("rows") or {}).get(name) or {}
        for task in TASKS:
            ours = ((entry.get("tasks") or {}).get(task) or {})
            mean = ours.get("mean") or {}
            published = ((paper.get(name) or {}).get(task) or {})
            cells = [v for m in METRICS for v in (mean.get(m), published.get(m))]
            rows.append([name, ROW_LABELS.get(name, name), task, *cells, (entry.get("fid") or {}).get(task), ours.get("n", 0)])
    return columns, rows


def table1_rows(payload: Mapping[str, Any], table1_experiment: str) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of Table 1: DreamMix (ours / paper) and the real-images row, per task."""
    paper = ((payload.get("paper") or {}).get("table1") or {})
    columns = ["method", "task", *METRICS, "fid"]
    rows = []
    entry = (payload.get("rows") or {}).get(table1_experiment) or {}
    real = payload.get("real_images") or {}
    for task in TASKS:
        mean = (((entry.get("tasks") or {}).get(task) or {}).get("mean") or {})
        rows.append(["DreamMix (ours)", task, *[mean.get(m) for m in METRICS], (entry.get("fid") or {}).get(task)])
        published = (paper.get("dreammix") or {}).get(task) or {}
        rows.append(["DreamMix (paper)", task, *[published.get(m) for m in METRICS], published.get("fid")])
        if real:
            rows.append(["Real images (ours)", task, *[(real.get("mean") or {}).get(m) for m in METRICS],
                         payload.get("real_images_fid")])
    return columns, rows


def job_runs(out_dir: Path) -> list[dict[str, str]]:
    """Every job's W&B run below the benchmark folder: its job folder, run id and run folder."""
    runs = []
    for run_folder in sorted(Path(out_dir).rglob("wandb/*run-*")):
        if not run_folder.is_dir() or run_folder.name.startswith("latest"):
            continue
        job = run_folder.parent.parent
        runs.append({"job": job.relative_to(out_dir).as_posix(), "run_id": run_folder.name.rsplit("-", 1)[-1],
                     "run_folder": str(run_folder)})
    return runs


def contact_sheet(eval_dirs: Mapping[str, Path], order: Sequence[str], thumb: int = 128, max_cases: int = 8) -> Image.Image | None:
    """One subject: rows = ablation rows (in ``order``), columns = the subject's cases (the first
    ``max_cases`` in manifest order of the first row), each cell the generated image's thumbnail;
    a label column and a header of case ids."""
    records = {name: RecordLog(Path(eval_dirs[name]) / RECORDS_NAME).load() for name in order if name in eval_dirs}
    if not records:
        return None
    first = next(iter(records.values()))
    cases = list(first)[:max_cases]
    if not cases:
        return None
    label_w, header_h = 90, 16
    sheet = Image.new("RGB", (label_w + thumb * len(cases), header_h + thumb * len(records)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, case_id in enumerate(cases):
        label = case_id.split("-", 1)[-1]  # without the subject: task, background, prompt
        draw.text((label_w + c * thumb + 2, 2), label[: thumb // 6], fill="black", font=font)
    for r, name in enumerate(records):
        draw.text((2, header_h + r * thumb + thumb // 2), ROW_LABELS.get(name, name), fill="black", font=font)
        for c, case_id in enumerate(cases):
            path = Path(eval_dirs[name]) / IMAGES_DIR / f"{case_id}.png"
            if not path.is_file():
                continue
            with Image.open(path) as image:
                cell = image.convert("RGB")
            cell.thumbnail((thumb, thumb))
            sheet.paste(cell, (label_w + c * thumb, header_h + r * thumb))
    return sheet


def log_benchmark(cfg: Any, out_dir: Path, payload: Mapping[str, Any], eval_dirs: Mapping[str, Mapping[str, Path]]) -> None:
    """The summary run of one benchmark (see the module docstring)."""
    from dreammix.tracking import wandb_enabled, wandb_init_kwargs

    if not wandb_enabled(cfg):
        return
    import wandb

    bench = cfg.bench
    experiments = [str(e) for e in bench.experiments]
    out_dir = Path(out_dir)
    kwargs = wandb_init_kwargs(cfg, f"benchmark-{bench.name}-{Path(str(cfg.run_dir)).name}", cfg.run_dir, "benchmark")
    jobs = job_runs(out_dir)
    kwargs["config"]["job_runs"] = jobs
    run = wandb.init(**kwargs)
    try:
        entity, project = cfg.logger.get("entity"), cfg.logger.get("project", "dreammix")
        link = (lambda rid: f"https://wandb.ai/{entity}/{project}/runs/{rid}") if entity else (lambda rid: "")
        values: dict[str, Any] = {}
        columns, rows = table3_rows(payload, experiments)
        values["benchmark/table3"] = wandb.Table(columns=columns, data=rows)
        columns, rows = table1_rows(payload, str(bench.get("table1_experiment", "dif_tas_adm")))
        values["benchmark/table1"] = wandb.Table(columns=columns, data=rows)
        values["benchmark/jobs"] = wandb.Table(
            columns=["job", "run_id", "run_folder", "url"],
            data=[[j["job"], j["run_id"], j["run_folder"], link(j["run_id"])] for j in jobs],
        )
        for subject in payload.get("subjects") or []:
            sheet = contact_sheet({e: eval_dirs[e][subject] for e in experiments if subject in eval_dirs.get(e, {})}, experiments)
            if sheet is not None:
                values[f"contact_sheet/{subject}"] = wandb.Image(
                    sheet, caption=f"{subject}: rows {', '.join(ROW_LABELS.get(e, e) for e in experiments)}; columns = cases")
        run.log(values)
        for name in experiments:
            for task in TASKS:
                mean = ((((payload.get("rows") or {}).get(name) or {}).get("tasks") or {}).get(task) or {}).get("mean") or {}
                for metric, value in mean.items():
                    run.summary[f"{name}/{task}/{metric}"] = value
    finally:
        run.finish()
    log.info("benchmark W&B summary run: %d job runs linked", len(jobs))
