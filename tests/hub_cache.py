"""A Hugging Face hub cache, written from tiny weights in the layout a user's download leaves behind.

``HF_HOME/hub/models--<org>--<name>/`` with ``blobs/<etag>`` (sha256 for LFS files, git blob sha1
for the rest), ``snapshots/<commit>/<path>`` relative symlinks into ``blobs/``, ``refs/main`` holding
the commit, and the tree listing ``trees/<commit>.json`` that recent huggingface_hub versions write on
download (diffusers reads it offline to choose the variant's files). The three repositories of the
default configs, with the files of the real ones (checked on huggingface.co):

- ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1`` (``model=sdxl_inpaint``): every weight
  file twice, ``*.fp16.safetensors`` (fp16 tensors) and the fp32 default file. The fp16 files hold
  the tiny model's weights, the fp32 files *other* weights, so a loaded value tells which was read.
- ``frankjoshua/juggernautXL_v8Rundiffusion`` (``model=fooocus`` base, an SDXL *base*): the same
  two kinds of files, here the fp32 files hold the tiny base and the fp16 ones other weights (the
  config asks for ``variant: null``). A second, older commit has another UNet.
- ``lllyasviel/fooocus_inpaint``: ``fooocus_inpaint_head.pth`` (an fp16 ``OrderedDict`` like the
  real file) and ``inpaint_v26.fooocus.patch`` at the root; an older commit holds other ones.

Run as a script (``python tests/hub_cache.py OUT CASES_JSON``, with ``HF_HOME``/``HF_HUB_OFFLINE``
set) it loads each case through ``dreammix.inpaint.load_pipeline`` on a Hydra-composed ``inpaint``
config and saves what the tests look at (dtypes, state dicts) to ``OUT`` with ``torch.save``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import traceback
from collections import OrderedDict
from pathlib import Path

INPAINT_REPO = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
INPAINT_COMMIT = "115134f363124c53c7d878647567d04daf26e41e"
BASE_REPO = "frankjoshua/juggernautXL_v8Rundiffusion"
BASE_COMMIT = "0fda61d4db4f139b564cad0bb5cd83e2b72b1647"
BASE_OLD_COMMIT = "7359f3a975e73c6a9249ca19526be7cfe9763334"
FOOOCUS_REPO = "lllyasviel/fooocus_inpaint"
FOOOCUS_COMMIT = "74bbcc070e55219adb9b6c3b0d035b34e3697d1d"
FOOOCUS_OLD_COMMIT = "94d97c30a5ece3250e9349b0aface534064f028e"
HEAD_FILE = "fooocus_inpaint_head.pth"
PATCH_FILE = "inpaint_v26.fooocus.patch"
LFS_SUFFIXES = (".safetensors", ".pth", ".patch", ".bin")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# ------------------------------------------------------------------------------------------------
# Writing the cache
# ------------------------------------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_repo(hub_dir: Path, repo_id: str, commit: str, files: dict[str, Path], main: bool = True) -> Path:
    """Put ``files`` (``{repo path: local file}``) into the cache as the snapshot of ``commit``;
    ``refs/main`` points to it when ``main``. Returns the snapshot folder."""
    storage = hub_dir / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = storage / "blobs", storage / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    tree = {}
    for rel, src in sorted(files.items()):
        data = Path(src).read_bytes()
        if rel.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
            etag = sha256
            tree[rel] = {"size": len(data), "blob_id": _git_blob_sha1(pointer), "lfs_sha256": sha256, "lfs_size": len(data)}
        else:
            etag = _git_blob_sha1(data)
            tree[rel] = {"size": len(data), "blob_id": etag}
        blob = blobs / etag
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}, indent=1))
    if main:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors") if ".fp16." not in p.name)


def other_weights(tensors: dict, seed: int) -> dict:
    """The same tensors moved by a seeded random offset (≈ weights of another training run)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v
        for k, v in tensors.items()
    }


def _variant_name(path: Path) -> str:
    return path.name.replace(".safetensors", ".fp16.safetensors")


