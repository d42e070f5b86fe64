"""FID of a set of generated images against a real-image reference folder (paper: COCO test2017).

The statistics and the Fréchet distance are torch-fidelity's own (``fid_features_to_statistics``,
``fid_statistics_to_metric``), and the default feature extractor is torch-fidelity's
``FeatureExtractorInceptionV3`` (2048-d pool features, the TF-FID port), so numbers match
``torch_fidelity.calculate_metrics(fid=True)``. We drive them ourselves instead of calling
``calculate_metrics(input1=dir, input2=dir)`` because:

- generated images keep their background's size (COCO: many sizes) and torch-fidelity batches a
  folder's images as they are, which fails for mixed sizes. We resize every image, whole, to
  ``image_size`` (299) with PIL bicubic — clean-fid's convention — so the Inception input is the
  full image at 299×299 (its own resize step is then the identity);
- the Inception weights come from a local file (``metrics.fid.inception_weights``; the default
  otherwise downloads), checked to load with ``torch.load(weights_only=True)`` first because
  torch-fidelity itself unpickles it without that guard;
- the reference statistics (tens of thousands of images) are cached as ``.npz`` (no pickle)
  keyed by the folder's file list and the extractor, instead of torch-fidelity's pickled cache.

Any callable ``uint8 (N, 3, H, W) → (N, D)`` with a ``name`` can replace Inception (tests use a
tiny one); FID is only comparable between runs with the same extractor and reference set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from dreammix.atomic import atomic_write
from dreammix.data.images import IMAGE_SUFFIXES, load_image
from dreammix.errors import DreamMixError
from dreammix.metrics.common import resolve_device

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def feature_statistics(features: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` of ``(N, D)`` features (float64), via torch-fidelity."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    features = torch.as_tensor(np.asarray(features, dtype=np.float64))
    if features.dim() != 2 or features.shape[0] < 2:
        raise DreamMixError(f"FID needs at least 2 feature rows, got shape {tuple(features.shape)}", "FID")
    stats = fid_features_to_statistics(features)
    return {"mu": np.asarray(stats["mu"], dtype=np.float64), "sigma": np.asarray(stats["sigma"], dtype=np.float64)}


def frechet_distance_from_statistics(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (torch-fidelity's implementation)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise DreamMixError(f"feature sizes differ: {stats_1['mu'].shape} vs {stats_2['mu'].shape}", "FID")
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def frechet_distance(features_1: np.ndarray | torch.Tensor, features_2: np.ndarray | torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance_from_statistics(feature_statistics(features_1), feature_statistics(features_2))


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder's images (recursively, sorted) or an explicit list of files."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise DreamMixError("FID image folder not found", str(folder))
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DreamMixError("no images in FID folder", str(folder))
        return paths
    return [Path(p) for p in source]


def load_fid_image(path: Path, image_size: int) -> torch.Tensor:
    """``uint8 (3, S, S)``: the whole image resized to ``S×S`` with PIL bicubic."""
    image = load_image(path).resize((int(image_size), int(image_size)), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class _FidImages(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths = list(paths)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_fid_image(self.paths[index], self.image_size)


@torch.inference_mode()
def extract_features(
    paths: Sequence[Path],
    extractor: FeatureExtractor,
    *,
    image_size: int = 299,
    batch_size: int = 50,
    device: str | torch.device | None = "auto",
    num_workers: int = 0,
) -> np.ndarray:
    """``(N, D)`` float64 features of the images, in batches (decoding in ``num_workers``
    processes: the reference set is tens of thousands of JPEGs)."""
    if not paths:
        raise DreamMixError("no images to compute FID features of", "FID")
    device = resolve_device(device)
    loader = torch.utils.data.DataLoader(
        _FidImages(paths, image_size), batch_size=max(1, int(batch_size)), num_workers=int(num_workers), shuffle=False
    )
    rows = [extractor(batch.to(device)).detach().to("cpu", torch.float64).numpy() for batch in loader]
    return np.concatenate(rows)


class InceptionExtractor:
    """torch-fidelity's InceptionV3 from a local weights file.

    ``feature_layer`` is one of torch-fidelity's names: ``"2048"`` (the pool features every FID
    paper uses — the default) or the earlier ``"64"``, ``"192"``, ``"768"`` (cheaper; FID values
    are then not comparable with published ones).
    """

    LAYERS = ("64", "192", "768", "2048")

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device | None = "auto",
        feature_layer: str = "2048",
    ):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights is not None:
            weights = Path(weights)
            if not weights.is_file():
                raise DreamMixError(
                    f"Inception weights not found (run `make data`, download {INCEPTION_WEIGHTS_URL}, "
                    "or set metrics.fid.inception_weights=null to let torch-fidelity download them)",
                    str(weights),
                )
            try:  # a plain state dict loads with weights_only=True; anything else is refused
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
                raise DreamMixError(f"not a plain PyTorch state dict ({exc.__class__.__name__})", str(weights)) from exc
            if not isinstance(state, dict):
                raise DreamMixError("Inception weights file is not a state dict", str(weights))
        feature_layer = str(feature_layer)
        if feature_layer not in self.LAYERS:
            raise DreamMixError(
                f"unknown Inception feature layer {feature_layer!r}; one of {self.LAYERS}", "metrics.fid.feature_layer"
            )
        self.device = resolve_device(device)
        try:
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", [feature_layer], feature_extractor_weights_path=None if weights is None else str(weights)
            )
        except RuntimeError as exc:  # wrong keys/shapes
            raise DreamMixError(f"Inception weights do not fit InceptionV3 ({exc.__class__.__name__})", str(weights)) from exc
        self.model = model.to(self.device).eval()
        self.name = f"inception-v3-compat-{feature_layer}"

    @classmethod
    def from_config(cls, cfg: Any) -> InceptionExtractor:
        """From the ``metrics`` config group (``metrics.fid.inception_weights`` / ``feature_layer``)."""
        fcfg = cfg.fid
        weights = None if fcfg.inception_weights is None else str(fcfg.inception_weights)
        return cls(weights, device=cfg.device, feature_layer=str(fcfg.get("feature_layer", "2048")))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.model(images.to(self.device))
        return features


class ColorStatsExtractor:
    """A 6-d FID feature (per-channel mean and std of the image): instant and offline, for CPU
    smoke runs of the chain (``fid_extractor=color_stats``). Not comparable with Inception FID."""

    name = "color-stats"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _listing_key(paths: Sequence[Path], extractor_name: str, image_size: int) -> str:
    """Identifies a reference set: file names, sizes, mtimes, the extractor and the resize."""
    digest = hashlib.sha256(f"{extractor_name}|{image_size}|{len(paths)}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def reference_statistics(
    source: str | Path | Sequence[str | Path],
    extractor: FeatureExtractor,
    *,
    image_size: int = 299,
    batch_size: int = 50,
    device: str | torch.device | None = "auto",
    limit: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """mu/sigma of the reference images, cached as ``<cache_dir>/ref-<key>.npz`` (no pickle)."""
    paths = list_images(source)
    if limit is not None and len(paths) > int(limit):
        paths = sorted(random.Random(seed).sample(paths, int(limit)))
    entry = None
    if cache_dir is not None:
        entry = Path(cache_dir) / f"ref-{_listing_key(paths, extractor.name, image_size)}.npz"
        if entry.is_file():
            with np.load(entry, allow_pickle=False) as data:
                return {"mu": data["mu"], "sigma": data["sigma"]}
    stats = feature_statistics(
        extract_features(
            paths, extractor, image_size=image_size, batch_size=batch_size, device=device, num_workers=num_workers
        )
    )
    if entry is not None:
        atomic_write(entry, lambda handle: np.savez(handle, mu=stats["mu"], sigma=stats["sigma"]))
    return stats


def compute_fid(
    generated: str | Path | Sequence[str | Path],
    reference: str | Path | Sequence[str | Path],
    extractor: FeatureExtractor,
    *,
    image_size: int = 299,
    batch_size: int = 50,
    device: str | torch.device | None = "auto",
    reference_limit: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> float:
    """FID of the whole generated set (folder or file list) against the reference folder."""
    generated_paths = list_images(generated)
    gen_stats = feature_statistics(
        extract_features(
            generated_paths, extractor, image_size=image_size, batch_size=batch_size, device=device, num_workers=num_workers
        )
    )
    ref_stats = reference_statistics(
        reference,
        extractor,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        limit=reference_limit,
        seed=seed,
        cache_dir=cache_dir,
        num_workers=num_workers,
    )
    return frechet_distance_from_statistics(gen_stats, ref_stats)


def fid_from_config(
    cfg: Any, generated: str | Path | Sequence[str | Path], extractor: Callable | None = None
) -> float:
    """FID with the settings of ``cfg`` (the ``metrics`` group); Inception unless ``extractor``."""
    fcfg = cfg.fid
    if extractor is None:
        extractor = InceptionExtractor.from_config(cfg)
    return compute_fid(
        generated,
        str(fcfg.reference_dir),
        extractor,
        image_size=int(fcfg.image_size),
        batch_size=int(fcfg.batch_size),
        device=cfg.device,
        reference_limit=None if fcfg.reference_limit is None else int(fcfg.reference_limit),
        seed=int(fcfg.seed),
        cache_dir=None if fcfg.cache_dir is None else str(fcfg.cache_dir),
        num_workers=int(fcfg.get("num_workers", 0)),
    )
