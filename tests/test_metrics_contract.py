"""Metric contracts that mutation testing (``make mutants``) found unchecked by test_metrics.py:
each test names the wrong line it catches. Tiny random models; expected values from first
principles or the model's own call."""

from __future__ import annotations

import pytest
import torch

from dreammix.errors import DreamMixError
from test_metrics import clip, dino, hand_fid, random_image, random_inception_weights, tiny_dirs  # noqa: F401  (fixtures)


def test_clip_t_removes_the_given_identifier(clip):
    """``clip_t(..., identifier=x)`` scores the prompt without *x*: the same score as the prompt
    written without it (an identifier not passed on would leave ``zqx`` in the text)."""
    features = clip.encode_images([random_image(21), random_image(22)])
    got = clip.clip_t(features, ["a zqx red can", "zqx teapot on a table"], identifier="zqx")
    expected = clip.clip_t(features, ["a red can", "teapot on a table"], identifier="")
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(clip.clip_t(features, ["a zqx red can", "zqx teapot on a table"], identifier=""), expected)


# ------------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------------


class _Means:
    """A 3-d FID feature: the per-channel mean of the uint8 image (counts its batches)."""

    def __init__(self, name="means"):
        self.name = name
        self.batches = []

    def __call__(self, images):
        assert images.dtype == torch.uint8
        self.batches.append(len(images))
        return images.float().mean(dim=(2, 3))


