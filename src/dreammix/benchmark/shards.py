"""Case shards of one evaluation run: ``src/eval.py ... run_dir=R shard=i/n``.

A subject's ~280 benchmark cases take hours on one GPU; ``shard=i/n`` lets ``n`` jobs (GPUs, SLURM
tasks) generate and score disjoint slices of them at the same time. Shard ``i`` takes the cases at
positions ``i, i+n, i+2n, …`` of the run's case list (manifest order), so every case belongs to
exactly one shard and each shard gets a mix of both tasks. It writes into its own folder
``R/shards/<i>-of-<n>/`` (its own images, records, settings), so shards never write the same file.

The merge is the ordinary unsharded command on the same ``run_dir``: before generating anything it
adopts the shards' work (:func:`adopt_shards`) — each finished shard image is hard-linked into
``R/images`` and each shard record appended to ``R/records.jsonl`` once — then generates and scores
only what no shard finished, and computes FID once over the whole set. A shard made with other
generation or scoring settings is refused, like any resume with other settings.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Slice ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, value: Any, key: str = "shard") -> Shard | None:
        """``"i/n"`` with ``0 <= i < n``; None (or ``"0/1"``) means the whole run."""
        if value is None or str(value).strip().lower() in ("", "null", "none"):
            return None
        match = _SHARD.match(str(value))
        if not match:
            raise DreamMixError(f"must be i/n with integers 0 <= i < n, got {value!r}", key)
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise DreamMixError(f"must be i/n with 0 <= i < n, got {value!r}", key)
        return None if count == 1 else cls(index, count)

    def select(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index :: self.count])

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def run_dir(self, run_dir: Path) -> Path:
        return Path(run_dir) / SHARDS_DIR / self.name


def shard_dirs(run_dir: Path) -> list[Path]:
    """The shard folders of a run (any ``n``), sorted."""
    root = Path(run_dir) / SHARDS_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _link(source: Path, target: Path) -> None:
    """``target`` becomes ``source``'s bytes: a hard link (no copy of the image), else a copy made
    under a temporary name and renamed, so a crash never leaves a half image at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def adopt_shards(run_dir: Path, cases: Sequence[Any], settings: Mapping[str, Any], records: Any, image_name: Any) -> int:
    """Bring the shards' images and records of ``cases`` into the unsharded run ``run_dir``.

    ``records`` is the run's :class:`~dreammix.benchmark.records.RecordLog`, ``image_name(case)``
    the image path relative to a run folder. Returns the number of records adopted. A case already
    recorded in ``run_dir`` is left alone, so adopting twice adds nothing.
    """
    from dreammix.benchmark.records import SETTINGS_NAME, RecordLog
    from dreammix.benchmark.staleness import sidecar_path

    folders = shard_dirs(run_dir)
    if not folders:
        return 0
    wanted = {str(c.case_id): c for c in cases}
    have = records.load()
    now = json.loads(json.dumps({k: settings[k] for k in ("generation", "scoring")}))
    adopted = 0
    for folder in folders:
        path = folder / SETTINGS_NAME
        if not path.is_file():
            continue  # a shard that stopped before writing anything
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DreamMixError(f"invalid JSON ({exc.msg})", str(path)) from exc
        differ = sorted(k for part in now for k in set(now[part]) | set(theirs.get(part, {})) if now[part].get(k) != theirs.get(part, {}).get(k))
        if differ:
            raise DreamMixError(f"shard made with other settings ({', '.join(differ)} differ); delete it or use a new run_dir", str(folder))
        shard_records = RecordLog(folder / records.path.name).load()
        for case_id, case in wanted.items():
            source, target = folder / image_name(case), Path(run_dir) / image_name(case)
            if source.is_file() and sidecar_path(source).is_file() and not target.is_file():
                # generated by the shard (scored or not): never generated again. The sidecar (what the
                # image was made from) comes along, so the staleness check judges it like our own.
                _link(sidecar_path(source), sidecar_path(target))
                _link(source, target)
            record = shard_records.get(case_id)
            if record is not None and case_id not in have and target.is_file():
                records.append(record)
                have[case_id] = record
                adopted += 1
    if adopted:
        log.info("adopted %d record(s) from %d shard(s) of %s", adopted, len(folders), run_dir)
    return adopted
