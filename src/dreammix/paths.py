"""Paths built from user input: names that become path parts, manifest paths, output folders.

Three rules keep every run inside its own folder:

* a *name* (subject name, run name, benchmark case id) becomes one path component, so it must be
  one: no separator, no ``..``, not absolute, not empty (:func:`safe_name`);
* a path read from a manifest is relative to the manifest's folder and must stay inside it after
  ``..`` and symlinks are resolved (:func:`inside`); the one documented exception is the benchmark
  manifest's background images, which are COCO photos wherever the user keeps them;
* an output folder is checked for writability (by creating it and a temp file in it) *before* any
  generation, so a read-only location costs one second, not the result (:func:`ensure_writable_dir`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dreammix.errors import DreamMixError

_FORBIDDEN_CHARS = ("/", "\\", "\x00")


def safe_name(value: object, where: str) -> str:
    """``value`` as a string that is a single, harmless path component, else a :class:`DreamMixError`."""
    name = str(value)
    if not name.strip():
        raise DreamMixError("must not be empty", where)
    if any(c in name for c in _FORBIDDEN_CHARS) or name in (".", "..") or Path(name).is_absolute():
        raise DreamMixError(f"{name!r} is not a plain name (no '/', '\\', '..' or absolute paths)", where)
    if name.startswith("~"):
        raise DreamMixError(f"{name!r} is not a plain name (it would expand to a home folder)", where)
    return name


def inside(base: str | Path, relative: str, where: str) -> Path:
    """``base / relative`` resolved, refused when ``relative`` is absolute or leaves ``base``."""
    rel = Path(str(relative))
    if rel.is_absolute() or str(relative).startswith("~"):
        raise DreamMixError(f"path {str(relative)!r} must be relative to the manifest's folder", where)
    root = Path(base).resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise DreamMixError(f"path {str(relative)!r} points outside {root}", where)
    return target


def ensure_writable_dir(path: str | Path, where: str) -> Path:
    """Create ``path`` (and parents) if needed and prove it writable with a temp file.

    ``os.access`` is not enough: it says yes to root on a read-only mount, and no check of
    permission bits sees a full disk or a quota. The temp file is removed at once.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DreamMixError(f"{path} exists and is not a folder", where)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DreamMixError(f"cannot write to {path}: {exc.strerror or exc.__class__.__name__}", where) from exc
    return path


def is_empty_dir(path: Path) -> bool:
    """True for a folder without any entry (a missing folder counts as empty)."""
    if not path.exists():
        return True
    with os.scandir(path) as entries:
        return next(entries, None) is None


def check_own_folder(path: str | Path, markers: tuple[str, ...], what: str, where: str) -> None:
    """``path`` must be missing, empty, or a folder this project made (it holds one of ``markers``):
    a run never writes its fixed file names into a folder of someone else's. Hidden entries and
    ``*.log`` files do not count (Hydra's ``.hydra/`` and job log are in a run folder from the start)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DreamMixError(f"{path} exists and is not a folder", where)
    if not path.is_dir() or any((path / name).exists() for name in markers):
        return
    if any(not entry.name.startswith(".") and not entry.name.endswith(".log") for entry in path.iterdir()):
        raise DreamMixError(
            f"{path} is not empty and is not {what} (no {' or '.join(markers)}); choose a new or empty folder", where
        )
