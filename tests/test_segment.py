"""Text-prompted segmentation (CLIPSeg) and ``data.missing_mask=segment`` for subject photos.

Expected masks come from the tiny CLIPSeg called straight through transformers (processor +
model), thresholded in logit space (sigmoid(l) > t ⇔ l > log(t / (1 - t))).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreammix.data import segmented_masks
from dreammix.data.segmented_masks import BESIDE_NAME, RECORD_NAME, SubjectMaskSegmenter
from dreammix.data.subjects import Subject, load_source_examples
from dreammix.errors import DreamMixError
from dreammix.segment import SegmenterSpec, load_segmenter


@pytest.fixture(scope="module")
def tiny_clipseg(_session_cache) -> Path:
    from dreammix.models.tiny_adm import ensure_tiny_clipseg

    return ensure_tiny_clipseg(_session_cache / "tiny-clipseg")


def spec_for(path: Path, threshold: float = 0.5) -> SegmenterSpec:
    return SegmenterSpec(pretrained=str(path), threshold=threshold, batch_size=2)


def photo(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def raw_logits(path: Path, image: Image.Image, query: str) -> torch.Tensor:
    """The model's own logit map for one (image, query), straight from transformers."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    model = CLIPSegForImageSegmentation.from_pretrained(path).eval()
    processor = CLIPSegProcessor.from_pretrained(path)
    with torch.no_grad():
        logits = model(**processor(text=[query], images=[image], padding=True, return_tensors="pt")).logits
    return logits.reshape(logits.shape[-2:])


def expected_mask(path: Path, image: Image.Image, query: str, threshold: float) -> np.ndarray:
    logits = raw_logits(path, image, query)
    full = F.interpolate(logits[None, None], size=(image.height, image.width), mode="bilinear", align_corners=False)
    return (full[0, 0] > math.log(threshold / (1 - threshold))).numpy()


def test_segmenter_masks_are_clipseg_logits_at_the_image_size_cut_at_the_threshold(tiny_clipseg):
    segmenter = load_segmenter(spec_for(tiny_clipseg, threshold=0.6), "cpu")
    native, wide, other = photo(1, (32, 32)), photo(2, (64, 48)), photo(3, (40, 40))
    # At the model's own resolution the probabilities are exactly sigmoid(logits).
    (prob,) = segmenter.probabilities([native], ["can"])
    np.testing.assert_allclose(prob, torch.sigmoid(raw_logits(tiny_clipseg, native, "can")).numpy(), atol=1e-6)
    # A batch (batch_size=2: two forward passes) of mixed sizes and queries: each image its own size.
    masks = segmenter.masks([native, wide, other], ["can", "dog", "can"])
    assert [m.shape for m in masks] == [(32, 32), (48, 64), (40, 40)] and all(m.dtype == bool for m in masks)
    for mask, image, query in zip(masks, [native, wide, other], ["can", "dog", "can"]):
        expected = expected_mask(tiny_clipseg, image, query, 0.6)
        assert 0 < expected.mean() < 1  # the check below is not trivially all-or-nothing
        np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.2])
def test_threshold_outside_0_1_is_a_one_line_error(threshold):
    with pytest.raises(DreamMixError, match=r"\(segmenter.threshold\)$"):
        SegmenterSpec(threshold=threshold)


def test_missing_local_segmenter_names_the_key(tmp_path):
    with pytest.raises(DreamMixError, match=r"no CLIPSeg model at .*\(segmenter.pretrained\)$"):
        load_segmenter(SegmenterSpec(pretrained=str(tmp_path / "nothing")))


# --- subject photos without masks ---------------------------------------------------------------


def photo_subject(root: Path, n: int = 3, masked: tuple[int, ...] = ()) -> Subject:
    images, masks = root / "photos", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        photo(10 + i, (64, 48)).save(images / f"{i:02d}.png")
        if i in masked:
            m = np.zeros((48, 64), np.uint8)
            m[10:30, 20:40] = 255
            Image.fromarray(m).save(masks / f"{i:02d}.png")
    return Subject("mug", "can", images, masks if masked else None)


