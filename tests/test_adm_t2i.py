"""ADM's text-to-image + segmentation route (adm.route=t2i_segment) on the tiny random models.

Expected images come from diffusers' own ``StableDiffusionXLPipeline`` called on the tiny base
with the attempt's seed; expected masks from the tiny CLIPSeg called through transformers.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreammix import adm as adm_module
from dreammix import adm_t2i
from dreammix.adm import read_manifest, run_adm
from dreammix.adm_t2i import SEED_STRIDE
from dreammix.data.regular import load_regular_examples
from dreammix.errors import DreamMixError
from test_segment import expected_mask

REPO = Path(__file__).resolve().parents[1]
NEGATIVE = "blurry, low quality"
ROUTE = ["model=tiny", "segmenter=tiny", "logger=none", "vlm=offline", "adm.route=t2i_segment", "adm.resolution=64",
         "adm.num_inference_steps=2", "adm.guidance_scale=2.0", f"adm.negative_prompt='{NEGATIVE}'"]  # fmt: skip
# guidance > 1: classifier-free guidance on, so the negative prompt shapes the images (at 1.0 diffusers ignores it)


def route_cfg(compose, tmp_path, *overrides):
    return compose("adm", [*ROUTE, f"adm.out_dir={tmp_path / 'regular'}", f"run_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="module")
def reference(_session_cache):
    """diffusers' SDXL text-to-image pipeline on the tiny base, one image per (prompt, seed)."""
    from diffusers import StableDiffusionXLPipeline

    from dreammix.models.tiny_adm import ensure_tiny_t2i

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_t2i(_session_cache / "tiny-sdxl-base"))
    pipe.set_progress_bar_config(disable=True)

    def image(prompt: str, seed: int) -> np.ndarray:
        out = pipe(prompt=prompt, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=2,
                   guidance_scale=2.0, generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip
        return np.asarray(out.convert("RGB"), dtype=np.int16)

    return image


def assert_same_image(path: Path, expected: np.ndarray) -> None:
    got = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2, "not the base's image for this prompt and seed"  # batch-1 vs batched


def test_route_writes_t2i_images_with_their_segmented_masks_and_resumes(compose, tmp_path, reference, monkeypatch):
    cfg = route_cfg(compose, tmp_path, "adm.num_prompts=3", "adm.batch_size=2", "adm.base_seed=10")
    out = run_adm(cfg)
    entries = read_manifest(out)
    assert [e["seed"] for e in entries] == [e["image_seed"] for e in entries] == [10, 11, 12]
    assert all(e["route"] == "t2i_segment" and e["dropped"] == 0 for e in entries)
    clipseg = Path(cfg.segmenter.pretrained)
    for entry in entries:
        assert_same_image(out / entry["image"], reference(entry["prompt"], entry["seed"]))
        image, mask = Image.open(out / entry["image"]).convert("RGB"), Image.open(out / entry["mask"])
        assert image.size == mask.size == (64, 64) and mask.mode == "L"
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) == {0, 255}
        np.testing.assert_array_equal(pixels == 255, expected_mask(clipseg, image, "can", 0.5))
        assert entry["mask_area"] == pytest.approx((pixels == 255).mean(), abs=1e-6)
    assert len(load_regular_examples(out)) == 3  # the training datamodule reads the set as it is
    assert not (out / "dropped.jsonl").exists()

    # A rerun loads nothing; the other route refuses to mix its items into this set.
    def no_model(*args, **kwargs):
        raise AssertionError("a finished set must not load a model")

    monkeypatch.setattr(adm_t2i, "load_t2i_pipeline", no_model)
    monkeypatch.setattr("dreammix.segment.load_segmenter", no_model)
    before = (out / "manifest.jsonl").read_text()
    run_adm(cfg)
    assert (out / "manifest.jsonl").read_text() == before
    with pytest.raises(DreamMixError, match="made with adm.route=t2i_segment, not inpaint"):
        run_adm(route_cfg(compose, tmp_path, "adm.num_prompts=4", "adm.base_seed=10", "adm.route=inpaint"))


def _forced(monkeypatch, empty: set[int], full: set[int]):
    """Load the real tiny base and CLIPSeg, but let the segmenter see no object in the images of
    the seeds in ``empty`` and an object covering everything in those of ``full``. Returns the
    seeds of every pipeline call."""
    from dreammix import segment

    calls: list[list[int]] = []
    load_pipe, load_seg = adm_t2i.load_t2i_pipeline, segment.load_segmenter

    class Recording:
        def __init__(self, pipe):
            self.pipe = pipe

        def to(self, device):
            self.pipe.to(device)
            return self

        def __call__(self, **kwargs):
            calls.append([g.initial_seed() for g in kwargs["generator"]])
            return self.pipe(**kwargs)

    def forced_segmenter(spec, device=None):
        segmenter = load_seg(spec, device)
        real = segmenter.masks

        def masks(images, queries):
            found = real(images, queries)
            return [np.zeros_like(m) if s in empty else np.ones_like(m) if s in full else m
                    for s, m in zip(calls[-1], found)]  # fmt: skip

        segmenter.masks = masks
        return segmenter

    monkeypatch.setattr(adm_t2i, "load_t2i_pipeline", lambda *a, **k: Recording(load_pipe(*a, **k)))
    monkeypatch.setattr(segment, "load_segmenter", forced_segmenter)
    return calls


