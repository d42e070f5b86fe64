"""Benchmark presets (``conf/preset/``): which training experiment and extra overrides each Table 3
row gets, so ``make benchmark`` can reproduce the paper's text (``paper``) or the public code
(``reference``), each into its own tables.

A row's *inference* side always comes from ``conf/experiment/<row>.yaml`` + ``conf/ablation/<row>.yaml``
(λ, TAS on/off: what makes the row that row); a preset changes how its LoRA is trained
(``train_experiments``) and adds overrides to every training / evaluation of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreammix.errors import DreamMixError

#: What ``requires_base`` may name, and how to recognise that base in a composed ``model`` config.
BASES = {"fooocus": "a Fooocus base (model=fooocus or model=tiny_fooocus)"}


def is_fooocus_model(model_cfg: Any) -> bool:
    """``conf/model/<name>.yaml`` describes an SDXL base + Fooocus patch and head."""
    return bool(model_cfg.get("patch_file"))


@dataclass(frozen=True)
class BenchPreset:
    name: str = "paper"
    description: str = "the paper's text"
    train_experiments: dict[str, str] = field(default_factory=dict)
    train_overrides: tuple[str, ...] = ()
    eval_overrides: tuple[str, ...] = ()
    requires_base: str | None = None

    def __post_init__(self) -> None:
        if self.requires_base is not None and self.requires_base not in BASES:
            raise DreamMixError(f"requires_base must be null or one of {sorted(BASES)}, got {self.requires_base!r}", "preset.requires_base")

    @classmethod
    def from_config(cls, cfg: Any | None) -> "BenchPreset":
        """The preset of ``cfg.preset``; none (a config from before presets) = ``paper``."""
        if cfg is None:
            return cls()
        return cls(
            name=str(cfg.get("name", "paper")),
            description=str(cfg.get("description", "")),
            train_experiments={str(k): str(v) for k, v in (cfg.get("train_experiments") or {}).items()},
            train_overrides=tuple(str(v) for v in cfg.get("train_overrides") or ()),
            eval_overrides=tuple(str(v) for v in cfg.get("eval_overrides") or ()),
            requires_base=None if cfg.get("requires_base") is None else str(cfg.requires_base),
        )

    def train_experiment(self, row: str) -> str:
        """The ``conf/experiment`` a row's LoRA is trained with."""
        return self.train_experiments.get(row, row)

    def check(self, rows: list[str], conf_dir: Path) -> None:
        """Every training experiment exists (before anything runs)."""
        for row in rows:
            name = self.train_experiment(row)
            if not (conf_dir / "experiment" / f"{name}.yaml").is_file():
                raise DreamMixError(f"unknown training experiment {name!r} for row {row!r} (no conf/experiment/{name}.yaml)",
                                    f"preset.train_experiments.{row}")  # fmt: skip

    def check_base(self, model_cfg: Any) -> None:
        """A preset written for one base refuses another: e.g. ``reference`` on ``sdxl_inpaint``."""
        if self.requires_base == "fooocus" and not is_fooocus_model(model_cfg):
            raise DreamMixError(
                f"preset {self.name!r} needs {BASES['fooocus']}, got model={model_cfg.get('name')}", "preset / bench.overrides"
            )


def describe_setup(model_cfg: Any, preset: BenchPreset) -> str:
    """One sentence for every table: which base model and which preset produced the numbers."""
    base = f"`{model_cfg.get('name')}` (`{model_cfg.get('pretrained')}`"
    if is_fooocus_model(model_cfg):
        base += f" + Fooocus `{model_cfg.get('patch_file')}` and `{model_cfg.get('head_file')}` from `{model_cfg.get('inpaint_repo')}`"
    base += ")"
    return f"Base model {base}; preset `{preset.name}`: {preset.description}."
