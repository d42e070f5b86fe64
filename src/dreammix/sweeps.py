"""Hydra multiruns (``-m``) that can be told apart: job folders, W&B names and tags come from the
values the sweep varies, and a train sweep ends with one results table like an eval sweep.

Which keys a sweep varies is read from the sweep's own ``multirun.yaml`` (written by Hydra's
launcher before the jobs start) with Hydra's override parser, so ``subject=can,teapot
model=tiny`` names its jobs ``0_subject=can`` and ``1_subject=teapot`` rather than repeating the
fixed ``model=tiny`` in every folder. Without that file (a launcher that does not write it) every
override of the job is used.

The resolver ``${dreammix_swept:${hydra.overrides.task},${hydra.sweep.dir}}`` (used by
``conf/hydra/default.yaml``) is registered when this module is imported; :mod:`dreammix.cli`
imports it, so it exists wherever a job's function is unpickled (Ray, submitit workers).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

MAX_DIRNAME = 120


def swept_keys(sweep_dir: str | Path) -> set[str] | None:
    """The keys a sweep varies (``a=1,2``, ``range(...)``, ``choice(...)``), None if unknown."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OmegaConf.load(Path(str(sweep_dir)) / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    except Exception:  # noqa: BLE001 - no readable multirun.yaml: unknown
        return None
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def swept_values(job_overrides: Sequence[str], sweep_dir: str | Path) -> list[str]:
    """This job's ``key=value`` for the swept keys (every override when they are unknown)."""
    job = [str(o) for o in job_overrides]
    keys = swept_keys(sweep_dir)
    if keys is None:
        return job
    return [o for o in job if o.split("=", 1)[0].lstrip("+~") in keys] or job


def dirname(values: Sequence[str]) -> str:
    """A folder name from ``key=value`` items: path separators replaced, long names shortened
    with a hash of the full text so two different jobs never share a name."""
    text = ",".join(values) or "job"
    safe = re.sub(r"[^\w.=,+-]+", "_", text).strip("_") or "job"
    if len(safe) > MAX_DIRNAME:
        safe = f"{safe[:MAX_DIRNAME - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe


def _swept_dirname(overrides: Any, sweep_dir: Any) -> str:
    return dirname(swept_values(list(overrides or []), str(sweep_dir)))


if not OmegaConf.has_resolver("dreammix_swept"):
    OmegaConf.register_new_resolver("dreammix_swept", _swept_dirname)


# ------------------------------------------------------------------------------------------------
# Train sweeps: one results table
# ------------------------------------------------------------------------------------------------


def _last_loss(metrics_csv: Path) -> tuple[float | None, int | None]:
    """The last ``train/loss`` the run logged and its step (rows come every log_every_n_steps)."""
    if not metrics_csv.is_file():
        return None, None
    with metrics_csv.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    return (float(rows[-1]["train/loss"]), int(rows[-1]["step"])) if rows else (None, None)


def collect_train_results(sweep_dir: str | Path) -> Path | None:
    """``<sweep_dir>/results.md`` + ``results.json``: one row per training job below ``sweep_dir``
    (its swept values, last logged loss and its step, steps, wall time, LoRA path). None if no job finished."""
    from dreammix.atomic import atomic_write_bytes

    sweep_dir = Path(sweep_dir)
    infos = sorted(sweep_dir.rglob("lora/dreammix_run.json"))
    if not infos:
        log.warning("no finished training jobs below %s", sweep_dir)
        return None
    rows = []
    for info_path in infos:
        job = info_path.parent.parent
        info = json.loads(info_path.read_text())
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        rows.append({
            "job": job.relative_to(sweep_dir).as_posix(),
            "swept": ",".join(swept_values(overrides, sweep_dir)) if overrides else "",
            "subject": info.get("subject"),
            **dict(zip(("last_loss", "last_loss_step"), _last_loss(job / "metrics.csv"))),
            "steps": info.get("steps"),
            "seconds": info.get("train_seconds"),
            "lora": str((job / "lora").resolve()),
        })
    columns = ["job", "swept", "subject", "last_loss", "last_loss_step", "steps", "seconds", "lora"]
    lines = [f"# Train sweep results: {sweep_dir}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if c == "last_loss" and row[c] is not None
                 else f"{row[c]:.1f}" if c == "seconds" and row[c] is not None
                 else "" if row[c] is None else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = sweep_dir / "results.md"
    atomic_write_bytes(markdown, ("\n".join(lines) + "\n").encode("utf-8"))
    atomic_write_bytes(sweep_dir / "results.json", (json.dumps(rows, indent=2) + "\n").encode("utf-8"))
    return markdown


try:  # Hydra is a dependency; the guard keeps this module importable on its own
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class CollectTrainResultsCallback(_HydraCallback):  # type: ignore[misc]
    """Hydra callback (``conf/train.yaml``): after a multirun, :func:`collect_train_results`."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            path = collect_train_results(config.hydra.sweep.dir)
        except Exception as exc:  # noqa: BLE001 - the jobs' own outputs are already on disk
            log.warning("could not collect train sweep results: %s", exc)
            return
        if path is not None:
            print(f"sweep results: {path}")