def _write(folder, names, size=(20, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(200 + i, size).save(folder / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    return folder


def test_fid_folder_listing_is_recursive_sorted_and_case_blind(tmp_path):
    """A reference folder's images are every image file below it, whatever the suffix's case
    (``.JPG`` from cameras), in sorted order (the seeded reference sample depends on it); other
    files are skipped; an explicit list is used as given."""
    from dreammix.metrics.fid import list_images

    folder = _write(tmp_path / "ref", ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.PNG"])
    (folder / "notes.txt").write_text("not an image")
    (folder / "e.png.d").mkdir()  # a folder with an image-like name
    expected = sorted([folder / "b.png", folder / "a.JPG", folder / "sub/c.jpeg", folder / "sub/deeper/d.PNG"])
    assert list_images(folder) == expected
    assert list_images(str(folder)) == expected
    assert list_images([str(folder / "b.png"), folder / "a.JPG"]) == [folder / "b.png", folder / "a.JPG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamMixError, match="no images"):
        list_images(tmp_path / "empty")


def test_fid_features_default_to_299_whole_image_in_batches_of_50(tmp_path):
    """``extract_features`` without options: each image resized whole to 299×299 (PIL bicubic),
    batches of 50, rows in input order, float64."""
    import numpy as np
    from PIL import Image

    from dreammix.metrics.fid import extract_features

    folder = _write(tmp_path / "imgs", [f"{i:02d}.png" for i in range(3)], size=(40, 17))
    paths = sorted(folder.iterdir())
    extractor = _Means()
    got = extract_features(paths, extractor, device="cpu")
    expected = [np.asarray(Image.open(p).convert("RGB").resize((299, 299), Image.BICUBIC), dtype=np.float64).mean((0, 1))
                for p in paths]
    assert got.dtype == np.float64 and extractor.batches == [3]
    assert got == pytest.approx(np.array(expected), abs=1e-4)
    many = [paths[0]] * 51
    extractor = _Means()
    extract_features(many, extractor, image_size=8, device="cpu")
    assert extractor.batches == [50, 1]
    extractor = _Means()
    extract_features(paths, extractor, image_size=8, batch_size=0, device="cpu")  # at least 1 per batch
    assert extractor.batches == [1, 1, 1]
    with pytest.raises(DreamMixError, match="no images"):
        extract_features([], extractor, device="cpu")


def test_fid_statistics_need_two_rows_and_are_mean_and_unbiased_covariance():
    import numpy as np

    from dreammix.metrics.fid import feature_statistics

    x = np.array([[1.0, 2.0, 0.0], [3.0, -2.0, 4.0]])
    stats = feature_statistics(x)
    assert stats["mu"] == pytest.approx([2.0, 0.0, 2.0])
    d = x[1] - x[0]
    assert stats["sigma"] == pytest.approx(np.outer(d, d) / 2)  # (x - mu)^T (x - mu) / (N - 1), N = 2
    for bad in (x[:1], x[0], x[None]):
        with pytest.raises(DreamMixError, match="at least 2"):
            feature_statistics(bad)


def test_reference_sample_defaults_to_seed_0_of_the_sorted_listing(tmp_path):
    """``reference_limit`` keeps ``random.Random(seed).sample`` of the sorted file list (seed 0 by
    default); a limit at or above the folder size keeps every image."""
    import random

    import numpy as np

    from dreammix.metrics.fid import feature_statistics, reference_statistics

    folder = _write(tmp_path / "ref", [f"{i}.png" for i in range(7)], size=(8, 8))
    paths = sorted(folder.iterdir())

    def stats_of(chosen):
        return feature_statistics(np.stack([_Means()(torch.from_numpy(np.asarray(__import__("PIL.Image").Image.open(p)
                                  .convert("RGB")).copy()).permute(2, 0, 1)[None])[0].numpy() for p in chosen]))

    got = reference_statistics(folder, _Means(), image_size=8, device="cpu", limit=3)
    expected = stats_of(random.Random(0).sample(paths, 3))
    assert got["mu"] == pytest.approx(expected["mu"], abs=1e-6)
    every = stats_of(paths)
    for limit in (7, 9):
        assert reference_statistics(folder, _Means(), image_size=8, device="cpu", limit=limit)["mu"] == pytest.approx(
            every["mu"], abs=1e-6)


def test_reference_cache_is_keyed_by_extractor_size_and_file_state(tmp_path):
    """The cached reference statistics are reused only for the same extractor, image size and
    files: another extractor name, size, or a rewritten file (new size/mtime) computes anew."""
    import os

    from dreammix.metrics.fid import reference_statistics

    folder = _write(tmp_path / "ref", [f"{i}.png" for i in range(4)], size=(16, 16))
    cache = tmp_path / "cache"

    def run(extractor, size=8):
        stats = reference_statistics(folder, extractor, image_size=size, device="cpu", cache_dir=cache)
        return stats, bool(extractor.batches)

    first, computed = run(_Means())
    assert computed
    again, computed = run(_Means())
    assert not computed and again["mu"] == pytest.approx(first["mu"]) and again["sigma"] == pytest.approx(first["sigma"])
    assert run(_Means("other"))[1]
    assert run(_Means(), size=12)[1]
    entries = len(list(cache.glob("ref-*.npz")))
    assert entries == 3
    target = folder / "0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    assert run(_Means())[1]
    random_image(999, (16, 17)).save(target)  # rewritten: another byte size ...
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # ... under the same mtime
    assert run(_Means())[1]
    assert len(list(cache.glob("ref-*.npz"))) == entries + 2


def test_compute_fid_defaults_are_299_pixels_seed_0_and_auto_device(tmp_path, monkeypatch):
    """``compute_fid`` / ``reference_statistics`` without options: images resized whole to 299×299,
    the reference sample drawn with seed 0, device ``auto`` (cpu without CUDA)."""
    import random

    import numpy as np
    from PIL import Image

    from dreammix.metrics.fid import compute_fid, reference_statistics

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gen = _write(tmp_path / "gen", [f"g{i}.png" for i in range(5)], size=(30, 20))
    ref = _write(tmp_path / "ref", [f"r{i}.png" for i in range(8)], size=(12, 25))

    def feats(paths):
        return np.array([np.asarray(Image.open(p).convert("RGB").resize((299, 299), Image.BICUBIC), dtype=np.float64)
                         .mean((0, 1)) for p in paths])

    sample = random.Random(0).sample(sorted(ref.iterdir()), 5)
    got = compute_fid(gen, ref, _Means(), reference_limit=5)
    assert got == pytest.approx(hand_fid(feats(sorted(gen.iterdir())), feats(sample)), rel=1e-3)
    assert reference_statistics(ref, _Means())["mu"] == pytest.approx(feats(sorted(ref.iterdir())).mean(0), abs=1e-3)


def test_inception_extractor_defaults_to_the_2048_pool_features_on_auto_device(random_inception_weights, monkeypatch):
    """Every FID paper uses the 2048-d pool features; the device follows ``auto``."""
    from dreammix.metrics.fid import InceptionExtractor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extractor = InceptionExtractor(random_inception_weights)
    assert extractor.name == "inception-v3-compat-2048" and list(extractor.model.features_list) == ["2048"]
    assert extractor.device == torch.device("cpu")


def test_inception_weights_file_with_code_in_torch_format_is_refused(tmp_path):
    """A ``torch.save`` file (zip format) that references a global is refused by the
    ``weights_only=True`` check before torch-fidelity unpickles it (a plain pickle is refused
    by torch.load's format check alone, so test_metrics' case cannot tell)."""
    from dreammix.metrics.fid import InceptionExtractor

    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "hook": print}, evil)
    with pytest.raises(DreamMixError, match="not a plain PyTorch state dict"):
        InceptionExtractor(evil, device="cpu")


def test_model_fingerprint_tells_apart_weights_names_and_shapes():
    """The feature-cache key of a model: the same weights in another shape (no config to tell
    them apart), another name or other weights are other models; a copy is the same model."""
    from dreammix.metrics.common import model_fingerprint

    torch.manual_seed(0)
    a = torch.nn.Linear(8, 2, bias=False)
    b = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        b.weight.copy_(a.weight.reshape(4, 4))  # same numbers, other layer
    c = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        c.weight.copy_(a.weight)
    assert model_fingerprint(a, "clip") == model_fingerprint(c, "clip")
    assert model_fingerprint(a, "clip") != model_fingerprint(b, "clip")
    assert model_fingerprint(a, "clip") != model_fingerprint(a, "dino")
    assert model_fingerprint(a, "clip") != model_fingerprint(a, "clip", extra="224px")
    # the first and the last parameters are sampled: a changed head is another model
    first, middle, last = (torch.nn.Linear(3, 3) for _ in range(3))
    head = torch.nn.Linear(3, 3)
    assert model_fingerprint(torch.nn.Sequential(first, middle, last), "dino") != model_fingerprint(
        torch.nn.Sequential(first, middle, head), "dino")
    with torch.no_grad():
        c.weight[0, 0] += 1
    assert model_fingerprint(a, "clip") != model_fingerprint(c, "clip")
    # the same weights under another (preprocessing) config are another model too
    class Config:
        def __init__(self, size):
            self.size = size

        def to_json_string(self, use_diff=False):
            return f'{{"image_size": {self.size}}}'

    a.config, c.config = Config(224), Config(336)
    with torch.no_grad():
        c.weight.copy_(a.weight)
    assert model_fingerprint(a, "clip") != model_fingerprint(c, "clip")
