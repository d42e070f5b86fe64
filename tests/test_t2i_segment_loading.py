"""ADM t2i_segment's models by their hub ids, as on a user's machine: a Hugging Face cache in the
real repositories' layout (``tests/hub_cache.py``) under a fresh ``HF_HOME``, ``HF_HUB_OFFLINE=1``.

- ``stabilityai/stable-diffusion-xl-base-1.0`` (``model=sdxl_inpaint``'s t2i base): diffusers
  folders with every weight file twice, ``*.fp16.safetensors`` holding the tiny base and the fp32
  files other weights; ``t2i_variant: fp16`` must pick the former, into bf16, VAE in fp32.
- ``frankjoshua/juggernautXL_v8Rundiffusion`` (``model=fooocus``): its own base is its t2i base,
  the default files at the revision the model config pins.
- ``CIDAS/clipseg-rd64-refined`` (``segmenter=clipseg``): ``config.json``, the 352-px
  ``preprocessor_config.json`` of the real repo, the CLIP tokenizer files and ``model.safetensors``;
  an older commit holds other weights (``segmenter.revision``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hub_cache as hc
from conftest import REPO_ROOT

T2I_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
T2I_COMMIT = "462165984030d82259a11f4367a4eed129e94a7b"
CLIPSEG_REPO = "CIDAS/clipseg-rd64-refined"
CLIPSEG_COMMIT = "583b388deb98a04feb3e1f816dcdb8f3062ee205"
CLIPSEG_OLD_COMMIT = "91cddba6f4fe69cb778f7224fc493e07e500d728"
UNCACHED = "someone/not-in-the-cache"
#: The real repo's preprocessor_config.json (ViT image processor, 352 px, ImageNet statistics).
CLIPSEG_PREPROCESSOR = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "feature_extractor_type": "ViTImageProcessor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "processor_class": "CLIPSegProcessor",
    "resample": 2, "rescale_factor": 0.00392156862745098, "size": {"height": 352, "width": 352},
}  # fmt: skip
CASES = {
    "sdxl_inpaint": ["model=sdxl_inpaint", "model.weight_dtype=bfloat16"],
    "fooocus": ["model=fooocus", "model.weight_dtype=bfloat16"],
    "fooocus_old": ["model=fooocus", "model.weight_dtype=bfloat16", f"model.revision={hc.BASE_OLD_COMMIT}"],
    "clipseg": [],
    "clipseg_old": [f"segmenter.revision={CLIPSEG_OLD_COMMIT}"],
    "t2i_uncached": ["model=sdxl_inpaint", f"model.t2i_pretrained={UNCACHED}"],
    "clipseg_uncached": [f"segmenter.pretrained={UNCACHED}"],
}  # fmt: skip


def clipseg_repo_files(src: Path, out: Path, seed: int) -> dict[str, Path]:
    """The real CLIPSeg repo's files from the saved tiny model ``src``; ``seed`` > 0: other weights."""
    from dreammix.models.tiny import tokenizer_vocab_and_merges

    out.mkdir(parents=True)
    vocab, merges = tokenizer_vocab_and_merges()
    files = {
        "config.json": json.dumps(json.loads((src / "config.json").read_text())),
        "preprocessor_config.json": json.dumps(CLIPSEG_PREPROCESSOR),
        "vocab.json": json.dumps(vocab),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                                             "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                             "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
        "special_tokens_map.json": json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
    }  # fmt: skip
    paths = {}
    for name, text in files.items():
        (out / name).write_text(text)
        paths[name] = out / name
    weights = load_file(str(src / "model.safetensors"))
    paths["model.safetensors"] = hc._save(hc.other_weights(weights, seed) if seed else weights, out / "model.safetensors")
    return paths


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir, _session_cache):
    from dreammix.models.fooocus import ensure_tiny_fooocus
    from dreammix.models.tiny_adm import ensure_tiny_clipseg
    from test_default_loading import _env

    root = tmp_path_factory.mktemp("t2i-segment-loading")
    hf_home, work = root / "hf-home", root / "work"
    base, fooocus = ensure_tiny_fooocus(_session_cache / "tiny-sdxl-base", _session_cache / "tiny-fooocus-inpaint")
    hc.build_hub_cache(hf_home, work, tiny_model_dir, base, fooocus)
    hub = hf_home / "hub"
    hc.write_repo(hub, T2I_REPO, T2I_COMMIT, hc.diffusers_repo_files(base, work / "t2i", fp16_holds_src=True, seed=500))
    clipseg = ensure_tiny_clipseg(_session_cache / "tiny-clipseg")
    hc.write_repo(hub, CLIPSEG_REPO, CLIPSEG_COMMIT, clipseg_repo_files(clipseg, work / "clipseg", 0))
    hc.write_repo(hub, CLIPSEG_REPO, CLIPSEG_OLD_COMMIT, clipseg_repo_files(clipseg, work / "clipseg-old", 600), main=False)
    probe = subprocess.run([sys.executable, __file__, str(root / "report.pt"), json.dumps(CASES)], cwd=root,
                           env=_env(hf_home), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-4000:]
    return {"hf_home": hf_home, **torch.load(root / "report.pt", weights_only=True)}


