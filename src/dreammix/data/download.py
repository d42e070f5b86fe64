"""``make data`` and first-use downloads: the DreamBooth dataset, COCO val2017 (+ annotations), the FID reference
set (COCO test2017 by default) and torch-fidelity's Inception weights into ``data/``.

Standard library only (``scripts/download_data.py`` runs it before or without ``make install``;
``dreammix`` and ``dreammix.data`` import nothing heavy). Every file is

- **resumable**: downloaded to ``data/downloads/<name>.part`` with HTTP ``Range`` requests, so an
  interrupted run continues where it stopped (a server that ignores ``Range`` restarts the file);
- **verified** before use: size and MD5 for the COCO archives (the values published with the
  archives and used by torchvision-style loaders: several independent sources agree), the
  sha256 prefix in the Inception weights' file name (torch hub convention), and for DreamBooth —
  a GitHub archive of a pinned commit, whose zip bytes GitHub does not promise to keep stable —
  the content: 30 subject folders, 158 images and the sha256 of ``prompts_and_classes.txt``;
- **installed atomically**: archives are unpacked into a temp folder beside the target and
  renamed into place; ``data/.installed/<item>.json`` marks a finished item so reruns skip it.

Layout produced (the defaults of ``conf/paths``)::

    data/dreambooth/images/<subject>/NN.jpg, prompts_and_classes.txt, references_and_licenses.txt
    data/coco/val2017/*.jpg, data/coco/annotations/instances_val2017.json, data/coco/test2017/*.jpg
    data/weights/weights-inception-2015-12-05-6726825d.pth

Not downloadable here: the DreamBooth *masks* (``data/dreambooth/masks/<subject>/NN.png``) come
from a "DreamBench with masks" collection without a stable public URL; copy them in yourself.

Examples::

    python scripts/download_data.py                      # everything (≈ 7 GB, most of it test2017)
    python scripts/download_data.py --only dreambooth coco-val
    python scripts/download_data.py --fid-reference none # skip test2017
    python scripts/download_data.py --list               # what would be fetched, with checksums
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 1 << 20
DREAMBOOTH_COMMIT = "e9b8c013ef2e30ab3d5d9018808513e9093e3bc4"
DREAMBOOTH_PROMPTS_SHA256 = "f632a5bdb41c3909ce22a0aefcea14432c0897e8db14ab845e68850af5ada486"
DREAMBOOTH_SUBJECTS = 30
DREAMBOOTH_IMAGES = 158
DREAMBOOTH_URL = f"https://github.com/google/dreambooth/archive/{DREAMBOOTH_COMMIT}.zip"


class DownloadError(Exception):
    """A failed download, checksum or install step (one line for the user)."""


@dataclass
class Item:
    name: str
    url: str
    filename: str
    install: Callable[[Path, Path], None]  # (archive, data_dir)
    md5: str | None = None
    size: int | None = None
    sha256_prefix: str | None = None
    note: str = ""
    groups: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------
# Download with resume + verification
# --------------------------------------------------------------------------------------------


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, item: Item) -> None:
    """Raise :class:`DownloadError` unless ``path`` has the item's size and checksums."""
    if item.size is not None and path.stat().st_size != item.size:
        raise DownloadError(f"{path.name}: size {path.stat().st_size} != expected {item.size}")
    if item.md5 is not None:
        got = file_digest(path, "md5")
        if got != item.md5:
            raise DownloadError(f"{path.name}: md5 {got} != expected {item.md5}")
    if item.sha256_prefix is not None:
        got = file_digest(path, "sha256")
        if not got.startswith(item.sha256_prefix):
            raise DownloadError(f"{path.name}: sha256 {got} does not start with {item.sha256_prefix}")


def _progress(name: str, done: int, total: int | None, started: float) -> None:
    if not sys.stderr.isatty():
        return
    rate = done / max(time.time() - started, 1e-6) / 2**20
    total_text = f"/{total / 2**20:.0f}" if total else ""
    print(f"\r  {name}: {done / 2**20:.0f}{total_text} MiB ({rate:.1f} MiB/s)", end="", file=sys.stderr, flush=True)


