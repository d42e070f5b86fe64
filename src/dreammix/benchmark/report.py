"""Result tables from evaluation runs: Table 1 / Table 3 of the paper beside ours, sweep tables.

Every evaluation run (``src/eval.py``, one subject × one setting) leaves ``settings.json``,
``records.jsonl`` and ``summary.json`` in its folder. This module only reads those files, so
tables can be rebuilt at any time without generating or scoring anything again:

- :func:`merge_runs` pools the per-case records of several runs (the subjects of one ablation
  row) into per-task means over cases and per-subject means (:func:`dreammix.evaluate.summarize`);
- :func:`table3_markdown` / :func:`table1_markdown` put the paper's numbers beside ours
  (FID is not averaged over subjects: the chain computes it over the row's whole generated set);
- :func:`collect_results` / :class:`CollectResultsCallback` write ``results.md`` / ``results.json``
  for a Hydra multirun folder (one line per job, with the swept settings as columns).

Module-level imports are standard library only: Hydra imports the callback at every eval start.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASK_TITLES = {"identity": "Identity preservation", "attribute": "Attribute editing"}
METRIC_TITLES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO"}
#: Row labels of the paper's Table 3, by experiment name.
ROW_LABELS = {"baseline": "Baseline", "dif": "+DIF", "dif_tas": "++TAS", "dif_tas_adm": "++ADM",
              "dreambooth_prior": "Baseline (DreamBooth + class prior, Eq. 2)"}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _read_json(path: Path) -> Any:
    from dreammix.errors import DreamMixError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DreamMixError(f"cannot read {path.name} ({exc.__class__.__name__})", str(path)) from exc


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``settings``, ``summary`` and the deduplicated ``records`` of one evaluation run."""
    from dreammix.benchmark.records import RECORDS_NAME, SETTINGS_NAME, SUMMARY_JSON, RecordLog

    run_dir = Path(run_dir)
    return {
        "run_dir": run_dir,
        "settings": _read_json(run_dir / SETTINGS_NAME) if (run_dir / SETTINGS_NAME).is_file() else {},
        "summary": _read_json(run_dir / SUMMARY_JSON) if (run_dir / SUMMARY_JSON).is_file() else {},
        "records": list(RecordLog(run_dir / RECORDS_NAME).load().values()),
    }


def merge_runs(run_dirs: Iterable[str | Path]) -> dict[str, Any]:
    """Pool the records of several runs: ``tasks`` (as :func:`~dreammix.benchmark.records.summarize`),
    ``records`` and ``image_paths`` (absolute path of each case's image, by case id)."""
    from dreammix.benchmark.records import summarize

    records: dict[str, dict[str, Any]] = {}
    images: dict[str, Path] = {}
    for run_dir in run_dirs:
        run = load_run(run_dir)
        for record in run["records"]:
            records[record["case_id"]] = record
            images[record["case_id"]] = Path(run_dir) / record["image"]
    rows = list(records.values())
    return {"tasks": summarize(rows), "records": rows, "image_paths": images}


# ------------------------------------------------------------------------------------------------
# Paper tables
# ------------------------------------------------------------------------------------------------


def _cell(entry: Mapping[str, Any], value: Any, digits: int = 3) -> str:
    """Our value, or ``missing`` when the entry lacks cases (``incomplete``: a job failed)."""
    return "missing" if entry.get("incomplete") else _fmt(value, digits)


def _cases(entry: Mapping[str, Any]) -> str:
    return str(entry.get("incomplete") or entry.get("n", 0))


def _paper_value(paper: Mapping[str, Any] | None, task: str, key: str) -> Any:
    if not paper:
        return None
    entry = (paper.get(task) or {}) if isinstance(paper, Mapping) else {}
    return entry.get(key) if isinstance(entry, Mapping) else None


