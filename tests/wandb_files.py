"""Read an offline W&B run (``<dir>/wandb/offline-run-*/run-*.wandb``) the way ``wandb sync``
would upload it, without a server: the file is a LevelDB-style log of ``wandb_internal_pb2.Record``
protobufs (7-byte file header ``:W&B`` + magic 0xBEE1 + version; 32 KiB blocks of chunks with a
7-byte header: crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST). wandb 0.31 no longer
ships a Python reader (its core is in Go), so the tests parse it here; the records themselves are
decoded by wandb's own protobuf classes."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"not a W&B run file: {path}"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            pos += left  # zero padding to the block end
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


@dataclass
class OfflineRun:
    """What a run recorded: its name/group/tags, config, history rows, summary and artifacts."""

    path: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)

    @property
    def files(self) -> Path:
        return self.path.parent / "files"


def _items(items) -> dict:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_run(run_file: Path) -> OfflineRun:
    run = OfflineRun(Path(run_file))
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.job_type, run.tags = r.display_name, r.run_group, r.job_type, list(r.tags)
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
    run.config = {k: (v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v)
                  for k, v in run.config.items()}
    return run


def _finished(run_file: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in records(run_file))
    except (AssertionError, ValueError, struct.error):
        return False


def offline_runs(root: Path, timeout: float = 60.0) -> list[OfflineRun]:
    """Every offline run under ``root`` (any depth), oldest first. ``wandb.finish`` returns before
    wandb's service process has written everything, so each file is read once it holds the run's
    ``exit`` record (up to ``timeout`` seconds)."""
    import time

    files = sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    while not all(_finished(f) for f in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [read_run(f) for f in files]
