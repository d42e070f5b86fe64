"""Shared pieces of the CLIP/DINO metrics: device choice, the region crop, cosine means, and the
per-reference-image feature cache.

Every generated image of a subject is compared with *all* its reference images (DreamBooth's
CLIP-I/DINO protocol), so the reference features are computed once per image and model and
kept — in memory, and as one ``.npy`` per image on disk when a cache folder is given (keyed by
the file's sha256 and the model's fingerprint, so a changed file or model never hits a stale
entry; ``np.load(allow_pickle=False)`` reads them back).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreammix.atomic import atomic_write
from dreammix.errors import DreamMixError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``/None → cuda when available, else cpu; anything else as given."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def square_box(box: Sequence[int], width: int, height: int, scale: float = 1.0) -> tuple[int, int, int, int]:
    """A square around ``box`` (x0, y0, x1, y1): side = ``scale`` × the box's longer side, centred
    on the box, shifted (not shrunk) to stay inside the image; only an image smaller than the
    side clips it.

    Why square: CLIP and DINO preprocessing centre-crop to a square, which would cut a long box's
    ends off — the crop must contain the whole inpainted object.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise DreamMixError(f"empty box {list(box)}", "metrics crop")
    side = max(1, round(max(x1 - x0, y1 - y0) * float(scale)))
    side_x, side_y = min(side, width), min(side, height)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(round(cx - side_x / 2.0))
    top = int(round(cy - side_y / 2.0))
    left = min(max(0, left), width - side_x)
    top = min(max(0, top), height - side_y)
    return left, top, left + side_x, top + side_y


def crop_region(image: Image.Image, box: Sequence[int], scale: float = 1.0) -> Image.Image:
    """The inpainted region of a generated image (see :func:`square_box`)."""
    return image.crop(square_box(box, image.width, image.height, scale))


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding box ``(x0, y0, x1, y1)`` of the nonzero pixels of a 2-D mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        raise DreamMixError("mask is empty (no region to score)", "metrics crop")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in float32 (cosine = dot product afterwards)."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_cosine(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``(N,)``: for each row of ``features``, the mean cosine with every row of ``references``."""
    if references.numel() == 0:
        raise DreamMixError("no reference features to compare with", "metrics")
    return (normalize(features) @ normalize(references).T).mean(dim=1)


def model_fingerprint(model: torch.nn.Module, name: str, extra: str = "") -> str:
    """A short id of a model's weights + preprocessing: name, config and a sample of the
    first and last parameters (hashing every weight of a large model on each start is slow)."""
    digest = hashlib.sha256()
    digest.update(name.encode())
    digest.update(extra.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    params = [p for p in model.parameters()]
    for param in (params[0], params[-1]) if params else ():
        sample = param.detach().reshape(-1)[:4096].to("cpu", torch.float32).numpy()
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class FeatureCache:
    """Features of reference images, by (file content, model); memory always, disk optionally."""

    def __init__(self, model_key: str, directory: str | Path | None = None):
        self.model_key = model_key
        self.directory = Path(directory) / model_key if directory else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def _entry(self, digest: str) -> Path | None:
        return self.directory / f"{digest}.npy" if self.directory is not None else None

    def features(self, paths: Sequence[str | Path], compute: Callable[[list[Path]], torch.Tensor]) -> torch.Tensor:
        """Rows for ``paths`` in order; ``compute`` runs once, batched, on the uncached ones."""
        paths = [Path(p) for p in paths]
        for path in paths:
            if not path.is_file():
                raise DreamMixError("reference image not found", str(path))
        digests = [file_sha256(p) for p in paths]
        missing: dict[str, Path] = {}
        for digest, path in zip(digests, paths):
            if digest in missing:
                continue
            if digest in self._memory:
                self.hits += 1
                continue
            entry = self._entry(digest)
            if entry is not None and entry.is_file():
                self._memory[digest] = torch.from_numpy(np.load(entry, allow_pickle=False))
                self.hits += 1
            else:
                missing[digest] = path
        if missing:
            self.misses += len(missing)
            computed = compute(list(missing.values())).detach().to("cpu", torch.float32)
            for digest, row in zip(missing, computed):
                self._memory[digest] = row.clone()
                entry = self._entry(digest)
                if entry is not None:
                    atomic_write(entry, lambda handle, row=row: np.save(handle, row.numpy(), allow_pickle=False))
        return torch.stack([self._memory[d] for d in digests])


def batched(items: Sequence, size: int):
    """Consecutive slices of ``items`` of at most ``size``."""
    size = max(1, int(size))
    for start in range(0, len(items), size):
        yield items[start : start + size]