def download(
    url: str, target: Path, *, retries: int = 5, timeout: float = 60.0, name: str = "", backoff: float = 2.0
) -> Path:
    """Fetch ``url`` to ``target`` via ``target.part``, resuming with ``Range`` across retries
    and reruns; the finished file is renamed into place (never a partial file at ``target``).
    Waits ``backoff * 2**(attempt-1)`` s (at most 60) between attempts, not after the last one.
    No folder is created before the server answers, so an offline attempt leaves nothing behind."""
    if target.is_file():
        return target
    part = target.with_name(target.name + ".part")
    for attempt in range(1, retries + 1):
        offset = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "dreammix-download/1"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status = getattr(response, "status", 200)
                if offset and status != 206:
                    offset = 0  # the server ignored Range: start over
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                started = time.time()
                target.parent.mkdir(parents=True, exist_ok=True)
                with part.open("ab" if offset else "wb") as handle:
                    done = offset
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        handle.write(chunk)
                        done += len(chunk)
                        _progress(name or target.name, done, total, started)
                if sys.stderr.isatty():
                    print(file=sys.stderr)
                if total is not None and done < total:
                    raise DownloadError(f"{target.name}: connection closed at {done} of {total} bytes")
            os.replace(part, target)
            return target
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left to fetch: the .part is complete
                os.replace(part, target)
                return target
            error: Exception = exc
        except (urllib.error.URLError, OSError, DownloadError, http.client.HTTPException) as exc:
            error = exc
        if attempt == retries:
            break
        wait = min(60.0, backoff * 2 ** (attempt - 1))
        print(f"  {target.name}: {error} (attempt {attempt}/{retries}, retrying in {wait:g}s)", flush=True)
        time.sleep(wait)
    raise DownloadError(f"{target.name}: download failed after {retries} attempt(s) ({error})")


# --------------------------------------------------------------------------------------------
# Installing
# --------------------------------------------------------------------------------------------


def safe_extract(archive: Path, destination: Path) -> None:
    """Unzip refusing members that would land outside ``destination`` (zip-slip)."""
    root = destination.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            target = (destination / member.filename).resolve()
            if target != root and root not in target.parents:
                raise DownloadError(f"{archive.name}: unsafe path in archive: {member.filename}")
        zf.extractall(destination)


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing an old ``target`` only once ``source`` is ready."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def install_zip_folder(member_dir: str, target_rel: str) -> Callable[[Path, Path], None]:
    """Install folder ``member_dir`` of a zip as ``data/<target_rel>``."""

    def install(archive: Path, data_dir: Path) -> None:
        target = data_dir / target_rel
        with tempfile.TemporaryDirectory(prefix=".unpack-", dir=data_dir) as tmp:
            safe_extract(archive, Path(tmp))
            source = Path(tmp) / member_dir
            if not source.is_dir():
                raise DownloadError(f"{archive.name}: no folder {member_dir}/ inside")
            replace_dir(source, target)

    return install


def install_coco_annotations(archive: Path, data_dir: Path) -> None:
    target = data_dir / "coco" / "annotations"
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=data_dir) as tmp:
        safe_extract(archive, Path(tmp))
        source = Path(tmp) / "annotations"
        if not (source / "instances_val2017.json").is_file():
            raise DownloadError(f"{archive.name}: annotations/instances_val2017.json missing")
        replace_dir(source, target)


