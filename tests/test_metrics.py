"""Benchmark metrics against hand computations, on tiny random models of the real classes.

CLIP and DINO use tiny random ``CLIPModel`` / ``ViTModel`` saved and reloaded through
``from_pretrained`` (the production path); FID uses torch-fidelity's statistics and Fréchet
distance, checked against closed forms and an eigen-decomposition computed here, plus a random
InceptionV3 state dict loaded from a local file (no download).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dreammix.errors import DreamMixError
from dreammix.metrics.clip import ClipScorer, projected_embeds, strip_identifier
from dreammix.metrics.common import FeatureCache, crop_region, mask_box, mean_cosine, square_box
from dreammix.metrics.dino import IMAGENET_MEAN, IMAGENET_STD, DinoScorer, dino_transform
from dreammix.metrics.fid import (
    ColorStatsExtractor,
    InceptionExtractor,
    compute_fid,
    feature_statistics,
    fid_from_config,
    frechet_distance,
    reference_statistics,
)
from dreammix.metrics.suite import SCORE_KEYS, MetricSuite
from dreammix.metrics.tiny import ensure_tiny_clip, ensure_tiny_dino


def random_image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-metrics")
    return ensure_tiny_clip(root / "clip"), ensure_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def clip(tiny_dirs):
    return ClipScorer.from_pretrained(str(tiny_dirs[0]), device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def dino(tiny_dirs):
    return DinoScorer.from_pretrained(str(tiny_dirs[1]), resize=36, crop=32, device="cpu", batch_size=2)


@pytest.fixture
def reference_files(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"ref{i}.png"
        random_image(100 + i, (40 + 8 * i, 44)).save(path)
        paths.append(path)
    return paths


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# OpenAI CLIP's normalisation constants (the CLIP paper's repository), written out here on purpose.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def normalized_tensor(arr: np.ndarray, mean, std) -> torch.Tensor:
    arr = (arr.astype(np.float32) / 255.0 - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


def hand_dino_pixels(im: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """DreamBooth's DINO input by hand: shorter side to ``resize`` (longer one scaled, truncated),
    PIL bicubic; centre crop ``crop``; ImageNet mean/std (written out, not imported)."""
    w, h = im.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    im = im.resize(size, Image.BICUBIC)
    left, top = int(round((im.width - crop) / 2.0)), int(round((im.height - crop) / 2.0))
    arr = np.asarray(im.crop((left, top, left + crop, top + crop)))
    return normalized_tensor(arr, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def test_strip_identifier():
    assert strip_identifier("a sks red can") == "a red can"
    assert strip_identifier("a photo of sks dog") == "a photo of dog"
    assert strip_identifier("Sks can, sks") == "can,"
    assert strip_identifier("a sksx can") == "a sksx can"  # whole words only


def test_square_box_hand_cases():
    assert square_box((10, 20, 30, 60), 100, 100) == (0, 20, 40, 60)  # 40x40 square, shifted in at the left
    assert square_box((40, 40, 60, 50), 100, 100) == (40, 35, 60, 55)  # centred
    assert square_box((90, 0, 100, 30), 100, 100) == (70, 0, 100, 30)  # shifted in at the right
    assert square_box((0, 0, 100, 20), 100, 50) == (0, 0, 100, 50)  # taller than the image: clipped
    image = random_image(0, (100, 100))
    assert crop_region(image, (40, 40, 60, 50)).size == (20, 20)
    with pytest.raises(DreamMixError):
        square_box((5, 5, 5, 9), 10, 10)


def test_mask_box_is_the_tight_box_of_nonzero_pixels():
    """The crop scores' box is the mask's bounding box, end-exclusive (x0, y0, x1, y1)."""
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[3:7, 2:9] = 255
    mask[8, 5] = 1
    assert mask_box(mask) == (2, 3, 9, 9)
    assert mask_box(np.eye(4, dtype=bool)[None][0]) == (0, 0, 4, 4)
    one = np.zeros((5, 5))
    one[2, 4] = 0.5
    assert mask_box(one) == (4, 2, 5, 3)  # a single pixel is a 1x1 box
    with pytest.raises(DreamMixError, match="empty"):
        mask_box(np.zeros((4, 4)))


def test_mean_cosine_hand():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    refs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = [(1 + 1 / np.sqrt(2)) / 2, (0 + 1 / np.sqrt(2)) / 2]
    assert torch.allclose(mean_cosine(features, refs), torch.tensor(expected, dtype=torch.float32))


def test_projected_embeds_accepts_tensor_and_model_outputs():
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

    x = torch.randn(2, 4)
    assert projected_embeds(x, "image") is x
    assert projected_embeds(BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 4), pooler_output=x), "image") is x
    assert projected_embeds(CLIPVisionModelOutput(image_embeds=x), "image") is x
    with pytest.raises(TypeError):
        projected_embeds(object(), "image")


# ------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------


def test_clip_embeddings_match_independent_preprocessing_and_tokens(clip, tiny_dirs):
    """CLIP-I/CLIP-T inputs built without the checkpoint's processor/tokenizer: the image is the
    shortest side to 32 (PIL bicubic), centre crop 32, OpenAI CLIP mean/std; the text is
    [bos] + one BPE token per known word + [eos] (truncated to CLIP's 77 positions), and the text
    embedding is the projection of the hidden state at the *eos* token."""
    from transformers import CLIPModel

    from dreammix.models.tiny import tokenizer_vocab_and_merges

    model = CLIPModel.from_pretrained(str(tiny_dirs[0])).eval()
    # 48x40 → 38x32 (int(48*32/40)), crop 3 px off the left/right: no rounding ambiguity.
    image = random_image(11, (48, 40))
    arr = np.asarray(image.resize((38, 32), Image.BICUBIC))[:, 3:35]
    pixels = normalized_tensor(arr, CLIP_MEAN, CLIP_STD)[None]
    vocab = tokenizer_vocab_and_merges()[0]

    def text_ids(words):
        return torch.tensor([[0] + [vocab[w + "</w>"] for w in words][:75] + [1]])

    with torch.no_grad():
        image_vec = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
        text_vecs = []
        for words in (["a", "red", "can"], ["a", "photo", "of", "red", "teapot"] * 20):
            ids = text_ids(words)
            hidden = model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            text_vecs.append(model.text_projection(hidden[0, -1]))  # the eos token (last position)
    # The processor's bicubic rounds a few pixels one 8-bit level away from PIL's: allow that only.
    processed = clip.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert (processed - pixels).abs().max().item() <= 1.01 / 255 / CLIP_STD.min()
    assert ((processed - pixels).abs() > 1e-4).float().mean().item() < 0.01
    got_image = clip.encode_images([image])[0]
    assert got_image.numpy() == pytest.approx((image_vec / image_vec.norm()).numpy(), abs=5e-4)
    long_prompt = " ".join(["a", "photo", "of", "sks", "red", "teapot"] * 20)  # 120 words: truncated
    got_texts = clip.encode_texts(["a red can", long_prompt.replace(" sks", "")])
    for got, vec in zip(got_texts, text_vecs):
        assert got.numpy() == pytest.approx((vec / vec.norm()).numpy(), abs=1e-5)
    expected_t = [cosine(image_vec.numpy(), t.numpy()) for t in text_vecs]
    got_t = clip.clip_t([image, image], ["a sks red can", long_prompt])
    assert got_t.numpy() == pytest.approx(expected_t, abs=5e-4)


def test_clip_and_dino_scorers_use_their_arguments(tiny_dirs, tmp_path, monkeypatch):
    """Device, batch size, preprocessing and cache folder are the ones asked for: an explicit cpu is
    kept even where CUDA is available, models are frozen in eval mode, DINO has no pooler (like
    the checkpoints), and each scorer caches under its own ``clip-``/``dino-`` folder whose key
    changes with the DINO preprocessing (a changed resize never reads stale features)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    clip_s = ClipScorer.from_pretrained(str(tiny_dirs[0]), device="cpu", batch_size=3, cache_dir=tmp_path)
    dino_s = DinoScorer.from_pretrained(
        str(tiny_dirs[1]), resize=40, crop=30, device="cpu", batch_size=5, cache_dir=tmp_path
    )
    for scorer, batch_size, name in ((clip_s, 3, tiny_dirs[0]), (dino_s, 5, tiny_dirs[1])):
        assert scorer.device == torch.device("cpu") and scorer.batch_size == batch_size
        assert scorer.name == str(name)
        assert not scorer.model.training
        assert all(p.device.type == "cpu" and not p.requires_grad for p in scorer.model.parameters())
    assert dino_s.model.pooler is None
    assert clip_s.cache.directory.parent == tmp_path and clip_s.cache.directory.name.startswith("clip-")
    assert dino_s.cache.directory.parent == tmp_path and dino_s.cache.directory.name.startswith("dino-")
    image = random_image(12, (64, 48))
    assert torch.allclose(dino_s.transform(image), hand_dino_pixels(image, 40, 30), atol=1e-6)
    other = DinoScorer.from_pretrained(str(tiny_dirs[1]), resize=36, crop=30, device="cpu", cache_dir=tmp_path)
    assert other.cache.model_key != dino_s.cache.model_key


def test_scorer_defaults_are_the_dreambooth_protocol(tiny_dirs, monkeypatch):
    """Without arguments: device ``auto`` (cpu here), batches of 32, no disk cache, and DINO's
    DreamBooth preprocessing Resize(256, bicubic) → CenterCrop(224) → ImageNet mean/std."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = random_image(13, (64, 48))
    expected = hand_dino_pixels(image, 256, 224)
    assert torch.allclose(dino_transform()(image), expected, atol=1e-6)
    clip_s = ClipScorer.from_pretrained(str(tiny_dirs[0]))
    dino_s = DinoScorer.from_pretrained(str(tiny_dirs[1]))
    direct = [ClipScorer(clip_s.model, clip_s.image_processor, clip_s.tokenizer), DinoScorer(dino_s.model)]
    for scorer in [clip_s, dino_s, *direct]:
        assert scorer.device == torch.device("cpu") and scorer.batch_size == 32
        assert scorer.cache.directory is None
    for scorer in (dino_s, direct[1]):
        assert torch.allclose(scorer.transform(image), expected, atol=1e-6)


def test_model_load_errors_name_the_missing_part(tiny_dirs, tmp_path):
    """A wrong model folder fails with one line naming what could not be loaded."""
    import shutil

    with pytest.raises(DreamMixError, match="cannot load CLIP model"):
        ClipScorer.from_pretrained(str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(DreamMixError, match="cannot load DINO ViT model"):
        DinoScorer.from_pretrained(str(tmp_path / "nowhere"), device="cpu")
    partial = tmp_path / "clip-without-processor"
    shutil.copytree(tiny_dirs[0], partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(DreamMixError, match="cannot load CLIP image processor"):
        ClipScorer.from_pretrained(str(partial), device="cpu")
    # transformers 5 builds a specials-only tokenizer from a folder without tokenizer files: refused
    no_tokenizer = tmp_path / "clip-without-tokenizer"
    shutil.copytree(tiny_dirs[0], no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(DreamMixError, match="no CLIP tokenizer files"):
        ClipScorer.from_pretrained(str(no_tokenizer), device="cpu")


def test_tiny_models_are_deterministic_reusable_and_poolerless(tiny_dirs, tmp_path):
    """``ensure_tiny_*`` default to seed 0 (the same weights on every machine), keep a complete
    folder instead of rebuilding it, and save the ViT without a pooler (like facebook/dino-vits16)."""
    from safetensors import safe_open

    for ensure, built in ((ensure_tiny_clip, tiny_dirs[0]), (ensure_tiny_dino, tiny_dirs[1])):
        mtime = (built / "model.safetensors").stat().st_mtime_ns
        assert ensure(built) == built and (built / "model.safetensors").stat().st_mtime_ns == mtime
        again = ensure(tmp_path / f"{ensure.__name__}-seed0", seed=0)
        other = ensure(tmp_path / f"{ensure.__name__}-seed1", seed=1)
        with safe_open(built / "model.safetensors", "pt") as a, safe_open(again / "model.safetensors", "pt") as b, \
                safe_open(other / "model.safetensors", "pt") as c:
            keys = sorted(a.keys())
            assert keys == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)
            assert not all(torch.equal(a.get_tensor(k), c.get_tensor(k)) for k in keys)
            if ensure is ensure_tiny_dino:
                assert not [k for k in keys if "pooler" in k]


def test_clip_identical_images_score_one(clip, reference_files):
    image = Image.open(reference_files[0]).convert("RGB")
    assert clip.clip_i([image], reference_files[:1]).item() == pytest.approx(1.0, abs=1e-5)


def test_clip_i_and_clip_t_match_a_hand_computation(clip, tiny_dirs, reference_files):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(tiny_dirs[0])).eval()
    processor = CLIPImageProcessor.from_pretrained(str(tiny_dirs[0]))
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_dirs[0]))
    images = [random_image(1), random_image(2, (30, 60))]
    refs = [Image.open(p).convert("RGB") for p in reference_files]

    def image_vec(im):
        with torch.no_grad():
            out = model.vision_model(pixel_values=processor(images=[im], return_tensors="pt")["pixel_values"])
            return model.visual_projection(out.pooler_output)[0].numpy()

    def text_vec(text):
        with torch.no_grad():
            ids = tokenizer([text], return_tensors="pt")
            out = model.text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
            return model.text_projection(out.pooler_output)[0].numpy()

    expected_i = [np.mean([cosine(image_vec(im), image_vec(r)) for r in refs]) for im in images]
    got_i = clip.clip_i(images, reference_files)
    assert got_i.numpy() == pytest.approx(expected_i, abs=1e-5)

    prompts = ["a sks red can", "a photo of sks dog"]
    expected_t = [cosine(image_vec(im), text_vec(t)) for im, t in zip(images, ["a red can", "a photo of dog"])]
    assert clip.clip_t(images, prompts).numpy() == pytest.approx(expected_t, abs=1e-5)
    # Raw cosine: may be negative, never rescaled.
    assert all(-1.0 <= v <= 1.0 for v in expected_t)
    with pytest.raises(DreamMixError, match="prompts"):
        clip.clip_t(images, prompts[:1])


def test_reference_features_are_cached_per_image(tiny_dirs, reference_files, tmp_path):
    cache_dir = tmp_path / "cache"
    scorer = ClipScorer.from_pretrained(str(tiny_dirs[0]), device="cpu", cache_dir=cache_dir)
    calls = []
    original = scorer.encode_images

    def counting(images):
        calls.append(len(images))
        return original(images)

    scorer.encode_images = counting
    first = scorer.reference_features(reference_files)
    second = scorer.reference_features(reference_files[::-1])
    assert calls == [3]  # one batched computation, then memory hits
    assert (scorer.cache.misses, scorer.cache.hits) == (3, 3)
    assert torch.equal(second, first.flip(0))
    files = list(cache_dir.rglob("*.npy"))
    assert len(files) == 3
    # A new scorer (new process) reads the disk cache; a changed file is recomputed.
    fresh = ClipScorer.from_pretrained(str(tiny_dirs[0]), device="cpu", cache_dir=cache_dir)
    fresh_calls = []
    fresh_original = fresh.encode_images
    fresh.encode_images = lambda ims: (fresh_calls.append(len(ims)), fresh_original(ims))[1]
    assert torch.allclose(fresh.reference_features(reference_files), first)
    assert fresh_calls == [] and fresh.cache.hits == 3
    random_image(999).save(reference_files[1])
    fresh.reference_features(reference_files)
    assert fresh_calls == [1]
    with pytest.raises(DreamMixError, match="not found"):
        fresh.reference_features([tmp_path / "missing.png"])


def test_feature_cache_keys_on_model(tmp_path, reference_files):
    a = FeatureCache("model-a", tmp_path)
    b = FeatureCache("model-b", tmp_path)
    a.features(reference_files[:1], lambda paths: torch.ones(len(paths), 2))
    assert torch.equal(b.features(reference_files[:1], lambda paths: torch.zeros(len(paths), 2)), torch.zeros(1, 2))


# ------------------------------------------------------------------------------------------------
# DINO
# ------------------------------------------------------------------------------------------------


def test_dino_identical_images_score_one(dino, reference_files):
    image = Image.open(reference_files[2]).convert("RGB")
    assert dino.dino([image], reference_files[2:]).item() == pytest.approx(1.0, abs=1e-5)


def test_dino_matches_a_hand_computation(dino, tiny_dirs, reference_files):
    from transformers import ViTModel

    model = ViTModel.from_pretrained(str(tiny_dirs[1]), add_pooling_layer=False).eval()

    def preprocess(im: Image.Image) -> torch.Tensor:
        # Shorter side to 36 (the longer one scaled and truncated, as torchvision does), bicubic;
        # centre crop 32; ImageNet normalisation.
        w, h = im.size
        size = (36, int(36 * h / w)) if w <= h else (int(36 * w / h), 36)
        im = im.resize(size, Image.BICUBIC)
        left, top = int(round((im.width - 32) / 2.0)), int(round((im.height - 32) / 2.0))
        arr = np.asarray(im.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
        arr = (arr - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)

    def cls(im):
        with torch.no_grad():
            return model(pixel_values=preprocess(im)[None]).last_hidden_state[0, 0].numpy()

    images = [random_image(5, (64, 48)), random_image(6, (48, 48))]
    refs = [Image.open(p).convert("RGB") for p in reference_files]
    expected = [np.mean([cosine(cls(im), cls(r)) for r in refs]) for im in images]
    assert dino.dino(images, reference_files).numpy() == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# Crop + full scores together
# ------------------------------------------------------------------------------------------------


def test_metric_suite_scores_crop_and_full(clip, dino, reference_files):
    suite = MetricSuite(clip=clip, dino=dino)
    reference = Image.open(reference_files[0]).convert("RGB")
    w, h = reference.size
    scores = suite.score(
        [reference, random_image(3)], [(0, 0, w, h), (5, 5, 20, 30)], ["a sks can", "a red sks can"], reference_files[:1]
    )
    assert [set(s) for s in scores] == [set(SCORE_KEYS)] * 2
    # The generated image *is* the reference: full-image CLIP-I and DINO are 1.
    assert scores[0]["clip_i_full"] == pytest.approx(1.0, abs=1e-5)
    assert scores[0]["dino_full"] == pytest.approx(1.0, abs=1e-5)
    crop = crop_region(random_image(3), (5, 5, 20, 30))
    assert scores[1]["clip_i"] == pytest.approx(clip.clip_i([crop], reference_files[:1]).item(), abs=1e-5)
    assert scores[1]["clip_t"] == pytest.approx(clip.clip_t([crop], ["a red can"], identifier="").item(), abs=1e-5)


def test_crop_scores_are_computed_on_the_crop(clip, dino, tmp_path):
    """The table values (``clip_i``, ``dino``, ``clip_t``) score the square around the inpainted box,
    not the whole image: a generated image that holds the reference exactly inside the box and
    noise elsewhere scores 1 on the crop and less on the full image; with ``crop_scale`` the crop
    is the enlarged square, cut here by hand (PIL) and scored on its own."""
    ref = random_image(50, (24, 24))
    ref_path = tmp_path / "ref.png"
    ref.save(ref_path)
    generated = random_image(51, (64, 56))
    generated.paste(ref, (20, 16))  # the mask box is (20, 16, 44, 40): square, inside the image
    box = (20, 16, 44, 40)
    (plain,) = MetricSuite(clip=clip, dino=dino).score([generated], [box], ["a sks can"], [ref_path])
    assert plain["dino"] == pytest.approx(1.0, abs=1e-5) and plain["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert plain["dino_full"] < 0.99 and plain["clip_i_full"] < 0.99
    # crop_scale 1.5: a 36-px square centred on the box (32, 28) → (14, 10, 50, 46)
    (wide,) = MetricSuite(clip=clip, dino=dino, crop_scale=1.5).score([generated], [box], ["a sks can"], [ref_path])
    full, enlarged = dino.dino([generated, generated.crop((14, 10, 50, 46))], [ref_path]).tolist()
    assert plain["dino_full"] == pytest.approx(full, abs=1e-5) and wide["dino_full"] == pytest.approx(full, abs=1e-5)
    assert wide["dino"] == pytest.approx(enlarged, abs=1e-5) and enlarged < 0.99


def test_metric_suite_from_tiny_config(tmp_path, compose, reference_files):
    """``metrics=tiny`` composes over the defaults and builds its models on first use."""
    cfg = compose("build_benchmark", ["+metrics=tiny", f"paths.cache_dir={tmp_path}", "metrics.device=cpu"])
    assert cfg.metrics.clip.model == f"{tmp_path}/tiny-clip" and cfg.metrics.fid.image_size == 299
    suite = MetricSuite.from_config(cfg.metrics)
    image = Image.open(reference_files[0]).convert("RGB")
    (score,) = suite.score([image], [(0, 0, image.width, image.height)], ["a sks can"], reference_files[:1])
    assert score["dino_full"] == pytest.approx(1.0, abs=1e-5)
    assert list((tmp_path / "metrics").rglob("*.npy"))  # reference features cached on disk
    with pytest.raises(DreamMixError, match="cannot load CLIP"):
        ClipScorer.from_pretrained(str(tmp_path / "nowhere"), device="cpu")


def test_metric_suite_from_config_passes_every_setting(tmp_path, compose, monkeypatch):
    """``metrics.*`` reaches the scorers (explicit cpu kept even where CUDA is available, batch size,
    DINO resize/crop, cache folder, identifier, crop scale); absent/null keys mean the documented
    defaults (crop_scale 1, memory-only cache); and without ``build_tiny`` a missing model folder is
    an error — random tiny models never silently stand in for real ones."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    base = ["+metrics=tiny", f"paths.cache_dir={tmp_path}", "metrics.device=cpu"]
    cfg = compose(
        "build_benchmark",
        base + ["metrics.batch_size=3", "metrics.identifier=zqx", "metrics.crop_scale=1.5", "metrics.dino.resize=40",
                "metrics.dino.crop=30"],
    )
    suite = MetricSuite.from_config(cfg.metrics)
    assert suite.identifier == "zqx" and suite.crop_scale == 1.5
    for scorer in (suite.clip, suite.dino):
        assert scorer.device == torch.device("cpu") and scorer.batch_size == 3
        assert scorer.cache.directory.parent == tmp_path / "metrics"
    image = random_image(14, (64, 48))
    assert torch.allclose(suite.dino.transform(image), hand_dino_pixels(image, 40, 30), atol=1e-6)
    plain = MetricSuite.from_config(
        compose("build_benchmark", base + ["metrics.cache_dir=null", "~metrics.crop_scale"]).metrics
    )
    assert plain.crop_scale == 1.0 and plain.identifier == "sks"
    assert plain.clip.cache.directory is None and plain.dino.cache.directory is None
    assert not (tmp_path / "None").exists()
    real = compose("build_benchmark", ["+metrics=default", "~metrics.build_tiny", "metrics.device=cpu",
                                       f"metrics.clip.model={tmp_path}/absent", f"paths.cache_dir={tmp_path}"])
    with pytest.raises(DreamMixError, match="cannot load CLIP model"):
        MetricSuite.from_config(real.metrics)
    assert not (tmp_path / "absent").exists()


# ------------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------------


def hand_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID via symmetric square roots: Tr sqrt(S1 S2) = Tr sqrt(sqrt(S1) S2 sqrt(S1))."""

    def sqrt_psd(m):
        vals, vecs = np.linalg.eigh(m)
        return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T

    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r = sqrt_psd(s1)
    inner = np.linalg.eigvalsh(r @ s2 @ r)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_hand_computations():
    rng = np.random.RandomState(0)
    x = rng.randn(200, 6) @ rng.randn(6, 6)
    y = rng.randn(150, 6) * 2.0 + 1.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, y) == pytest.approx(hand_fid(x, y), rel=1e-8)
    # y = a x + b (a > 0): mu_y = a mu_x + b, S_y = a^2 S_x, Tr sqrt(S_x S_y) = a Tr S_x, so
    # FID = |(a - 1) mu_x + b|^2 + (1 - a)^2 Tr(S_x), exactly.
    a, b = 3.0, 0.5
    shift = (a - 1) * x.mean(0) + b
    expected = shift @ shift + (1 - a) ** 2 * np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, a * x + b) == pytest.approx(expected, rel=1e-8)
    stats = feature_statistics(x)
    assert stats["mu"].shape == (6,) and stats["sigma"].shape == (6, 6)
    with pytest.raises(DreamMixError, match="at least 2"):
        frechet_distance(x[:1], x)


class ColorStats:
    """A tiny FID feature extractor: per-channel mean and std of the uint8 image (6-d)."""

    name = "color-stats"

    def __init__(self):
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        self.calls += 1
        x = images.float() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def write_images(folder, seeds, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for seed, size in zip(seeds, sizes):
        random_image(seed, size).save(folder / f"{seed:03d}.png")
    return folder


def test_fid_of_folders_with_a_tiny_extractor(tmp_path, compose):
    gen = write_images(tmp_path / "gen", range(6), [(64, 48), (40, 40), (30, 70), (64, 64), (50, 20), (33, 44)])
    ref = write_images(tmp_path / "ref", range(10, 18), [(64, 48)] * 8)
    extractor = ColorStats()
    assert compute_fid(gen, gen, extractor, image_size=32, device="cpu") == pytest.approx(0.0, abs=1e-9)

    # Hand computation: the same features by hand (PIL bicubic to 32x32, whole image).
    def feats(folder):
        rows = []
        for path in sorted(folder.glob("*.png")):
            arr = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.float64) / 255.0
            rows.append(np.concatenate([arr.mean((0, 1)), arr.std((0, 1), ddof=1)]))
        return np.array(rows)

    cache = tmp_path / "fid-cache"
    got = compute_fid(gen, ref, extractor, image_size=32, batch_size=4, device="cpu", cache_dir=cache)
    assert got == pytest.approx(hand_fid(feats(gen), feats(ref)), rel=1e-4)
    # The reference statistics were cached (.npz) and are reused without extracting again.
    assert len(list(cache.glob("ref-*.npz"))) == 1
    calls = extractor.calls
    again = compute_fid(gen, ref, extractor, image_size=32, batch_size=4, device="cpu", cache_dir=cache)
    assert again == pytest.approx(got, rel=1e-12)
    assert extractor.calls - calls == 2  # only the generated set (6 images, batches of 4)
    limited = reference_statistics(ref, extractor, image_size=32, device="cpu", limit=3, seed=0)
    assert limited["mu"].shape == (6,)
    with pytest.raises(DreamMixError, match="not found"):
        compute_fid(tmp_path / "nope", ref, extractor, device="cpu")
    # Through the config (decoding in a worker process); the default Inception file is checked.
    cfg = compose(
        "build_benchmark",
        ["+metrics=default", f"metrics.fid.reference_dir={ref}", "metrics.fid.image_size=32", "metrics.fid.cache_dir=null",
         "metrics.fid.num_workers=1", "metrics.device=cpu", f"paths.data_dir={tmp_path}/data"],
    )
    assert fid_from_config(cfg.metrics, gen, extractor=ColorStats()) == pytest.approx(got, rel=1e-9)
    with pytest.raises(DreamMixError, match="Inception weights not found"):
        fid_from_config(cfg.metrics, gen)


def test_color_stats_extractor_is_channel_mean_and_std():
    """The smoke-run FID feature: per-channel mean and (unbiased) std of the image in [0, 1]."""
    images = np.random.RandomState(3).randint(0, 256, (2, 3, 5, 7)).astype(np.uint8)
    x = images / 255.0
    expected = np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3), ddof=1)], axis=1)
    got = ColorStatsExtractor()(torch.from_numpy(images))
    assert ColorStatsExtractor.name == "color-stats"
    assert got.shape == (2, 6) and got.numpy() == pytest.approx(expected, abs=1e-6)


def test_fid_from_config_passes_every_fid_setting(tmp_path, compose, monkeypatch):
    """``metrics.fid.*`` reaches the computation: image size, batch size, the seeded reference
    sample (limit + seed), the statistics cache folder, worker count (absent → 0) and the explicit
    device (cpu kept where CUDA is available). The value equals compute_fid with the same explicit
    arguments, and differs from other seeds/limits, so each setting is observable."""
    gen = write_images(tmp_path / "gen", range(5), [(64, 48), (40, 40), (30, 70), (64, 64), (50, 20)])
    ref = write_images(tmp_path / "ref", range(10, 18), [(64, 48), (48, 48)] * 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    workers = []
    real_loader = torch.utils.data.DataLoader

    def spy_loader(*args, **kwargs):
        workers.append(kwargs.get("num_workers"))
        return real_loader(*args, **{**kwargs, "num_workers": 0})  # record, but decode in-process

    monkeypatch.setattr(torch.utils.data, "DataLoader", spy_loader)
    base = ["+metrics=default", f"metrics.fid.reference_dir={ref}", "metrics.fid.image_size=24", "metrics.device=cpu",
            f"paths.data_dir={tmp_path}/data"]
    cfg = compose("build_benchmark", base + ["metrics.fid.batch_size=4", "metrics.fid.reference_limit=3",
                                             "metrics.fid.seed=1", f"metrics.fid.cache_dir={tmp_path}/fid-cache",
                                             "metrics.fid.num_workers=2"])
    extractor = ColorStats()
    got = fid_from_config(cfg.metrics, gen, extractor=extractor)
    assert extractor.calls == 2 + 1  # 5 generated in batches of 4, then 3 reference images
    assert workers == [2, 2]
    assert len(list((tmp_path / "fid-cache").glob("ref-*.npz"))) == 1

    def explicit(**kwargs):
        return compute_fid(gen, ref, ColorStats(), image_size=24, device="cpu", **kwargs)

    assert got == pytest.approx(explicit(reference_limit=3, seed=1), rel=1e-9)
    assert got != pytest.approx(explicit(reference_limit=3, seed=0), rel=1e-3)
    assert got != pytest.approx(explicit(), rel=1e-3)
    assert got != pytest.approx(compute_fid(gen, ref, ColorStats(), image_size=32, device="cpu", reference_limit=3,
                                            seed=1), rel=1e-3)
    workers.clear()
    cfg = compose("build_benchmark", base + ["metrics.fid.cache_dir=null", "~metrics.fid.num_workers"])
    assert fid_from_config(cfg.metrics, gen, extractor=ColorStats()) == pytest.approx(explicit(), rel=1e-9)
    assert workers[0] == 0
    assert not (tmp_path / "None").exists()


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A random InceptionV3 state dict in torch-fidelity's layout, saved like the real file."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    mp = pytest.MonkeyPatch()
    mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})  # never download
    mp.setattr(cls, "load_state_dict", lambda self, *a, **k: None)
    try:
        torch.manual_seed(0)
        state = cls("inception-v3-compat", ["64"]).state_dict()
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(state, path)
    return path


def test_inception_fid_matches_torch_fidelity(tmp_path, random_inception_weights):
    """Our FID = torch_fidelity.calculate_metrics on the same (299x299) images and weights."""
    import torch_fidelity

    a = write_images(tmp_path / "a", range(3), [(299, 299)] * 3)
    b = write_images(tmp_path / "b", range(20, 23), [(299, 299)] * 3)
    extractor = InceptionExtractor(random_inception_weights, device="cpu", feature_layer="64")
    assert compute_fid(a, a, extractor, device="cpu") == pytest.approx(0.0, abs=1e-6)
    ours = compute_fid(a, b, extractor, device="cpu")
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, cuda=False, cache=False, verbose=False, save_cpu_ram=True,
        feature_extractor_weights_path=str(random_inception_weights), feature_layer_fid="64",
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_inception_weights_are_checked(tmp_path):
    with pytest.raises(DreamMixError, match="not found"):
        InceptionExtractor(tmp_path / "missing.pth", device="cpu")
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as handle:
        pickle.dump({"x": print}, handle, protocol=2)  # an arbitrary global: refused by weights_only
    with pytest.raises(DreamMixError, match="not a plain PyTorch state dict"):
        InceptionExtractor(evil, device="cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(DreamMixError, match="do not fit"):
        InceptionExtractor(wrong, device="cpu")


def test_inception_extractor_from_config(random_inception_weights, compose, tmp_path, monkeypatch):
    """``metrics.fid.inception_weights`` / ``feature_layer`` / ``device`` build the extractor: the
    configured layer (absent → the standard 2048-d pool features), the local file, an explicit cpu
    even where CUDA is available; ``inception_weights: null`` leaves the download to torch-fidelity
    (stubbed here with the same state dict)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = ["+metrics=default", "metrics.device=cpu", f"paths.data_dir={tmp_path}"]
    weights = f"metrics.fid.inception_weights={random_inception_weights}"
    for overrides, layer in (([weights, "metrics.fid.feature_layer='64'"], "64"), ([weights, "~metrics.fid.feature_layer"], "2048")):
        extractor = InceptionExtractor.from_config(compose("build_benchmark", base + overrides).metrics)
        assert extractor.name == f"inception-v3-compat-{layer}" and list(extractor.model.features_list) == [layer]
        assert extractor.device == torch.device("cpu")
        assert all(p.device.type == "cpu" for p in extractor.model.parameters())
    state = torch.load(random_inception_weights, weights_only=True)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: state)
    cfg = compose("build_benchmark", base + ["metrics.fid.inception_weights=null", "metrics.fid.feature_layer='192'"])
    assert InceptionExtractor.from_config(cfg.metrics).name == "inception-v3-compat-192"
