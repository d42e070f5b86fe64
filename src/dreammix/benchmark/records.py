"""Per-case result records: an append-only JSONL log that a long benchmark run can resume from.

The benchmark generates and scores thousands of cases; a crash or a pre-empted job must not lose
the finished ones, and a rerun must not redo them. Each finished case is one JSON line appended
with a single ``write`` on an ``O_APPEND`` descriptor (then ``fsync``), so a line is either all
there or — if the process dies mid-write — a truncated last line, which :class:`RecordLog`
drops when it opens the file. On read, records are keyed by ``case_id`` and the last one wins
(a deliberate re-score replaces the old value without rewriting the file); :meth:`compact`
rewrites the deduplicated log atomically.

An evaluation run's folder (written by :mod:`dreammix.evaluate`, read by the tables of
:mod:`dreammix.benchmark.report`) is named here too — its file names, the score keys of a record
and :func:`summarize` — so the reader does not import the writer.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dreammix.atomic import atomic_write_bytes
from dreammix.benchmark.manifest import TASKS, canonical_json
from dreammix.errors import DreamMixError

T = TypeVar("T")

# An evaluation run's folder
IMAGES_DIR = "images"
RECORDS_NAME = "records.jsonl"
SETTINGS_NAME = "settings.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
#: Per-case score keys (crop = table value; ``*_full`` = whole image), as MetricSuite returns them.
SCORE_KEYS = ("clip_t", "clip_i", "dino", "clip_t_full", "clip_i_full", "dino_full")


class RecordLog:
    """Append-only JSONL of per-case records, deduplicated by ``key`` on read."""

    def __init__(self, path: str | Path, key: str = "case_id", fsync: bool = True):
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Cut a partial last line (a crash mid-append) so the next append starts a fresh line."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        os.truncate(self.path, data.rfind(b"\n") + 1)  # everything after the last newline is torn
        warnings.warn(f"{self.path}: dropped an incomplete last record (interrupted write)", stacklevel=3)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (must carry ``key``) as one line, in one ``write`` call."""
        if self.key not in record:
            raise DreamMixError(f"record has no '{self.key}' field", str(self.path))
        data = (canonical_json(dict(record)) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> dict[str, dict[str, Any]]:
        """All records keyed by ``key`` (the last line for a key wins), in first-seen order."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DreamMixError(f"record line is not JSON ({exc.msg})", f"{self.path}:{number}") from exc
                if not isinstance(record, dict) or self.key not in record:
                    raise DreamMixError(f"record line has no '{self.key}'", f"{self.path}:{number}")
                records[str(record[self.key])] = record
        return records

    def pending(self, items: Iterable[T]) -> list[T]:
        """The ``items`` not yet recorded, in their original order; an item's key is its ``key``
        attribute (a manifest :class:`~dreammix.benchmark.manifest.Case`) or mapping entry."""
        done = set(self.load())

        def _key(item: Any) -> str:
            if isinstance(item, Mapping):
                return str(item[self.key])
            return str(getattr(item, self.key))

        return [item for item in items if _key(item) not in done]

    def compact(self) -> int:
        """Rewrite the log atomically with one line per key (sorted); returns the record count."""
        records = self.load()
        data = "".join(canonical_json(records[k]) + "\n" for k in sorted(records)).encode("utf-8")
        atomic_write_bytes(self.path, data)
        return len(records)


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in SCORE_KEYS if all(k in r for r in rows)}


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per task (and ``all``): case count, mean scores over cases, and the same per subject.

    The overall mean is over cases; the benchmark gives every subject the same number of cases
    per task, so it equals the mean of the per-subject means there.
    """
    records = list(records)
    groups: dict[str, list[Mapping[str, Any]]] = {task: [] for task in TASKS}
    for record in records:
        groups.setdefault(str(record["task"]), []).append(record)
    groups["all"] = records
    out: dict[str, Any] = {}
    for task, rows in groups.items():
        if not rows:
            continue
        subjects: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            subjects.setdefault(str(row["subject"]), []).append(row)
        out[task] = {
            "n": len(rows),
            "mean": _means(rows),
            "per_subject": {s: {"n": len(r), "mean": _means(r)} for s, r in sorted(subjects.items())},
        }
    return out
