"""The regular set's manifest (``manifest.jsonl``: one JSON line per image + mask, appended and
fsynced as each item finishes, so a killed run resumes where it stopped) and the device rule.

Both ADM routes (:mod:`dreammix.adm`, :mod:`dreammix.adm_t2i`) and the training data read them;
they live here so that neither route imports the other.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dreammix.atomic import atomic_write_text
from dreammix.errors import DreamMixError
from dreammix.paths import inside

log = logging.getLogger("dreammix.adm")

MANIFEST_NAME = "manifest.jsonl"
MANIFEST_KEYS = ("image", "mask", "prompt", "seed")


def append_manifest(out_dir: str | Path, entry: Mapping[str, Any]) -> None:
    """Append one line to the manifest and fsync it (the item's files must already exist)."""
    with open(Path(out_dir) / MANIFEST_NAME, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({k: entry[k] for k in MANIFEST_KEYS}, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_manifest(out_dir: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The manifest's entries, checked (keys, relative paths).

    A last line without its newline is what a run killed mid-write leaves: it is ignored, and with
    ``repair=True`` the file is rewritten without it (and without entries whose files are gone),
    so the next append starts on a clean line. Any other bad line is an error naming the line.
    """
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail is "" when the file ends with a newline
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    duplicates = 0
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DreamMixError(f"manifest line {number} is not JSON ({exc.msg})", str(path)) from exc
        if not isinstance(entry, dict) or any(k not in entry for k in MANIFEST_KEYS):
            raise DreamMixError(f"manifest line {number} needs keys {list(MANIFEST_KEYS)}", str(path))
        for key in ("image", "mask"):
            inside(out_dir, entry[key], f"{path}:{number}")
        if entry["image"] in seen:  # two runs appended the same item: keep the first line
            duplicates += 1
            continue
        seen.add(entry["image"])
        entries.append(entry)
    if duplicates:
        log.warning("%s lists %d item(s) twice; using each once", path, duplicates)
    if repair:
        kept = [e for e in entries if (Path(out_dir) / e["image"]).is_file() and (Path(out_dir) / e["mask"]).is_file()]
        if tail.strip() or len(kept) != len(entries) or duplicates:
            if tail.strip():
                log.warning("dropping an unfinished last line of %s (the run was stopped while writing it)", path)
            if len(kept) != len(entries):
                log.warning("dropping %d manifest entries whose files are missing", len(entries) - len(kept))
            atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
            entries = kept
    return entries


def resolve_device(device: str) -> str:
    """``auto``: the GPU when there is one (ADM generates with the base model), else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
