"""Metric contracts that mutation testing (``make mutants``) found unchecked by test_metrics.py:
each test names the wrong line it catches. Tiny random models; expected values from first
principles or the model's own call."""

from __future__ import annotations

import pytest
import torch

from dreammix.errors import DreamMixError
from test_metrics import clip, dino, random_image, tiny_dirs  # noqa: F401  (fixtures)


def test_clip_t_removes_the_given_identifier(clip):
    """``clip_t(..., identifier=x)`` scores the prompt without *x*: the same score as the prompt
    written without it (an identifier not passed on would leave ``zqx`` in the text)."""
    features = clip.encode_images([random_image(21), random_image(22)])
    got = clip.clip_t(features, ["a zqx red can", "zqx teapot on a table"], identifier="zqx")
    expected = clip.clip_t(features, ["a red can", "teapot on a table"], identifier="")
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(clip.clip_t(features, ["a zqx red can", "zqx teapot on a table"], identifier=""), expected)
