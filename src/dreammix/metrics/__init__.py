"""Benchmark metrics (paper §4.1): CLIP-I, CLIP-T, DINO (raw cosine) and FID.

- :class:`ClipScorer` — transformers ``CLIPModel`` (default ``openai/clip-vit-base-patch32``).
- :class:`DinoScorer` — transformers ``ViTModel`` (default ``facebook/dino-vits16``), CLS token.
- :func:`compute_fid` / :class:`InceptionExtractor` — torch-fidelity's InceptionV3 + Fréchet distance.
- :class:`MetricSuite` — crop + full-image scores of a batch of generated images.

Heavy imports (transformers, torch-fidelity) happen inside the classes, so importing this package
is cheap.
"""

from dreammix.metrics.clip import ClipScorer, strip_identifier
from dreammix.metrics.common import FeatureCache, crop_region, mean_cosine, square_box
from dreammix.metrics.dino import DinoScorer
from dreammix.metrics.fid import (
    InceptionExtractor,
    compute_fid,
    feature_statistics,
    fid_from_config,
    frechet_distance,
    reference_statistics,
)
from dreammix.metrics.suite import SCORE_KEYS, MetricSuite

__all__ = [
    "SCORE_KEYS",
    "ClipScorer",
    "DinoScorer",
    "FeatureCache",
    "InceptionExtractor",
    "MetricSuite",
    "compute_fid",
    "crop_region",
    "feature_statistics",
    "fid_from_config",
    "frechet_distance",
    "mean_cosine",
    "reference_statistics",
    "square_box",
    "strip_identifier",
]