def _save(tensors: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def diffusers_repo_files(src: Path, out: Path, fp16_holds_src: bool, seed: int) -> dict[str, Path]:
    """A saved fp32 pipeline folder ``src`` → the files of a hub repo with an ``fp16`` variant, in
    ``out``: the variant files are fp16 tensors; ``fp16_holds_src`` says which of the two kinds
    holds ``src``'s weights (the other holds :func:`other_weights`)."""
    import torch
    from safetensors.torch import load_file

    files = {str(p.relative_to(src)): p for p in src.rglob("*") if p.is_file()}
    for i, weights in enumerate(_weight_files(src)):
        rel = weights.relative_to(src)
        tensors = load_file(str(weights))
        moved = other_weights(tensors, seed + i)
        own, other = (tensors, moved) if fp16_holds_src else (moved, tensors)
        half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in own.items()}
        files[str(rel.with_name(_variant_name(rel)))] = _save(half, out / rel.with_name(_variant_name(rel)))
        files[str(rel)] = _save(other, out / rel)
    return files


def build_hub_cache(hf_home: Path, work: Path, inpaint_src: Path, base_src: Path, fooocus_src: Path) -> None:
    """Write the three repositories into ``hf_home/hub`` from the saved tiny inpainting pipeline
    ``inpaint_src``, the tiny SDXL base ``base_src`` and its Fooocus files in ``fooocus_src``
    (see ``dreammix.models.tiny`` / ``dreammix.models.fooocus``); ``work``: scratch space."""
    import torch
    from safetensors.torch import load_file

    hub = hf_home / "hub"
    # model=sdxl_inpaint: the fp16 variant holds the tiny model, the fp32 files other weights
    write_repo(hub, INPAINT_REPO, INPAINT_COMMIT, diffusers_repo_files(inpaint_src, work / "inpaint", True, seed=100))

    # model=fooocus: the base (fp32 files = the tiny base) at two commits, the Fooocus files at two
    base_files = diffusers_repo_files(base_src, work / "base", fp16_holds_src=False, seed=200)
    write_repo(hub, BASE_REPO, BASE_COMMIT, base_files)
    unet = "unet/diffusion_pytorch_model.safetensors"
    old_unet = other_weights(load_file(str(base_src / unet)), seed=300)
    write_repo(hub, BASE_REPO, BASE_OLD_COMMIT, {**base_files, unet: _save(old_unet, work / "base-old" / unet)}, main=False)

    head = torch.load(fooocus_src / HEAD_FILE, weights_only=True)["head"]
    patch = torch.load(fooocus_src / PATCH_FILE, weights_only=True)
    new, old = work / "fooocus", work / "fooocus-old"
    new.mkdir(parents=True)
    old.mkdir(parents=True)
    # the real head file is an OrderedDict holding one fp16 tensor
    torch.save(OrderedDict(head=head.to(torch.float16)), new / HEAD_FILE)
    shutil.copy(fooocus_src / PATCH_FILE, new / PATCH_FILE)
    torch.save(OrderedDict(head=(-head).to(torch.float16)), old / HEAD_FILE)
    torch.save({k: (255 - q, lo, hi) for k, (q, lo, hi) in patch.items()}, old / PATCH_FILE)  # mirrored deltas
    for folder, commit, main in ((new, FOOOCUS_COMMIT, True), (old, FOOOCUS_OLD_COMMIT, False)):
        write_repo(hub, FOOOCUS_REPO, commit, {HEAD_FILE: folder / HEAD_FILE, PATCH_FILE: folder / PATCH_FILE}, main=main)


def snapshot(hf_home: Path, repo_id: str, commit: str) -> Path:
    """The snapshot folder of ``repo_id`` at ``commit`` in the cache under ``hf_home``."""
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


# ------------------------------------------------------------------------------------------------
# The probe: load as src/inpaint.py does, report what was loaded
# ------------------------------------------------------------------------------------------------


def probe(out: str, cases: dict[str, list[str]]) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from dreammix.inpaint import load_pipeline
    from dreammix.models.fooocus import is_fooocus_unet

    report = {}
    for name, overrides in cases.items():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="inpaint", overrides=overrides)
        try:
            pipe = load_pipeline(cfg, torch.device("cpu"))
        except Exception as exc:  # reported, so that each test sees its own case fail
            report[name] = {"error": str(exc), "type": type(exc).__name__, "traceback": traceback.format_exc()}
            continue
        entry = {"fooocus": is_fooocus_unet(pipe.unet), "in_channels": int(pipe.unet.config.in_channels)}
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, part)
            entry[part] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            entry[part + "_dtypes"] = sorted({str(p.dtype) for p in module.parameters()})
        report[name] = entry
    torch.save(report, out)


if __name__ == "__main__":
    probe(sys.argv[1], json.loads(sys.argv[2]))