def test_images_without_an_object_or_all_object_are_redone_with_the_next_seed(compose, tmp_path, reference,
                                                                               monkeypatch, caplog):
    s = SEED_STRIDE
    calls = _forced(monkeypatch, empty={11, 11 + s, 13}, full={12})
    common = ("adm.num_prompts=4", "adm.batch_size=4", "adm.base_seed=10")
    with caplog.at_level(logging.WARNING, logger="dreammix.adm_t2i"):
        out = run_adm(route_cfg(compose, tmp_path, *common, "adm.t2i_segment.max_attempts=2"))
    assert calls == [[10, 11, 12, 13], [11 + s, 12 + s, 13 + s]]
    entries = {e["seed"]: e for e in read_manifest(out)}
    assert sorted(entries) == [10, 12, 13]  # item 1: both attempts dropped, left out
    assert [(entries[k]["image_seed"], entries[k]["dropped"]) for k in (10, 12, 13)] == [(10, 0), (12 + s, 1), (13 + s, 1)]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["seed"], d["reason"]) for d in dropped] == [
        (1, 11, "no object"), (2, 12, "mask covers almost everything"), (3, 13, "no object"), (1, 11 + s, "no object")]
    assert [d["mask_area"] for d in dropped] == [0.0, 1.0, 0.0, 0.0]
    assert "items [1]" in caplog.text
    clipseg = Path(compose("adm", ROUTE).segmenter.pretrained)
    for entry in entries.values():  # the kept image is the retry seed's image, its mask that image's
        assert_same_image(out / entry["image"], reference(entry["prompt"], entry["image_seed"]))
        image = Image.open(out / entry["image"]).convert("RGB")
        np.testing.assert_array_equal(np.asarray(Image.open(out / entry["mask"])) == 255,
                                      expected_mask(clipseg, image, "can", 0.5))  # fmt: skip

    # Resumed with a third attempt allowed (after a kill cut dropped.jsonl's last line short): only
    # item 1 is made, with its third seed; no dropped attempt is redone.
    with open(out / "dropped.jsonl", "a") as handle:
        handle.write('{"index": 1, "se')
    calls.clear()
    run_adm(route_cfg(compose, tmp_path, *common, "adm.t2i_segment.max_attempts=3"))
    assert calls == [[11 + 2 * s]]
    entries = {e["seed"]: e for e in read_manifest(out)}
    assert (entries[11]["image_seed"], entries[11]["dropped"]) == (11 + 2 * s, 2)
    assert len((out / "dropped.jsonl").read_text().splitlines()) == 4
    assert_same_image(out / entries[11]["image"], reference(entries[11]["prompt"], 11 + 2 * s))
    kept = np.asarray(Image.open(out / entries[11]["image"]).convert("RGB"), dtype=np.int16)
    assert np.abs(kept - reference(entries[11]["prompt"], 11)).max() > 2  # the seed shows in the image

    # adm.overwrite=true removes the drop log with the rest of the set.
    monkeypatch.setattr(adm_module, "_generate", lambda *a, **k: None)
    run_adm(route_cfg(compose, tmp_path, *common, "adm.overwrite=true"))
    assert not (out / "dropped.jsonl").exists() and not (out / "manifest.jsonl").exists()


class _SeedPipe:
    """Stands in for the text-to-image pipeline: records each call's seeds (one image per seed)."""

    def __init__(self):
        self.seeds: list[list[int]] = []

    def __call__(self, *, prompt, generator, height, width, **kwargs):
        self.seeds.append([g.initial_seed() for g in generator])
        assert len(prompt) == len(generator)
        return type("Out", (), {"images": [Image.new("RGB", (width, height), (i, 0, 0)) for i in range(len(prompt))]})


class _AreaSegmenter:
    """A mask of exactly ``pixels[seed]`` object pixels for the image of each seed of the last call."""

    def __init__(self, pipe: _SeedPipe, pixels: dict[int, int]):
        self.pipe, self.pixels = pipe, pixels

    def masks(self, images, queries):
        assert queries == ["can"] * len(images)
        out = []
        for seed, image in zip(self.pipe.seeds[-1], images):
            mask = np.zeros(image.size[::-1], bool)
            mask.flat[: self.pixels[seed]] = True
            out.append(mask)
        return out