def table3_markdown(
    rows: Mapping[str, Mapping[str, Any]],
    paper: Mapping[str, Mapping[str, Any]],
    order: Sequence[str],
    labels: Mapping[str, str] | None = None,
    note: str = "",
) -> str:
    """The ablation table: for each task, one line per row with ours and the paper's values.

    ``rows[name]`` is a :func:`merge_runs` result (or None when the row was not run);
    ``paper[name][task][metric]`` the published value. A task entry with ``incomplete`` ("3 of 8":
    cases missing) prints ``missing`` instead of means over fewer cases.
    """
    labels = {**ROW_LABELS, **dict(labels or {})}
    lines = ["# Table 3 — ablation (ours vs. paper)", ""]
    if note:
        lines += [note, ""]
    lines += ["Crop scores (inpainted region), raw cosine; mean over cases. Paper: DreamMix Table 3.", ""]
    for task in ("identity", "attribute"):
        lines += [f"## {TASK_TITLES[task]}", ""]
        header = "| Method | " + " | ".join(f"{t} | {t} (paper)" for t in METRIC_TITLES.values()) + " | cases |"
        lines += [header, "|---|" + "---:|" * (2 * len(METRIC_TITLES) + 1)]
        for name in order:
            ours = ((rows.get(name) or {}).get("tasks") or {}).get(task) or {}
            mean = ours.get("mean") or {}
            cells = []
            for key in METRIC_TITLES:
                cells += [_cell(ours, mean.get(key)), _fmt(_paper_value(paper.get(name), task, key))]
            lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + f" | {_cases(ours)} |")
        lines.append("")
    return "\n".join(lines)