def _loaded(report, case):
    entry = report[case]
    assert "error" not in entry, f"{case} did not load: {entry.get('traceback')}"
    return entry


@pytest.mark.slow  # ~20 s: a subprocess that imports torch/diffusers/transformers, plus the cache
def test_sdxl_inpaint_t2i_base_loads_the_fp16_variant_of_the_sdxl_base_as_bf16(report):
    from test_default_loading import _assert_bf16_copy_of, _assert_fp32_near, _files, _weight_name

    entry, hf_home = _loaded(report, "sdxl_inpaint"), report["hf_home"]
    assert entry["class"] == "StableDiffusionXLPipeline" and entry["in_channels"] == 4
    assert entry["unet_dtypes"] == entry["text_encoder_dtypes"] == ["torch.bfloat16"] and entry["vae_dtypes"] == ["torch.float32"]
    for part in ("unet", "text_encoder", "text_encoder_2"):
        fp16, fp32 = _files(hf_home, T2I_REPO, T2I_COMMIT, part, _weight_name(part))
        _assert_bf16_copy_of(entry[part], fp16, fp32, part)
    fp16, fp32 = _files(hf_home, T2I_REPO, T2I_COMMIT, "vae", _weight_name("vae"))
    _assert_fp32_near(entry["vae"], fp16, fp32, "vae")


@pytest.mark.slow
@pytest.mark.parametrize("case,commit", [("fooocus", hc.BASE_COMMIT), ("fooocus_old", hc.BASE_OLD_COMMIT)])
def test_fooocus_t2i_base_is_its_own_sdxl_base_at_the_pinned_revision(report, case, commit):
    """No Fooocus patch, no head: the plain base UNet (default files, variant null) at model.revision."""
    from test_default_loading import _assert_bf16_copy_of, _files, _weight_name

    entry = _loaded(report, case)
    assert entry["class"] == "StableDiffusionXLPipeline" and entry["in_channels"] == 4
    fp16, fp32 = _files(report["hf_home"], hc.BASE_REPO, commit, "unet", _weight_name("unet"))
    _assert_bf16_copy_of(entry["unet"], fp32, fp16, "unet")


@pytest.mark.slow
@pytest.mark.parametrize("case,commit", [("clipseg", CLIPSEG_COMMIT), ("clipseg_old", CLIPSEG_OLD_COMMIT)])
def test_clipseg_loads_by_hub_id_at_the_revision_and_segments_at_352_px(report, case, commit):
    entry = _loaded(report, case)
    files = hc.snapshot(report["hf_home"], CLIPSEG_REPO, commit)
    weights = load_file(str(files / "model.safetensors"))
    assert set(weights) <= set(entry["model"])
    for key, value in weights.items():
        assert torch.equal(entry["model"][key], value), key
    assert entry["pixel_values_shape"] == [1, 3, 352, 352]  # the repo's preprocessor, not the tiny one's 32 px
    assert entry["mask_shape"] == [48, 64]


@pytest.mark.slow
@pytest.mark.parametrize("case,key", [("t2i_uncached", "model.t2i_pretrained"), ("clipseg_uncached", "segmenter.pretrained")])
def test_a_model_missing_from_the_cache_is_a_dreammix_error_naming_the_key(report, case, key):
    entry = report[case]
    assert entry.get("type") == "DreamMixError", entry
    assert entry["error"].endswith(f"({key})") and UNCACHED in entry["error"] and "\n" not in entry["error"]


def probe(out: str, cases: dict[str, list[str]]) -> None:
    """Load each case as ``src/adm.py`` does and save what the tests look at."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from dreammix.adm_t2i import load_t2i_pipeline
    from dreammix.segment import SegmenterSpec, load_segmenter

    report = {}
    for name, overrides in cases.items():
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="adm", overrides=overrides)
        try:
            if name.startswith("clipseg"):
                segmenter = load_segmenter(SegmenterSpec.from_config(cfg.segmenter), "cpu")
                image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
                inputs = segmenter.processor(text=["can"], images=[image], return_tensors="pt")
                report[name] = {"model": {k: v.clone() for k, v in segmenter.model.state_dict().items()},
                                "pixel_values_shape": list(inputs["pixel_values"].shape),
                                "mask_shape": list(segmenter.masks([image], ["can"])[0].shape)}  # fmt: skip
                continue
            pipe = load_t2i_pipeline(cfg.model, torch.bfloat16)
        except Exception as exc:  # reported, so that each test sees its own case fail
            report[name] = {"error": str(exc), "type": type(exc).__name__, "traceback": traceback.format_exc()}
            continue
        entry = {"class": type(pipe).__name__, "in_channels": int(pipe.unet.config.in_channels)}
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, part)
            entry[part] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            entry[part + "_dtypes"] = sorted({str(p.dtype) for p in module.parameters()})
        report[name] = entry
    torch.save(report, out)


if __name__ == "__main__":
    probe(sys.argv[1], json.loads(sys.argv[2]))
