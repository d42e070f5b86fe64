"""The default configs' loading path, as on a user's machine: hub ids resolved from a local Hugging
Face cache (``tests/hub_cache.py``, tiny weights in the real repositories' layout) with
``HF_HUB_OFFLINE=1``, in a fresh process whose ``HF_HOME`` points there (huggingface_hub reads it at
import). ``model=sdxl_inpaint`` must read the ``fp16`` variant files into bf16 weights with an fp32
VAE; ``model=fooocus`` must read the base's default files and fetch the Fooocus patch and head with
``hf_hub_download`` at the requested revisions. Expected values are read from the cache's files
and computed here (Fooocus's dequantization and LDM key names written out by hand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import hub_cache as hc
from conftest import REPO_ROOT

BF16 = torch.bfloat16
PRETRAINED_UNCACHED = "someone/not-in-the-cache"

#: A few Fooocus patch keys (LDM/SGM names) and the diffusers UNet weight each one patches, written
#: out for the tiny base (layers_per_block=1: input_blocks 1-2 = down block 0, 3 = down block 1;
#: output_blocks 0-1 = up block 0), independent of the converter the code uses.
LDM_TO_DIFFUSERS = {
    "input_blocks.0.0.weight": "conv_in.weight",
    "time_embed.0.weight": "time_embedding.linear_1.weight",
    "label_emb.0.0.weight": "add_embedding.linear_1.weight",
    "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
    "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
    "output_blocks.0.0.in_layers.2.weight": "up_blocks.0.resnets.0.conv1.weight",
    "out.2.weight": "conv_out.weight",
}

CASES = {
    "sdxl_inpaint": ["model=sdxl_inpaint", "model.weight_dtype=bfloat16"],
    "fooocus": ["model=fooocus", "model.weight_dtype=bfloat16"],
    "fooocus_old": ["model=fooocus", "model.weight_dtype=bfloat16", f"model.revision={hc.BASE_OLD_COMMIT}",
                    f"model.inpaint_revision={hc.FOOOCUS_OLD_COMMIT}"],
    "inpaint_uncached": ["model=sdxl_inpaint", f"model.pretrained={PRETRAINED_UNCACHED}"],
    "fooocus_uncached_base": ["model=fooocus", f"model.pretrained={PRETRAINED_UNCACHED}"],
    "fooocus_uncached_files": ["model=fooocus", f"model.inpaint_repo={PRETRAINED_UNCACHED}"],
}  # fmt: skip


def _env(hf_home) -> dict:
    """A user's environment: HF_HOME, offline; no other hub/cache variable of the test machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.pop("HYDRA_FULL_ERROR", None)
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p)
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "WANDB_MODE": "offline", "PYTHONPATH": pythonpath}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, _session_cache):
    """Both subprocesses, once: ``src/inpaint.py`` on an empty cache (started first, it runs while
    the cache is written) and the probe loading every case of :data:`CASES` from the full cache."""
    from PIL import Image

    from dreammix.models.fooocus import ensure_tiny_fooocus

    root = tmp_path_factory.mktemp("default-loading")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "room.png")
    Image.new("L", (64, 64), 255).save(root / "mask.png")
    (root / "empty-hf-home").mkdir()
    cli = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "src" / "inpaint.py"), f"image={root / 'room.png'}", f"mask={root / 'mask.png'}",
         "prompt=a sks red can", "model=sdxl_inpaint", f"hydra.run.dir={root / 'run'}"],
        cwd=root, env=_env(root / "empty-hf-home"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        hf_home = root / "hf-home"
        base, fooocus = ensure_tiny_fooocus(_session_cache / "tiny-sdxl-base", _session_cache / "tiny-fooocus-inpaint")
        hc.build_hub_cache(hf_home, root / "work", tiny_model_dir, base, fooocus)
        probe = subprocess.run(
            [sys.executable, str(REPO_ROOT / "tests" / "hub_cache.py"), str(root / "report.pt"), json.dumps(CASES)],
            cwd=root, env=_env(hf_home), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-4000:]
        _, cli_stderr = cli.communicate(timeout=600)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    report = torch.load(root / "report.pt", weights_only=True)
    return {"hf_home": hf_home, "report": report, "cli_rc": cli.returncode, "cli_stderr": cli_stderr}


def _loaded(runs, case: str) -> dict:
    entry = runs["report"][case]
    assert "error" not in entry, f"{case} did not load: {entry.get('traceback')}"
    return entry


def _files(hf_home, repo, commit, component, name):
    """(fp16 variant tensors, default-file tensors) of one component in the cache."""
    folder = hc.snapshot(hf_home, repo, commit) / component
    return load_file(str(folder / name.replace(".safetensors", ".fp16.safetensors"))), load_file(str(folder / name))


def _weight_name(component: str) -> str:
    return "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"


def _assert_bf16_copy_of(loaded: dict, source: dict, other: dict, what: str) -> None:
    """Every weight of ``source`` is in ``loaded``, equal to it rounded to bf16; none is ``other``'s."""
    assert set(source) <= set(loaded), f"{what}: not loaded: {sorted(set(source) - set(loaded))[:5]}"
    for key, value in source.items():
        got = loaded[key]
        if not value.is_floating_point():
            assert torch.equal(got, value), f"{what}.{key}"
            continue
        assert got.dtype == BF16, f"{what}.{key} is {got.dtype}"
        assert torch.equal(got, value.to(BF16)), f"{what}.{key} is not the {what} file's value in bf16"
        assert not torch.equal(got, other[key].to(BF16)), f"{what}.{key} came from the other weight file"


def _assert_fp32_near(loaded: dict, source: dict, other: dict, what: str) -> None:
    """fp32 weights exactly equal to ``source`` (read straight into fp32: no bf16 rounding on the
    way), and far from ``other``'s."""
    assert set(source) <= set(loaded)
    for key, value in source.items():
        got = loaded[key]
        assert got.dtype == torch.float32, f"{what}.{key} is {got.dtype}"
        assert torch.equal(got, value.float()), f"{what}.{key} differs from the file (bf16-rounded on the way?)"
        if other[key].float().sub(value.float()).abs().max() > 1e-2:
            assert not torch.allclose(got, other[key].float(), rtol=2**-8, atol=1e-30), f"{what}.{key} from the other file"


def test_sdxl_inpaint_default_loads_the_fp16_variant_as_bf16_with_an_fp32_vae(runs):
    """model=sdxl_inpaint by its hub id: variant=fp16 picks the ``*.fp16.safetensors`` files (they
    hold other values than the fp32 files here), weight_dtype=bfloat16 reaches from_pretrained,
    and finish_pipeline casts the VAE back to fp32 (the SDXL VAE overflows in half precision)."""
    entry, hf_home = _loaded(runs, "sdxl_inpaint"), runs["hf_home"]
    assert not entry["fooocus"] and entry["in_channels"] == 9
    assert entry["unet_dtypes"] == entry["text_encoder_dtypes"] == entry["text_encoder_2_dtypes"] == ["torch.bfloat16"]
    assert entry["vae_dtypes"] == ["torch.float32"]
    for part in ("unet", "text_encoder", "text_encoder_2"):
        fp16, fp32 = _files(hf_home, hc.INPAINT_REPO, hc.INPAINT_COMMIT, part, _weight_name(part))
        assert all(v.dtype == torch.float16 for v in fp16.values() if v.is_floating_point())
        _assert_bf16_copy_of(entry[part], fp16, fp32, part)
    fp16, fp32 = _files(hf_home, hc.INPAINT_REPO, hc.INPAINT_COMMIT, "vae", _weight_name("vae"))
    _assert_fp32_near(entry["vae"], fp16, fp32, "vae")


def _dequantize(entry) -> torch.Tensor:
    """Fooocus's ``calculate_weight_fooocus``: w = q / 255 * (max - min) + min, in float32."""
    q, lo, hi = entry
    return q.float() / 255.0 * (hi.float() - lo.float()) + lo.float()


def _assert_fooocus(entry, hf_home, base_commit, fooocus_commit):
    """The UNet is the base's (default files, not the fp16 variant) plus the patch at
    ``fooocus_commit``, with that commit's head in front; text encoders and VAE are the base's."""
    assert entry["fooocus"] and entry["in_channels"] == 9
    assert entry["unet_dtypes"] == entry["text_encoder_dtypes"] == entry["text_encoder_2_dtypes"] == ["torch.bfloat16"]
    assert entry["vae_dtypes"] == ["torch.float32"]
    for part in ("text_encoder", "text_encoder_2"):
        fp16, fp32 = _files(hf_home, hc.BASE_REPO, base_commit, part, _weight_name(part))
        _assert_bf16_copy_of(entry[part], fp32, fp16, part)  # variant: null → the default files
    fp16, fp32 = _files(hf_home, hc.BASE_REPO, base_commit, "vae", _weight_name("vae"))
    _assert_fp32_near(entry["vae"], fp32, fp16, "vae")

    files = hc.snapshot(hf_home, hc.FOOOCUS_REPO, fooocus_commit)
    patch = torch.load(files / hc.PATCH_FILE, weights_only=True)
    head = torch.load(files / hc.HEAD_FILE, weights_only=True)["head"]
    unet = entry["unet"]
    _, base = _files(hf_home, hc.BASE_REPO, base_commit, "unet", _weight_name("unet"))
    for ldm, name in LDM_TO_DIFFUSERS.items():
        key = "conv_in.conv.weight" if name == "conv_in.weight" else name
        expected = (base[name].to(BF16).float() + _dequantize(patch["diffusion_model." + ldm])).to(BF16)
        assert torch.equal(unet[key], expected), f"{key} != base + patch delta ({ldm})"
    # every other weight moved too (the patch covers the whole tiny UNet)
    for name, value in base.items():
        key = "conv_in.conv." + name.split(".")[-1] if name.startswith("conv_in.") else name
        changed = (unet[key] != value.to(BF16)).float().mean()
        assert changed > 0.5, f"{key}: only {changed:.0%} of the values were patched"
    assert torch.equal(unet["conv_in.head.head"], head.to(BF16)), "inpaint head is not the cached file's"
    assert set(unet) == {("conv_in.conv." + k[8:]) if k.startswith("conv_in.") else k for k in base} | {"conv_in.head.head"}


def test_fooocus_default_loads_base_patch_and_head_from_the_hub_cache(runs):
    """model=fooocus: the SDXL base by hub id (its default fp32 files, variant null) in bf16, the
    patch and head fetched by hf_hub_download from lllyasviel/fooocus_inpaint; each patched weight
    is base + Fooocus's dequantized delta (Fooocus: calculate_weight_fooocus, strength 1)."""
    _assert_fooocus(_loaded(runs, "fooocus"), runs["hf_home"], hc.BASE_COMMIT, hc.FOOOCUS_COMMIT)


def test_fooocus_revisions_pin_both_the_base_and_the_inpaint_files(runs):
    """model.revision reaches from_pretrained and model.inpaint_revision reaches hf_hub_download:
    older commits (another UNet, a mirrored patch, a negated head) are the ones loaded."""
    _assert_fooocus(_loaded(runs, "fooocus_old"), runs["hf_home"], hc.BASE_OLD_COMMIT, hc.FOOOCUS_OLD_COMMIT)


@pytest.mark.parametrize(
    "case,key",
    [("inpaint_uncached", "model.pretrained"), ("fooocus_uncached_base", "model.pretrained"),
     ("fooocus_uncached_files", "model.head_file")],
)  # fmt: skip
def test_a_repo_missing_from_the_cache_is_a_dreammix_error_naming_the_key(runs, case, key):
    """Offline, a hub id that is not cached is bad input: a DreamMixError naming the config key."""
    entry = runs["report"][case]
    assert "error" in entry, f"{case} loaded although nothing is cached for it"
    assert entry["type"] == "DreamMixError", entry["traceback"]
    error = entry["error"]
    assert error.endswith(f"({key})") and PRETRAINED_UNCACHED in error and "\n" not in error


def test_empty_cache_offline_gives_one_error_line_naming_model_pretrained(runs):
    """``src/inpaint.py model=sdxl_inpaint`` with an empty HF_HOME and HF_HUB_OFFLINE=1: exit code
    2 and one ``error: … (model.pretrained)`` line naming the repo, no traceback."""
    stderr = runs["cli_stderr"]
    assert runs["cli_rc"] == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].endswith("(model.pretrained)") and hc.INPAINT_REPO in errors[0]
