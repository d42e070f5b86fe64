"""W&B run settings shared by every entry point (train, adm, eval).

One place decides what a run is called, where its files go and which config it records, so the
three commands group and filter the same way in W&B. The recorded config is the composed Hydra
config: it holds the *name* of the API-key environment variable, never a key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def wandb_enabled(cfg: DictConfig) -> bool:
    """True when the config has a ``logger`` group with ``enabled: true``."""
    logger = cfg.get("logger")
    return bool(logger and logger.get("enabled", False))


def wandb_init_kwargs(cfg: DictConfig, name: str, run_dir: str | Path, job_type: str) -> dict[str, Any]:
    """Keyword arguments for ``wandb.init`` (and Lightning's ``WandbLogger``) from ``cfg.logger``."""
    logger = cfg.logger
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable key (e.g. hydra:* outside a Hydra run) must not stop the log
        config = OmegaConf.to_container(cfg, resolve=False)
    return {
        "project": logger.get("project", "dreammix"),
        "entity": logger.get("entity"),
        "group": logger.get("group"),
        "tags": list(logger.get("tags") or []),
        "name": name,
        "job_type": job_type,
        "dir": str(run_dir),
        "config": config,
    }
