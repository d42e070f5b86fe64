"""Atomic writes: a file or folder appears whole at its final path, or not at all.

Everything the project writes for later runs to read (manifests, records, caches, images, saved
models, LoRA exports) goes through here, so a run killed mid-write never leaves a half-written
file that the next run would take for a finished one. A file is written to a temp file in the same
folder (same file system, so the rename is atomic), flushed and fsynced, then ``os.replace``-d onto
its path; a folder is built in a staging folder beside it and renamed into place. On any failure
the temp file or staging folder is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[Any]], Any], *, text: bool = False) -> Path:
    """Call ``write(handle)`` on a temp file beside ``path``, fsync it, then rename it to ``path``.

    ``text=True`` opens the temp file as UTF-8 text, else binary. Readers see the old file or the
    whole new one, never a part; the temp file (``.<name>.*.tmp``) is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(text), text=True)


def atomic_save_image(image: Any, path: str | Path, format: str = "PNG") -> None:  # noqa: A002 - PIL's name
    """Save a PIL image to ``path`` in ``format``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: image.save(handle, format=format))


def atomic_write_dir(
    target: str | Path,
    build: Callable[[Path], Any],
    *,
    marker: str | None = None,
    remove_incomplete: bool = False,
    replace: bool = False,
) -> Path:
    """Call ``build(staging)`` on a staging folder beside ``target``, then rename it to ``target``.

    ``marker`` names the file whose presence makes ``target`` complete: a complete ``target`` is
    kept as it is (nothing is built), and when the rename fails because another process finished
    first, its copy is kept. ``remove_incomplete=True`` deletes a ``target`` without the marker
    (what a killed run of older code left) before the rename. ``replace=True`` replaces an existing
    ``target``: it is moved aside to ``.<name>.old`` first and deleted only after the rename, so a
    crash never leaves no folder at all. The staging folder is removed whatever happens.
    """
    target = Path(target)
    if marker is not None and (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        if replace:
            previous = target.with_name(f".{target.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            if target.exists():
                os.replace(target, previous)
            os.replace(staging, target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            if remove_incomplete and marker is not None and target.exists() and not (target / marker).is_file():
                shutil.rmtree(target)
            try:
                os.replace(staging, target)
            except OSError:
                if marker is None or not (target / marker).is_file():  # not another process's copy
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
