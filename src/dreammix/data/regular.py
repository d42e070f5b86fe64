"""The regular set of Eq. 8: image + mask + prompt triples written by the ADM step.

Format (``<dir>/manifest.jsonl``), one JSON object per line, paths relative to ``<dir>``::

    {"image": "images/000000.png", "mask": "masks/000000.png", "prompt": "a red metal can", "seed": 7}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dreammix.data.images import load_image, load_mask
from dreammix.data.subjects import MaskedImage
from dreammix.errors import DreamMixError
from dreammix.paths import inside

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class RegularExample(MaskedImage):
    prompt: str = ""


def has_regular_data(directory: str | Path | None) -> bool:
    """True when ``directory`` holds a manifest with at least one line."""
    if not directory:
        return False
    manifest = Path(directory) / MANIFEST_NAME
    return manifest.is_file() and any(line.strip() for line in manifest.read_text(encoding="utf-8").splitlines())


def load_regular_examples(directory: str | Path, limit: int | None = None) -> list[RegularExample]:
    """Read the manifest and its files; a malformed line is an error naming ``file:line``.

    Every path must stay inside ``directory`` (no absolute paths, no ``..`` out of it); an item
    listed twice is used once, with a warning, so it does not weigh double in Eq. 8.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        raise DreamMixError("regular-set manifest not found", str(manifest))
    examples: list[RegularExample] = []
    seen: set[tuple[Path, Path, str]] = set()
    duplicates = 0
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            record = json.loads(line)
            image_rel, mask_rel, prompt = record["image"], record["mask"], record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DreamMixError(f"malformed manifest line ({exc.__class__.__name__}: expected image, mask, prompt)", where) from exc
        if not isinstance(prompt, str) or not prompt.strip():
            raise DreamMixError("empty prompt", where)
        if not isinstance(image_rel, str) or not isinstance(mask_rel, str):
            raise DreamMixError("image and mask must be paths relative to the manifest's folder", where)
        image_path, mask_path = inside(directory, image_rel, where), inside(directory, mask_rel, where)
        if (image_path, mask_path, prompt) in seen:  # e.g. two ADM runs appended one item twice
            duplicates += 1
            continue
        seen.add((image_path, mask_path, prompt))
        image = load_image(image_path)
        mask = load_mask(mask_path, size=image.size)
        if not mask.any():
            raise DreamMixError("mask is empty (no pixel >= 128)", str(directory / mask_rel))
        examples.append(RegularExample(image=image, mask=mask, path=directory / image_rel, prompt=prompt))
        if limit is not None and len(examples) >= limit:
            break
    if duplicates:
        log.warning("%s lists %d item(s) more than once; each is used once", manifest, duplicates)
    return examples