def table1_markdown(
    ours: Mapping[str, Any] | None,
    real: Mapping[str, Any] | None,
    paper: Mapping[str, Any],
    *,
    fid: Mapping[str, Any] | None = None,
    real_fid: float | None = None,
    fid_note: str = "",
    note: str = "",
) -> str:
    """DreamMix (ours and published) with the "Real images" upper bound computed by our metrics.

    ``ours`` is the DreamMix row's :func:`merge_runs` result, ``real`` the :func:`real_images_row`
    result, ``fid`` the row's FID per task, ``paper["dreammix"][task][metric]`` and optionally
    ``paper["real_images"][task][metric]`` the published values.
    """
    lines = ["# Table 1 — DreamMix vs. real images (ours vs. paper)", ""]
    if note:
        lines += [note, ""]
    lines += [
        "CLIP-T / CLIP-I / DINO: crop scores of the inpainted region, raw cosine, mean over cases. "
        "Real images: each DreamBooth training image against the subject's other training images "
        "(CLIP-I, DINO) and against \"a photo of <class>\" (CLIP-T); FID of the benchmark's background images.",
        "",
    ]
    if fid_note:
        lines += [fid_note, ""]
    for task in ("identity", "attribute"):
        lines += [f"## {TASK_TITLES[task]}", "", "| Method | CLIP-T | CLIP-I | DINO | FID | cases |", "|---|---:|---:|---:|---:|---:|"]
        rmean = (real or {}).get("mean") or {}
        lines.append(
            "| Real images (ours) | " + " | ".join(_fmt(rmean.get(k)) for k in METRIC_TITLES)
            + f" | {_fmt(real_fid, 2)} | {(real or {}).get('n', 0)} images |"
        )  # fmt: skip
        published_real = paper.get("real_images")
        if published_real:
            lines.append(
                "| Real images (paper) | " + " | ".join(_fmt(_paper_value(published_real, task, k)) for k in METRIC_TITLES)
                + f" | {_fmt(_paper_value(published_real, task, 'fid'), 2)} | |"
            )  # fmt: skip
        entry = ((ours or {}).get("tasks") or {}).get(task) or {}
        mean = entry.get("mean") or {}
        lines.append(
            "| DreamMix (ours) | " + " | ".join(_cell(entry, mean.get(k)) for k in METRIC_TITLES)
            + f" | {_cell(entry, (fid or {}).get(task), 2)} | {_cases(entry)} |"
        )  # fmt: skip
        published = paper.get("dreammix") or {}
        lines.append(
            "| DreamMix (paper) | " + " | ".join(_fmt(_paper_value(published, task, k)) for k in METRIC_TITLES)
            + f" | {_fmt(_paper_value(published, task, 'fid'), 2)} | |"
        )  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def real_images_row(per_subject: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Mean over images of the per-subject real-image scores (weighted by each subject's count)."""
    total = sum(int(s["n"]) for s in per_subject.values())
    if not total:
        return {"n": 0, "mean": {}, "per_subject": {}}
    mean = {k: sum(float(s[k]) * int(s["n"]) for s in per_subject.values()) / total for k in METRIC_TITLES}
    return {"n": total, "mean": mean, "per_subject": {k: dict(v) for k, v in per_subject.items()}}


# ------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------


def _sweep_row(run_dir: Path) -> dict[str, Any]:
    run = load_run(run_dir)
    summary, settings = run["summary"], run["settings"]
    generation = settings.get("generation", {})
    training = settings.get("lora_training") or {}
    loss = training.get("loss") or {}
    row: dict[str, Any] = {
        "job": run_dir.name,
        "row": summary.get("row", settings.get("row")),
        "subject": summary.get("subject", settings.get("subject")),
        "base": (summary.get("base_model") or {}).get("name"),
        "lambda": (generation.get("dif") or {}).get("lambda_"),
        "tas": (generation.get("tas") or {}).get("enabled"),
        "tas_stages": ",".join((generation.get("tas") or {}).get("stages") or []),
        "tau_in": loss.get("tau_in"),
        "tau_out": loss.get("tau_out"),
        "beta": loss.get("beta"),
        "steps": generation.get("steps"),
    }
    for task in ("identity", "attribute"):
        entry = (summary.get("tasks") or {}).get(task) or {}
        row[f"{task}/n"] = entry.get("n", 0)
        for key in METRIC_TITLES:
            row[f"{task}/{key}"] = (entry.get("mean") or {}).get(key)
        row[f"{task}/fid"] = (summary.get("fid") or {}).get(task)
    return row


def collect_results(sweep_dir: str | Path) -> Path | None:
    """Write ``<sweep_dir>/results.md`` and ``results.json``: one line per evaluation run found
    below ``sweep_dir`` (any depth), sorted by folder. Returns the markdown path, None if no run."""
    from dreammix.atomic import atomic_write_bytes
    from dreammix.benchmark.records import SUMMARY_JSON

    sweep_dir = Path(sweep_dir)
    runs = sorted({p.parent for p in sweep_dir.rglob(SUMMARY_JSON)})
    if not runs:
        log.warning("no evaluation summaries below %s", sweep_dir)
        return None
    rows = [_sweep_row(r) for r in runs]
    columns = ["job", "row", "subject", "base", "lambda", "tas", "tas_stages", "tau_in", "tau_out", "beta", "steps"]
    metrics = [f"{t}/{k}" for t in ("identity", "attribute") for k in (*METRIC_TITLES, "fid")]
    header = [*columns, *[m.replace("identity/", "id ").replace("attribute/", "attr ") for m in metrics]]
    lines = [f"# Sweep results: {sweep_dir}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[c]) if row[c] is not None else "" for c in columns]
        cells += [_fmt(row[m], 2 if m.endswith("fid") else 3) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = sweep_dir / "results.md"
    atomic_write_bytes(markdown, ("\n".join(lines) + "\n").encode("utf-8"))
    atomic_write_bytes(sweep_dir / "results.json", (json.dumps(rows, indent=2, default=str) + "\n").encode("utf-8"))
    log.info("sweep results: %s", markdown)
    return markdown


try:  # Hydra is a dependency; the guard keeps this module importable on its own
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class CollectResultsCallback(_HydraCallback):  # type: ignore[misc]
    """Hydra callback (``conf/eval.yaml``): after a multirun, :func:`collect_results` on its sweep dir."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            path = collect_results(config.hydra.sweep.dir)
        except Exception as exc:  # noqa: BLE001 - the jobs' own results are already on disk
            log.warning("could not collect sweep results: %s", exc)
            return
        if path is not None:
            print(f"sweep results: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dreammix.benchmark.report <sweep or eval folder> ...``: (re)write results.md."""
    import sys

    folders = list(sys.argv[1:] if argv is None else argv)
    if not folders:
        print("usage: python -m dreammix.benchmark.report <folder> [<folder> ...]", file=sys.stderr)
        return 2
    for folder in folders:
        path = collect_results(folder)
        print(path if path else f"no evaluation runs below {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
