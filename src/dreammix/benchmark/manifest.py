"""The benchmark manifest: one JSON line per case (background × box × subject × task × prompt).

The manifest is the contract between the builder (``src/build_benchmark.py``) and the later
generation/evaluation runs, so it is written canonically — sorted keys, compact separators, a
fixed case order — and atomically (temp file + rename): the same inputs give a byte-identical
file, and an interrupted build never leaves a half-written manifest behind.

Paths inside the manifest (``image``, ``mask``) are relative to the manifest's folder, so a
benchmark folder can be moved or shared together with the COCO folder beside it;
:func:`read_manifest` resolves them back to absolute paths. ``image`` (a background photo, only
read) may point anywhere, e.g. ``../coco/val2017/...``; ``mask`` must stay inside the manifest's
folder, and ``case_id`` must be a plain name (it becomes ``images/<case_id>.png`` of a run).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dreammix.atomic import atomic_write_bytes
from dreammix.errors import DreamMixError
from dreammix.paths import inside, safe_name

MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "summary.json"

#: The two evaluation tasks of the paper (Table 1 / Table 3).
TASKS = ("identity", "attribute")


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``box`` is ``[x0, y0, x1, y1]`` in pixels (x1/y1 exclusive), the
    mask is that box filled (1 = region to inpaint), ``seed`` the generation seed."""

    case_id: str
    subject: str
    class_noun: str
    task: str
    prompt: str
    prompt_index: int
    image: str
    image_id: int
    ann_id: int
    category: str
    box: list[int]
    width: int
    height: int
    mask: str
    seed: int
    #: Absolute paths, filled in by :func:`read_manifest`; never written.
    image_path: Path | None = field(default=None, compare=False, repr=False)
    mask_path: Path | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> str:
        record = asdict(self)
        record.pop("image_path")
        record.pop("mask_path")
        return canonical_json(record)


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "case_id": str,
    "subject": str,
    "class_noun": str,
    "task": str,
    "prompt": str,
    "prompt_index": int,
    "image": str,
    "image_id": int,
    "ann_id": int,
    "category": str,
    "box": list,
    "width": int,
    "height": int,
    "mask": str,
    "seed": int,
}


def canonical_json(record: dict[str, Any]) -> str:
    """One line of JSON that depends only on the content (sorted keys, no spaces)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def write_manifest(path: str | Path, cases: Iterable[Case]) -> str:
    """Write the manifest atomically; returns its sha256 (recorded in the summary)."""
    text = "".join(case.to_json() + "\n" for case in cases)
    data = text.encode("utf-8")
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def relative_to_manifest(target: str | Path, manifest_dir: str | Path) -> str:
    """``target`` relative to the manifest's folder, with ``/`` separators (portable)."""
    target = Path(target).resolve()
    base = Path(manifest_dir).resolve()
    try:
        rel = os.path.relpath(target, base)
    except ValueError:  # another drive on Windows: keep it absolute
        return target.as_posix()
    return Path(rel).as_posix()


def read_manifest(path: str | Path) -> list[Case]:
    """Read and validate a manifest; ``image_path``/``mask_path`` are resolved to absolute paths.

    A malformed line is a :class:`DreamMixError` naming the file, the line and the field, since a
    hand-edited or truncated manifest would otherwise fail deep inside the generation loop.
    """
    path = Path(path)
    if not path.is_file():
        raise DreamMixError("benchmark manifest not found (run `python src/build_benchmark.py` first)", str(path))
    base = path.parent
    cases: list[Case] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DreamMixError(f"manifest line is not JSON ({exc.msg})", where) from exc
            if not isinstance(record, dict):
                raise DreamMixError("manifest line is not a JSON object", where)
            for key, kind in _REQUIRED.items():
                value = record.get(key)
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise DreamMixError(f"manifest field '{key}' missing or not {getattr(kind, '__name__', kind)}", where)
            box = record["box"]
            if len(box) != 4 or not all(isinstance(v, int) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
                raise DreamMixError("manifest field 'box' must be [x0, y0, x1, y1] integers with x0 < x1, y0 < y1", where)
            safe_name(record["case_id"], f"{where} case_id")  # it names images/<case_id>.png
            if record["case_id"] in seen:
                raise DreamMixError(f"duplicate case_id '{record['case_id']}'", where)
            seen.add(record["case_id"])
            fields = {key: record[key] for key in _REQUIRED}
            cases.append(
                # Backgrounds are COCO photos wherever the user keeps them (read only); the mask is
                # the builder's own file and must stay inside the benchmark folder.
                Case(**fields, image_path=(base / record["image"]).resolve(), mask_path=inside(base, record["mask"], where))
            )
    return cases
