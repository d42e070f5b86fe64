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
