"""What makes a finished case of an evaluation run still valid on resume.

``settings.json`` (see :mod:`dreammix.evaluate`) pins everything run-wide: model, LoRA file hash
and scale, DIF/TAS, steps, metric models; a resume with other values is refused. What it cannot
see is a single case changing under the run: the manifest rebuilt with another prompt or box, a
background photo replaced on disk. Resuming then reused the old image and record ("0 generated,
0 scored"). So every generated image gets a sidecar ``images/<case_id>.json`` holding the case's
fingerprint: the sha256 of its manifest line and of its background and mask files' bytes. On
resume, :func:`drop_stale` deletes each image whose sidecar is missing or differs (and its record),
so exactly the changed cases are generated and scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from dreammix.atomic import atomic_write_bytes, atomic_write_text
from dreammix.benchmark.manifest import Case, canonical_json
from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)


def case_fingerprint(case: Case) -> str:
    """sha256 over the case's manifest line and the bytes of its background and mask."""
    digest = hashlib.sha256(case.to_json().encode("utf-8"))
    for path in (case.image_path, case.mask_path):
        if path is None:
            continue
        try:
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        except OSError as exc:
            raise DreamMixError(f"cannot read {path}: {exc.strerror or exc}", f"case {case.case_id}") from exc
    return digest.hexdigest()


def sidecar_path(image: Path) -> Path:
    return image.with_suffix(".json")


def write_sidecar(image: Path, case: Case) -> None:
    """Record the fingerprint of the case ``image`` was just generated for (after the image)."""
    atomic_write_text(sidecar_path(image), json.dumps({"case_id": case.case_id, "fingerprint": case_fingerprint(case)}) + "\n")


def _sidecar_fingerprint(image: Path) -> str | None:
    try:
        return json.loads(sidecar_path(image).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def drop_stale(cases: Sequence[Case], image_of, records_path: Path) -> list[str]:
    """Delete the images (and their records) of cases that changed since they were generated.

    ``image_of(case)`` is the case's image path in the run. An image without a valid sidecar counts
    as changed: it cannot be shown to belong to this case. A record of a case with no image on
    disk is dropped too, so its score always comes from the file that is there. Returns the ids.
    """
    stale: list[str] = []
    without_image: set[str] = set()
    for case in cases:
        image = image_of(case)
        if not image.is_file():
            without_image.add(case.case_id)
            continue
        if _sidecar_fingerprint(image) != case_fingerprint(case):
            image.unlink()
            sidecar_path(image).unlink(missing_ok=True)
            stale.append(case.case_id)
    drop = set(stale) | without_image
    if records_path.is_file() and drop:
        lines = records_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                kept.append(line)  # RecordLog reports or repairs it
                continue
            if not (isinstance(record, dict) and str(record.get("case_id")) in drop):
                kept.append(line if line.endswith("\n") else canonical_json(record) + "\n")
        if len(kept) != len(lines):
            atomic_write_bytes(records_path, "".join(kept).encode("utf-8"))
    if stale:
        log.warning("%d case(s) changed since they were generated (manifest line, background or mask): "
                    "generating them again: %s", len(stale), ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""))
    return stale