def install_dreambooth(archive: Path, data_dir: Path, target: Path | None = None) -> None:
    """``<repo>-<commit>/dataset/<subject>/*.jpg`` → ``data/dreambooth/images/<subject>/`` (or
    ``target/images/...``), plus the prompts and licence files; checks the subject/image counts
    and the prompts' sha256. Keeps an existing ``masks/`` folder (not part of this download)."""
    target = target if target is not None else data_dir / "dreambooth"
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=data_dir) as tmp:
        safe_extract(archive, Path(tmp))
        datasets = list(Path(tmp).glob("*/dataset"))
        if len(datasets) != 1:
            raise DownloadError(f"{archive.name}: expected one <repo>/dataset folder, found {len(datasets)}")
        dataset = datasets[0]
        prompts = dataset / "prompts_and_classes.txt"
        if not prompts.is_file():
            raise DownloadError(f"{archive.name}: dataset/prompts_and_classes.txt missing")
        got = file_digest(prompts, "sha256")
        if got != DREAMBOOTH_PROMPTS_SHA256:
            raise DownloadError(f"prompts_and_classes.txt sha256 {got} != expected {DREAMBOOTH_PROMPTS_SHA256}")
        subjects = sorted(p for p in dataset.iterdir() if p.is_dir())
        images = [f for s in subjects for f in s.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
        if len(subjects) != DREAMBOOTH_SUBJECTS or len(images) != DREAMBOOTH_IMAGES:
            raise DownloadError(
                f"{archive.name}: {len(subjects)} subjects / {len(images)} images, "
                f"expected {DREAMBOOTH_SUBJECTS} / {DREAMBOOTH_IMAGES}"
            )
        staging = Path(tmp) / "dreambooth"
        (staging / "images").mkdir(parents=True)
        for subject in subjects:
            os.replace(subject, staging / "images" / subject.name)
        for name in ("prompts_and_classes.txt", "references_and_licenses.txt"):
            if (dataset / name).is_file():
                os.replace(dataset / name, staging / name)
        for extra in ("LICENSE", "LICENSE.md", "README.md"):
            candidate = dataset.parent / extra
            if candidate.is_file():
                shutil.copy2(candidate, staging / extra)
        if (target / "masks").is_dir():
            os.replace(target / "masks", staging / "masks")
        replace_dir(staging, target)
    if not (target / "masks").is_dir():
        print(
            f"  note: {target}/masks/<subject>/NN.png (one object mask per image) are not part of the "
            "DreamBooth release; copy a 'DreamBench with masks' set there (without masks, training uses "
            "the whole photo: data.missing_mask=full).",
            file=sys.stderr,
        )


def install_file(target_rel: str) -> Callable[[Path, Path], None]:
    def install(archive: Path, data_dir: Path) -> None:
        target = data_dir / target_rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(archive, tmp)
        os.replace(tmp, target)

    return install


def dreambooth_item(target: Path | None = None) -> Item:
    """The DreamBooth archive; ``DREAMMIX_DREAMBOOTH_URL`` points it at a mirror."""
    return Item(
        name="dreambooth",
        url=os.environ.get("DREAMMIX_DREAMBOOTH_URL", DREAMBOOTH_URL),
        filename=f"dreambooth-{DREAMBOOTH_COMMIT[:12]}.zip",
        install=lambda archive, data_dir: install_dreambooth(archive, data_dir, target),
        note="GitHub archive of a pinned commit; verified by content (30 subjects, 158 images, prompts sha256)",
        groups=("dreambooth",),
    )


def catalogue(fid_reference: str = "test2017") -> list[Item]:
    items = [
        dreambooth_item(),
        Item(
            name="coco-val2017",
            url="http://images.cocodataset.org/zips/val2017.zip",
            filename="val2017.zip",
            md5="442b8da7639aecaf257c1dceb8ba8c80",
            size=815585330,
            install=install_zip_folder("val2017", "coco/val2017"),
            groups=("coco-val",),
        ),
        Item(
            name="coco-annotations2017",
            url="http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
            filename="annotations_trainval2017.zip",
            md5="f4bbac642086de4f52a3fdda2de5fa2c",
            size=252907541,
            install=install_coco_annotations,
            groups=("coco-val",),
        ),
        Item(
            name="inception-weights",
            url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
            filename="weights-inception-2015-12-05-6726825d.pth",
            sha256_prefix="6726825d",
            install=install_file("weights/weights-inception-2015-12-05-6726825d.pth"),
            note="torch-fidelity's InceptionV3 for FID; sha256 prefix from the file name",
            groups=("fid",),
        ),
    ]
    if fid_reference == "test2017":
        items.append(
            Item(
                name="coco-test2017",
                url="http://images.cocodataset.org/zips/test2017.zip",
                filename="test2017.zip",
                md5="77ad2c53ac5d0aea611d422c0938fb35",
                install=install_zip_folder("test2017", "coco/test2017"),
                note="FID reference set (paper: COCO test2017); size not pinned, md5 verified",
                groups=("fid", "coco-test"),
            )
        )
    return items


def fetch(item: Item, data_dir: Path, *, keep_archives: bool = False, retries: int = 5, backoff: float = 2.0) -> bool:
    """Download, verify and install one item unless already installed; True if work was done."""
    marker = data_dir / ".installed" / f"{item.name}.json"
    if marker.is_file():
        print(f"{item.name}: already installed ({marker})")
        return False
    archive = data_dir / "downloads" / item.filename
    print(f"{item.name}: {item.url}")
    download(item.url, archive, retries=retries, name=item.name, backoff=backoff)
    try:
        verify(archive, item)
    except DownloadError:
        # A corrupt finished file would fail forever; drop it so the next run starts fresh.
        archive.unlink(missing_ok=True)
        raise
    try:
        item.install(archive, data_dir)
    except (zipfile.BadZipFile, DownloadError):
        archive.unlink(missing_ok=True)  # unverifiable archives (DreamBooth): refetch next time
        raise
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {"url": item.url, "file": item.filename, "sha256": file_digest(archive, "sha256"), "md5": item.md5}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    if not keep_archives:
        archive.unlink(missing_ok=True)
    print(f"{item.name}: installed (sha256 {record['sha256']})")
    return True


def ensure_dreambooth_subject(name: str, image_dir: Path, dreambooth_dir: Path, *, retries: int = 2) -> bool:
    """First use of a DreamBooth subject: when ``image_dir`` is missing and is the subject's folder
    of the DreamBooth layout (``<dreambooth_dir>/images/<name>``), fetch the dataset exactly as
    ``make data`` does (same archive, same content checks, resumable) into ``dreambooth_dir``.

    Returns True when it downloaded. A custom subject (``image_dir`` elsewhere) is never
    downloaded. Failure raises :class:`DownloadError` with one line naming ``make data`` and
    ``paths.dreambooth_dir``.
    """
    image_dir, dreambooth_dir = Path(image_dir), Path(dreambooth_dir)
    if image_dir.is_dir() or image_dir != dreambooth_dir / "images" / name:
        return False
    # stdout: on failure stderr holds only the one error line of the entry points
    print(f"subject '{name}': {image_dir} missing, downloading the DreamBooth dataset into {dreambooth_dir}", flush=True)
    item = dreambooth_item(dreambooth_dir)
    try:
        fetch(item, dreambooth_dir.parent, retries=retries, backoff=1.0)
    except (DownloadError, OSError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())
        raise DownloadError(
            f"subject '{name}' not found at {image_dir} and its download failed ({reason}): "
            "run `make data` where the network is reachable, or set paths.dreambooth_dir to a DreamBooth copy"
        ) from exc
    if not image_dir.is_dir():
        raise DownloadError(
            f"subject '{name}' is not in the DreamBooth dataset at {dreambooth_dir}: set subject.image_dir, "
            "or run `make data` / set paths.dreambooth_dir"
        )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="make data: download DreamBooth, COCO and the FID inputs into data/", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("DREAMMIX_DATA", "data"), help="target folder (default: data)")
    parser.add_argument(
        "--only", nargs="+", choices=["dreambooth", "coco-val", "coco-test", "fid"], help="fetch only these groups"
    )
    parser.add_argument("--fid-reference", choices=["test2017", "none"], default="test2017", help="FID reference set")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded zips in data/downloads")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--list", action="store_true", help="print what would be fetched and exit")
    args = parser.parse_args(argv)

    items = catalogue(args.fid_reference)
    if args.only:
        items = [i for i in items if set(i.groups) & set(args.only)]
    if args.list:
        for item in items:
            checks = ", ".join(
                f"{k}={v}" for k, v in (("md5", item.md5), ("size", item.size), ("sha256^", item.sha256_prefix)) if v
            )
            print(f"{item.name}\t{item.url}\t{checks or 'content checks'}\t{item.note}")
        return 0
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for item in items:
        try:
            fetch(item, data_dir, keep_archives=args.keep_archives, retries=args.retries)
        except (DownloadError, OSError, zipfile.BadZipFile) as exc:
            print(f"error: {item.name}: {exc}", file=sys.stderr)
            failed.append(item.name)
    if failed:
        print(f"error: failed: {', '.join(failed)} (rerun to resume)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
