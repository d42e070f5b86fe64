"""Source/regular data loading, the bad-input table, frozen-input caching and the datamodule."""

import json
import numpy as np
import pytest
import torch
from PIL import Image

from dreammix.data.datamodule import DataSpec, DreamMixDataModule, StepIndexedSampler
from dreammix.data.frozen import FrozenInputEncoder, encode_examples
from dreammix.data.regular import load_regular_examples
from dreammix.data.subjects import Subject, load_source_examples
from dreammix.errors import DreamMixError


def make_subject(root, n=3, size=64, mask_size=None):
    """n coloured squares with a centred object mask each."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 100, 200)).save(images / f"{i:02d}.jpg")
        m = np.zeros((mask_size or size,) * 2, np.uint8)
        q = (mask_size or size) // 4
        m[q : 3 * q, q : 3 * q] = 255
        Image.fromarray(m).save(masks / f"{i:02d}.png")
    return Subject(name="thing", class_noun="thing", image_dir=images, mask_dir=masks)


def make_regular(root, n=2, size=64):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (size, size), (0, 50 * i, 0)).save(root / "images" / f"{i:06d}.png")
        m = np.zeros((size, size), np.uint8)
        m[8:40, 8:40] = 255
        Image.fromarray(m).save(root / "masks" / f"{i:06d}.png")
        lines.append(json.dumps({"image": f"images/{i:06d}.png", "mask": f"masks/{i:06d}.png", "prompt": f"a red thing {i}", "seed": i}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ---- the bad-input table ----------------------------------------------------------------------

def test_missing_subject_dir(tmp_path):
    with pytest.raises(DreamMixError, match="image folder of subject 'x' not found") as err:
        load_source_examples(Subject("x", "x", tmp_path / "nope", None))
    assert "subject.image_dir" in str(err.value)


def test_corrupt_source_image_names_the_file(tmp_path):
    subject = make_subject(tmp_path)
    (subject.image_dir / "01.jpg").write_bytes(b"garbage")
    with pytest.raises(DreamMixError, match="cannot read image") as err:
        load_source_examples(subject)
    assert "01.jpg" in str(err.value)


def test_mask_size_mismatch_warns_and_resizes(tmp_path):
    subject = make_subject(tmp_path, n=1, size=64, mask_size=96)
    with pytest.warns(UserWarning, match="resizing the mask"):
        (example,) = load_source_examples(subject)
    # the 96-px mask's square [24, 72) scaled by 2/3 (nearest neighbour) is [16, 48): shape kept, not all-ones
    expected = np.zeros((64, 64), np.float32)
    expected[16:48, 16:48] = 1
    assert np.array_equal(np.asarray(example.mask), expected)


def test_empty_mask_is_an_error(tmp_path):
    subject = make_subject(tmp_path, n=2)
    Image.new("L", (64, 64), 0).save(subject.mask_dir / "01.png")
    with pytest.raises(DreamMixError, match="mask is empty") as err:
        load_source_examples(subject)
    assert "01.png" in str(err.value)


def test_missing_mask_falls_back_to_full_or_errors(tmp_path):
    subject = make_subject(tmp_path, n=2)
    (subject.mask_dir / "01.png").unlink()
    with pytest.warns(UserWarning, match="whole image"):
        examples = load_source_examples(subject, missing_mask="full")
    assert examples[1].mask.all()
    with pytest.raises(DreamMixError, match="no mask for 01.jpg"):
        load_source_examples(subject, missing_mask="error")
    with pytest.raises(DreamMixError, match="missing_mask must be"):
        load_source_examples(subject, missing_mask="guess")


def test_missing_mask_dir(tmp_path):
    subject = make_subject(tmp_path)
    with pytest.raises(DreamMixError, match="mask folder"):
        load_source_examples(Subject("t", "t", subject.image_dir, tmp_path / "no-masks"))


def test_regular_manifest_errors_name_file_and_line(tmp_path):
    root = make_regular(tmp_path / "reg")
    with open(root / "manifest.jsonl", "a") as f:
        f.write('{"image": "images/000000.png"}\n')
    with pytest.raises(DreamMixError, match=r"manifest.jsonl:3"):
        load_regular_examples(root)
    with pytest.raises(DreamMixError, match="manifest not found"):
        load_regular_examples(tmp_path / "nothing")


def test_regular_examples_load(tmp_path):
    examples = load_regular_examples(make_regular(tmp_path / "reg", n=3), limit=2)
    assert [e.prompt for e in examples] == ["a red thing 0", "a red thing 1"]
    assert examples[0].mask.sum() == 32 * 32


def test_real_dreambooth_subject_with_the_known_mask_defect(shared_data):
    root = shared_data / "dreambooth"
    subject = Subject("pink_sunglasses", "glasses", root / "images" / "pink_sunglasses", root / "masks" / "pink_sunglasses")
    with pytest.warns(UserWarning, match="05.png is 1440x1440 but its image is 1280x1280"):
        examples = load_source_examples(subject)
    assert all(e.mask.shape == (e.image.height, e.image.width) and e.mask.any() for e in examples)


# ---- caching and the datamodule -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline

    return load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))


def test_encode_examples_shapes_and_variants(tmp_path, tiny_pipe):
    examples = load_source_examples(make_subject(tmp_path, n=2))
    cached = encode_examples(examples, ["a photo of sks thing"], FrozenInputEncoder(tiny_pipe), 64, variants=3)
    assert len(cached) == 6
    item = cached[4]
    assert item["latents"].shape == (4, 8, 8) and item["masked_latents"].shape == (4, 8, 8)
    assert item["mask"].shape == (1, 8, 8) and item["prompt_embeds"].shape == (77, 64)
    assert item["pooled_embeds"].shape == (32,) and item["time_ids"].tolist() == [64, 64, 0, 0, 64, 64]
    assert cached.image_index.tolist() == [0, 0, 0, 1, 1, 1]
    # the mask of variant 0 is the given mask at latent resolution (centre 4x4 of 8x8)
    assert cached.masks[0, 0].sum() == 16


def test_step_indexed_sampler_is_resumable_and_reshuffles():
    import itertools

    full = list(itertools.islice(StepIndexedSampler(5, 2, seed=3), 20))
    assert [p for p, _ in full] == list(range(20))
    items = [i for _, i in full]
    assert sorted(items[:5]) == list(range(5)) and items[:5] != items[5:10]
    resumed = list(itertools.islice(StepIndexedSampler(5, 2, seed=3, start_batch=4), 12))
    assert resumed == full[8:]


def test_datamodule_batches_hold_source_and_regular(tmp_path, tiny_pipe):
    subject = make_subject(tmp_path / "s", n=2)
    reg = make_regular(tmp_path / "reg", n=3)
    spec = DataSpec(source_prompt="a photo of sks thing", regular_dir=str(reg), batch_size=2, regular_batch_size=1, mask_variants=2)
    dm = DreamMixDataModule(subject, spec, FrozenInputEncoder(tiny_pipe), 64, use_regular=True)
    dm.setup("fit")
    assert len(dm.source) == 4 and len(dm.regular) == 3
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(3)]
    batch = batches[1][0] if isinstance(batches[1], tuple) else batches[1]
    assert batch["source"]["latents"].shape == (2, 4, 8, 8)
    assert batch["source"]["position"].tolist() == [2, 3]  # stream positions, for exact resume
    assert batch["regular"]["prompt_embeds"].shape == (1, 77, 64)
    assert batch["regular"]["position"].tolist() == [1]
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert {k: set(v) for k, v in moved.items()} == {k: set(v) for k, v in batch.items()}
    assert all(t.is_meta for part in moved.values() for t in part.values())


def test_datamodule_without_regular_data_warns_or_errors(tmp_path, tiny_pipe):
    subject = make_subject(tmp_path / "s", n=1)
    spec = DataSpec(source_prompt="p", regular_dir=str(tmp_path / "none"), mask_variants=1)
    dm = DreamMixDataModule(subject, spec, FrozenInputEncoder(tiny_pipe), 64, use_regular=True)
    with pytest.warns(UserWarning, match="no regular data"):
        dm.setup("fit")
    assert dm.regular is None
    strict = DataSpec(source_prompt="p", regular_dir=str(tmp_path / "none"), mask_variants=1, require_regular=True)
    with pytest.raises(DreamMixError, match="python src/adm.py"):
        DreamMixDataModule(subject, strict, FrozenInputEncoder(tiny_pipe), 64, use_regular=True).setup("fit")


def test_square_crop_resize_takes_the_centre_square_of_any_aspect_ratio():
    """Training inputs: the centre square of the photo (offsets (w - s)/2, (h - s)/2 in whole
    pixels), resized bicubically to the resolution, in [-1, 1] as float32; the mask cropped by the
    same box, resized nearest and binary; SDXL time ids (size, crop 0 0, size) as float32."""
    from dreammix.data.frozen import square_crop_resize
    from dreammix.data.subjects import MaskedImage

    rng = np.random.default_rng(0)
    for (w, h), box in (((101, 60), (20, 0, 80, 60)), ((40, 75), (0, 17, 40, 57))):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.float32)
        mask[box[1] + 3 : box[1] + 20, box[0] + 5 : box[0] + 30] = 1  # inside the centre square
        mask[:4, : box[0]] = 1  # outside it (left margin, if any; a minority of the mask): must be cut away
        pixels, out_mask = square_crop_resize(MaskedImage(Image.fromarray(array), mask, None), 32)

        crop = Image.fromarray(array[box[1] : box[3], box[0] : box[2]])
        expected = np.asarray(crop.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
        assert pixels.dtype == torch.float32 and pixels.shape == (3, 32, 32)
        torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=1e-6)

        side = box[2] - box[0]
        src = (np.arange(32) * side / 32 + side / 64).astype(int)  # nearest-neighbour sample centres
        expected_mask = mask[box[1] : box[3], box[0] : box[2]][np.ix_(src, src)]
        assert out_mask.dtype == torch.float32
        assert torch.equal(out_mask, torch.from_numpy(expected_mask))

    ids = FrozenInputEncoder.time_ids(64)
    assert ids.dtype == torch.float32 and ids.tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