def test_photos_without_masks_are_segmented_cached_beside_them_and_reused(tiny_clipseg, tmp_path, monkeypatch):
    subject = photo_subject(tmp_path, n=3, masked=(1,))
    segment = SubjectMaskSegmenter(spec_for(tiny_clipseg), "can", subject.image_dir, subject.name, tmp_path / "cache")
    examples = load_source_examples(subject, "segment", segment)
    folder = subject.image_dir / BESIDE_NAME
    assert sorted(p.name for p in folder.glob("*.png")) == ["00.png", "02.png"]  # 01 has its own mask
    for example in examples:
        if example.path.stem == "01":
            assert example.mask[10:30, 20:40].all() and example.mask.sum() == 400
            continue
        expected = expected_mask(tiny_clipseg, Image.open(example.path).convert("RGB"), "can", 0.5)
        np.testing.assert_array_equal(example.mask, expected.astype(np.float32))
        cached = np.asarray(Image.open(folder / f"{example.path.stem}.png"))
        assert cached.shape == (48, 64) and set(np.unique(cached)) <= {0, 255}
        np.testing.assert_array_equal(cached == 255, expected)
    assert not (tmp_path / "cache").exists()
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["settings"] == {"pretrained": str(tiny_clipseg), "revision": None, "threshold": 0.5, "query": "can"}

    # Second run: every mask comes from the cache, no model is loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("cached masks must not load the segmenter")

    monkeypatch.setattr("dreammix.segment.load_segmenter", no_model)
    again = load_source_examples(subject, "segment", segment)
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(examples, again))
    # An edited photo, or another threshold, is segmented again (only what changed).
    monkeypatch.undo()
    photo(99, (64, 48)).save(subject.image_dir / "02.png")
    calls = []
    real = load_segmenter

    def counting(spec, device=None):
        segmenter = real(spec, device)
        masks = segmenter.masks
        segmenter.masks = lambda images, queries: calls.append(len(images)) or masks(images, queries)
        return segmenter

    monkeypatch.setattr("dreammix.segment.load_segmenter", counting)
    edited = load_source_examples(subject, "segment", segment)
    assert calls == [1]
    np.testing.assert_array_equal(edited[2].mask, expected_mask(tiny_clipseg, photo(99, (64, 48)), "can", 0.5))
    stricter = SubjectMaskSegmenter(spec_for(tiny_clipseg, 0.7), "can", subject.image_dir, subject.name, tmp_path / "cache")
    load_source_examples(subject, "segment", stricter)
    assert calls == [1, 2]


def test_read_only_photo_folder_caches_in_the_cache_dir(tiny_clipseg, tmp_path, monkeypatch):
    subject = photo_subject(tmp_path, n=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    os.chmod(subject.image_dir, 0o555)
    try:
        if os.geteuid() == 0:  # root writes through permission bits: make the probe see a read-only folder
            probe = segmented_masks._can_write
            monkeypatch.setattr(segmented_masks, "_can_write",
                                lambda folder: not str(folder).startswith(str(subject.image_dir)) and probe(folder))
        segment = SubjectMaskSegmenter(spec_for(tiny_clipseg), "can", subject.image_dir, subject.name, tmp_path / "cache")
        examples = load_source_examples(subject, "segment", segment)
    finally:
        os.chmod(subject.image_dir, 0o755)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts) == before
    (folder,) = (tmp_path / "cache" / BESIDE_NAME).iterdir()
    assert folder.name.startswith("mug-") and sorted(p.name for p in folder.glob("*.png")) == ["00.png", "01.png"]
    for example in examples:
        np.testing.assert_array_equal(np.asarray(Image.open(folder / f"{example.path.stem}.png")) == 255, example.mask > 0)


