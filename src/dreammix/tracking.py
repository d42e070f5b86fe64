"""W&B run settings shared by every entry point (train, adm, eval).

One place decides what a run is called, where its files go and which config it records, so the
three commands group and filter the same way in W&B. The recorded config is the composed Hydra
config, plus under ``hydra`` the command-line overrides and the chosen config groups (which
``experiment`` preset, which model): it holds the *name* of the API-key environment variable, never
a key.

In a Hydra multirun the jobs of one sweep share a W&B group named after the sweep
(``<task>-sweep-<sweep time>``), and each run is named and tagged by the values the sweep varies
(``subject=can``, ``loss.beta=0``) — read from the sweep's own ``multirun.yaml`` — so runs of two
sweeps never share a name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def wandb_enabled(cfg: DictConfig) -> bool:
    """True when the config has a ``logger`` group with ``enabled: true``."""
    logger = cfg.get("logger")
    return bool(logger and logger.get("enabled", False))


def _hydra_config():
    """Hydra's runtime config of the current job, or None outside a Hydra run (tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - no Hydra run: nothing to add
        return None


def sweep_identity(hydra_cfg, task_name: str) -> dict[str, Any] | None:
    """``group``, ``name``, ``tags`` of a multirun job (None for a single run)."""
    from hydra.types import RunMode

    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_id = Path(str(hydra_cfg.sweep.dir)).name
    from dreammix.sweeps import swept_values

    values = swept_values(hydra_cfg.overrides.task, hydra_cfg.sweep.dir)
    return {
        "group": f"{task_name}-sweep-{sweep_id}",
        "name": f"{task_name}-{sweep_id}-{hydra_cfg.job.num}-{','.join(values)}",
        "tags": [tag[:64] for tag in (f"sweep:{sweep_id}", *values)],  # W&B's limit per tag
    }


def wandb_init_kwargs(cfg: DictConfig, name: str, run_dir: str | Path, job_type: str) -> dict[str, Any]:
    """Keyword arguments for ``wandb.init`` (and Lightning's ``WandbLogger``) from ``cfg.logger``."""
    logger = cfg.logger
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable key (e.g. hydra:* outside a Hydra run) must not stop the log
        config = OmegaConf.to_container(cfg, resolve=False)
    kwargs = {
        "project": logger.get("project", "dreammix"),
        "entity": logger.get("entity"),
        "group": logger.get("group"),
        "tags": list(logger.get("tags") or []),
        "name": name,
        "job_type": job_type,
        "dir": str(run_dir),
        "config": config,
    }
    hydra_cfg = _hydra_config()
    if hydra_cfg is not None:
        config["hydra"] = {
            "overrides": [str(o) for o in hydra_cfg.overrides.task],
            "choices": {str(k): (None if v is None else str(v)) for k, v in hydra_cfg.runtime.choices.items()
                        if not str(k).startswith("hydra/")},
            "output_dir": str(hydra_cfg.runtime.output_dir),
        }
        sweep = sweep_identity(hydra_cfg, str(cfg.get("task_name", job_type)))
        if sweep is not None:
            kwargs.update(group=sweep["group"], name=sweep["name"], tags=[*kwargs["tags"], *sweep["tags"]])
    return kwargs


def train_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Lightning loggers of a training run: always a CSV (``<run_dir>/metrics.csv``, also with
    ``logger=none``), plus W&B when enabled — opened here, before the weights load, so the run and
    its config are on the dashboard from the start."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if wandb_enabled(cfg):
        from lightning.pytorch.loggers import WandbLogger

        kwargs = wandb_init_kwargs(cfg, f"{cfg.task_name}-{cfg.run_name}-{Path(run_dir).name}", run_dir, "train")
        wandb_logger = WandbLogger(save_dir=kwargs.pop("dir"), **kwargs)  # WandbLogger names wandb.init's `dir` save_dir
        _ = wandb_logger.experiment  # wandb.init now
        loggers.append(wandb_logger)
    return loggers


def wandb_logger_of(loggers) -> Any:
    """The W&B logger among Lightning's loggers (None without one)."""
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in loggers or [] if isinstance(lg, WandbLogger)), None)


def log_lora_artifact(loggers, lora_dir: Path, subject: str, steps: int) -> None:
    """The final LoRA folder (weights + ``dreammix_run.json``) as a W&B artifact of type ``lora``."""
    wandb_logger = wandb_logger_of(loggers)
    if wandb_logger is None:
        return
    import wandb

    artifact = wandb.Artifact(f"lora-{subject}", type="lora", metadata={"subject": subject, "steps": steps})
    artifact.add_dir(str(lora_dir))
    wandb_logger.experiment.log_artifact(artifact, aliases=["latest", f"step-{steps}"])