def test_drop_rules_are_strict_at_the_area_limits_and_used_up_items_stay_failed(tmp_path):
    """10×10 images: 1 pixel = area 0.01 = min_area (kept), 90 = max_area (kept), 91 and 0 dropped;
    a resumed run with the same attempts redoes nothing, another seed in the drop log is refused."""
    from dreammix.adm import RegularItem
    from dreammix.adm_t2i import T2ISegmentSpec, _plan_attempts, generate_t2i_segment_set

    s = SEED_STRIDE
    spec = T2ISegmentSpec(query="can", min_area=0.01, max_area=0.9, max_attempts=2)
    items = [RegularItem(i, f"a photo of a can {i}", 100 + i) for i in range(4)]
    pipe = _SeedPipe()
    segmenter = _AreaSegmenter(pipe, {100: 1, 101: 90, 102: 91, 102 + s: 0, 103: 0, 103 + s: 50})
    counts = generate_t2i_segment_set(pipe, segmenter, items, tmp_path, spec, resolution=10, batch_size=4, progress=False)
    assert pipe.seeds == [[100, 101, 102, 103], [102 + s, 103 + s]]
    assert counts == {"kept": 3, "dropped": 3, "failed": [2], "items": 3}
    got = [(e["seed"], e["image_seed"], e["dropped"], e["mask_area"]) for e in read_manifest(tmp_path)]
    assert got == [(100, 100, 0, 0.01), (101, 101, 0, 0.9), (103, 103 + s, 1, 0.5)]
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["seed"], d["reason"]) for d in dropped] == [
        (2, 102, "mask covers almost everything"), (3, 103, "no object"), (2, 102 + s, "no object")]

    again = generate_t2i_segment_set(pipe, segmenter, items, tmp_path, spec, resolution=10, progress=False)
    assert len(pipe.seeds) == 2 and again == {"kept": 0, "dropped": 0, "failed": [2], "items": 3}
    # an empty mask is never an object, even with min_area = 0
    assert T2ISegmentSpec(query="can", min_area=0.0).verdict(np.zeros((4, 4), bool)) == "no object"
    assert T2ISegmentSpec(query="can", min_area=0.0).verdict(np.eye(4, dtype=bool)) is None
    # the drop log belongs to these seeds: items with other seeds are refused, not silently mixed
    moved = [RegularItem(i, item.prompt, 200 + i) for i, item in enumerate(items)]
    with pytest.raises(DreamMixError, match="records other seeds or prompts for item 2"):
        _plan_attempts(moved, tmp_path, spec)


@pytest.mark.parametrize(
    "override,message",
    [("adm.t2i_segment.min_area=-0.1", r"must be in \[0, 1\), got -0.1 \(adm.t2i_segment.min_area\)"),
     ("adm.t2i_segment.max_area=1.5", r"got 1.5 \(adm.t2i_segment.max_area\)"),
     ("adm.t2i_segment.max_area=0.005", r"got 0.005 \(adm.t2i_segment.max_area\)"),
     ("adm.t2i_segment.max_attempts=0", r"must be >= 1, got 0 \(adm.t2i_segment.max_attempts\)"),
     ("segmenter.threshold=1.2", r"\(segmenter.threshold\)"),
     ("model=sdxl_arch", r"names no text-to-image SDXL base .*\(model.t2i_pretrained\)")],
)  # fmt: skip
def test_bad_route_settings_fail_before_anything_is_loaded_or_written(compose, tmp_path, override, message, monkeypatch):
    monkeypatch.setattr(adm_t2i, "load_t2i_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(DreamMixError, match=message):
        run_adm(route_cfg(compose, tmp_path, override))
    assert not (tmp_path / "regular").exists()


def test_unknown_route_is_one_error_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "adm.py"), "model=tiny", "logger=none", "vlm=offline", "adm.route=segment",
         f"adm.out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["error: must be one of inpaint|t2i_segment, got 'segment' (adm.route)"]
    assert not (tmp_path / "o").exists()


def test_model_configs_name_their_text_to_image_base(compose):
    """sdxl_inpaint has no text-to-image UNet of its own: the SDXL base by hub id (fp16 files);
    Fooocus' base *is* a text-to-image SDXL, so it is its own t2i base, at the same revision."""
    inpaint = compose("adm", ["model=sdxl_inpaint"]).model
    assert (inpaint.t2i_pretrained, inpaint.t2i_variant) == ("stabilityai/stable-diffusion-xl-base-1.0", "fp16")
    fooocus = compose("adm", ["model=fooocus", "model.revision=abc"]).model
    assert (fooocus.t2i_pretrained, fooocus.t2i_revision) == (fooocus.pretrained, "abc")
    assert compose("adm", []).segmenter.pretrained == "CIDAS/clipseg-rd64-refined"
    assert compose("adm", []).adm.route == "inpaint"
