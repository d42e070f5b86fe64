"""One writer per output folder: a file lock held while a run writes there.

Two ADM runs on one regular set wrote every manifest line twice, and two evaluations resuming one
run folder would generate and score the same cases side by side. :func:`folder_lock` takes an
exclusive ``fcntl``/``flock`` lock (the ``filelock`` package) on ``<folder>/.dreammix.lock``; the
operating system releases it when the process ends, however it ends (``kill -9`` included), so a
crashed run never leaves a stale lock. A second run stops at once with a one-line error instead
of waiting an unknown time behind a job that may take hours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from dreammix.errors import DreamMixError

LOCK_NAME = ".dreammix.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, where: str) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the block, or raise :class:`DreamMixError`."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise DreamMixError(
            f"another run is writing to {folder} (it holds {LOCK_NAME}); wait for it to finish or use another folder",
            where,
        ) from exc
    try:
        yield folder
    finally:
        lock.release()
