"""Atomic writes: a file or folder appears whole at its final path, or not at all.

Everything the project writes for later runs to read (manifests, records, caches, images, saved
models, LoRA exports) goes through here, so a run killed mid-write never leaves a half-written
file that the next run would take for a finished one. A file is written to a temp file in the same
folder (same file system, so the rename is atomic), flushed and fsynced, then ``os.replace``-d onto
its path; a folder is built in a staging folder beside it and renamed into place. On any failure
the temp file or staging folder is removed.

``mkstemp``/``mkdtemp`` create 0600 files and 0700 folders whatever the umask (they are meant for
private temp data); what we rename into place gets the modes a plain ``open``/``mkdir`` would have
given (0644 / 0755 under umask 022), so a teammate, a shared ``DREAMMIX_CACHE`` or a ComfyUI server
running as another user can read the outputs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no read-only API elsewhere: set and restore at once
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes ``open``/``mkdir`` would
    have given under the current umask: files 0666 & ~umask, folders 0777 & ~umask."""
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


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
        apply_umask(tmp)
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
        apply_umask(staging)
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