def test_read_only_folders_of_one_subject_name_get_their_own_cache_folders(tmp_path, monkeypatch):
    """Two read-only photo folders of subjects both called "mug" must not share cached masks (photo
    stems like 00.png repeat); the same folder always maps to the same cache folder."""
    first, second = tmp_path / "a" / "photos", tmp_path / "b" / "photos"
    probe = segmented_masks._can_write
    monkeypatch.setattr(segmented_masks, "_can_write", lambda folder: "photos" not in folder.parts and probe(folder))
    cache = tmp_path / "cache"
    one, two = (segmented_masks.mask_cache_dir(d, "mug", cache) for d in (first, second))
    assert one != two and one.parent == two.parent == cache / BESIDE_NAME
    assert segmented_masks.mask_cache_dir(tmp_path / "a" / "x" / ".." / "photos", "mug", cache) == one


def test_an_empty_segmentation_warns_naming_the_photo_and_uses_the_whole_image(tmp_path):
    subject = photo_subject(tmp_path, n=2)

    def segment(paths, images):
        half = np.zeros((48, 64), np.float32)
        half[:, :32] = 1
        return [half if p.stem == "00" else np.zeros((48, 64), np.float32) for p in paths]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = load_source_examples(subject, "segment", segment)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and str(subject.image_dir / "01.png") in messages[0] and "empty mask" in messages[0]
    assert examples[0].mask.sum() == 48 * 32 and examples[1].mask.all()


def test_missing_mask_policy_is_checked_before_any_model_loads():
    from dreammix.data.datamodule import DataSpec

    with pytest.raises(DreamMixError, match=r"full\|error\|segment, got 'guess' \(data.missing_mask\)$"):
        DataSpec(source_prompt="a photo of sks can", missing_mask="guess")


def test_a_custom_subject_with_photos_only_trains_on_segmented_masks(compose, tmp_path, tiny_clipseg, tiny_model_dir,
                                                                      monkeypatch):
    """``subject=custom`` with no mask folder and ``data.missing_mask=segment``: the tiny CLIPSeg
    masks every photo, the masks are cached beside the photos, and training runs on them."""
    import dreammix.data.datamodule as datamodule
    from dreammix.train import train

    subject = photo_subject(tmp_path, n=2)
    encoded = []
    real_encode = datamodule.encode_examples
    monkeypatch.setattr(datamodule, "encode_examples",
                        lambda examples, *a, **k: encoded.append(examples) or real_encode(examples, *a, **k))
    cfg = compose("train", [
        "model=tiny", "segmenter=tiny", "logger=none", "subject=custom", "subject.name=mug", "subject.class_noun=can",
        f"subject.image_dir={subject.image_dir}", "data.missing_mask=segment", "loss.beta=0", f"run_dir={tmp_path / 'run'}",
        "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "validation.every_n_steps=0", "data.mask_variants=1", "data.mask_augmentation.dilate_prob=0",
        "data.mask_augmentation.box_prob=0",
    ])  # fmt: skip
    run = train(cfg)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((run / "lora" / "dreammix_run.json").read_text())["steps"] == 2
    (examples,) = encoded
    folder = subject.image_dir / BESIDE_NAME
    for example in examples:
        expected = expected_mask(tiny_clipseg, Image.open(example.path).convert("RGB"), "can", 0.5)
        np.testing.assert_array_equal(example.mask, expected.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(Image.open(folder / f"{example.path.stem}.png")) == 255, expected)


def test_bad_segmenter_settings_stop_training_before_the_model_loads(compose, tmp_path, monkeypatch):
    import dreammix.train as train_module

    subject = photo_subject(tmp_path, n=1)
    monkeypatch.setattr(train_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    cfg = compose("train", ["model=tiny", "segmenter=tiny", "logger=none", "subject=custom", "subject.name=mug",
                            "subject.class_noun=can", f"subject.image_dir={subject.image_dir}", f"run_dir={tmp_path / 'run'}",
                            "data.missing_mask=segment", "segmenter.threshold=1.5"])  # fmt: skip
    with pytest.raises(DreamMixError, match=r"got 1.5 \(segmenter.threshold\)$"):
        train_module.train(cfg)
    assert not (subject.image_dir / BESIDE_NAME).exists()
