"""Shared fixtures: offline environment, the tiny model, the shared data, Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# No test may touch the network or a W&B server.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
# First-use DreamBooth downloads (dreammix.data.download) go to a closed loopback port: refused at once.
os.environ["DREAMMIX_DREAMBOOTH_URL"] = "http://127.0.0.1:9/dreambooth.zip"


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One cache dir per test session (the tiny model is built there once)."""
    cache = tmp_path_factory.mktemp("dreammix-cache")
    old = os.environ.get("DREAMMIX_CACHE")
    os.environ["DREAMMIX_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DREAMMIX_CACHE", None)
    else:
        os.environ["DREAMMIX_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(_session_cache) -> Path:
    """The tiny SDXL inpainting model saved in diffusers layout (built on first use)."""
    from dreammix.models.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(_session_cache / "tiny-sdxl-inpaint")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real DreamBooth subjects + COCO mini); skip when a clone lacks it."""
    if not (SHARED_DATA / "dreambooth").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present beside the repo in CI)")
    return SHARED_DATA


@pytest.fixture
def compose():
    """Compose a primary config the way the entry point would, with overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(config_name: str, overrides: list[str] | None = None):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))

    return _compose


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is several times faster (no spin-waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: The test LoRA: alpha ≠ rank, so a lost alpha or scale shows in the layers' scaling.
LORA_RANK, LORA_ALPHA = 4, 2.0


def make_real_lora(tiny_model_dir: Path, directory: Path) -> Path:
    """A real LoRA for the tiny UNet (random non-zero B, alpha ≠ rank), saved as train.py saves
    one; kept when ``directory`` already holds it."""
    import torch
    from diffusers import UNet2DConditionModel

    from dreammix.models.lora import LoraSpec, add_lora, save_lora

    if (directory / "pytorch_lora_weights.safetensors").is_file():
        return directory
    spec = LoraSpec(rank=LORA_RANK, alpha=LORA_ALPHA)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    add_lora(unet, spec)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_lora(unet, directory, spec)
    return directory
