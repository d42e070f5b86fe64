"""One validator for every entry point's config, run before anything loads.

Why central: a value that is never checked travels to torch or Lightning and comes back as a
traceback, or worse as silent garbage (``loss.tau_in=nan`` trained an all-NaN LoRA and exited 0).
So :func:`validate_config` (called by :func:`dreammix.cli.hydra_entry` on every composed config)

* refuses a non-finite float *anywhere* in the config: no setting of this project means NaN or
  infinity;
* checks each key of :data:`RULES` that the config has for its kind (int / float, booleans are
  not numbers), its range and, for names that become path components, :func:`dreammix.paths.safe_name`;
* refuses integers beyond 64 bits' reach of torch (``huge``).

:func:`check_argv` looks at the raw command line *before* Hydra runs, because Hydra writes
``.hydra/overrides.yaml`` and creates the run folder from it: a secret or a ``..`` name must be
refused before that, not after.

The typed specs (``LossSpec``, ``OptimSpec``, ...) keep their own ``__post_init__`` checks for
callers that build them in Python; the rules here are the command line's first line of defence.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreammix.errors import DreamMixError
from dreammix.paths import safe_name

#: The largest integer a setting may hold (torch seeds and step counters are 64-bit; Lightning's
#: ``seed_everything`` takes 32-bit seeds, see :data:`SEED`).
MAX_INT = 2**63 - 1


@dataclass(frozen=True)
class Num:
    """A numeric setting: ``kind`` int or float, ``low``/``high`` bounds (``open_low``: ``> low``)."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    nullable: bool = False

    def check(self, value: Any, key: str) -> None:
        if value is None:
            if self.nullable:
                return
            raise DreamMixError(f"expected {self.kind.__name__}, got null", key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DreamMixError(f"expected {self.kind.__name__}, got {value!r}", key)
        if self.kind is int and not isinstance(value, int):
            raise DreamMixError(f"expected int, got {value!r}", key)
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, float) and not math.isfinite(value):
            raise DreamMixError(f"{name} must be a finite number, got {value}", key)
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            raise DreamMixError(f"{name} must be {'>' if self.open_low else '>='} {self.low:g}, got {value}", key)
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            raise DreamMixError(f"{name} must be {'<' if self.open_high else '<='} {self.high:g}, got {value}", key)


@dataclass(frozen=True)
class Choice:
    """A setting with a fixed set of values (compared as given and as strings)."""

    values: tuple[Any, ...]

    def check(self, value: Any, key: str) -> None:
        if value not in self.values and str(value) not in {str(v) for v in self.values}:
            raise DreamMixError(f"must be one of {', '.join(str(v) for v in self.values)}; got {value!r}", key)


@dataclass(frozen=True)
class Name:
    """A string that becomes one path component (see :func:`dreammix.paths.safe_name`)."""

    def check(self, value: Any, key: str) -> None:
        safe_name(value, key)


@dataclass(frozen=True)
class NumList:
    """A list of ``length`` numbers, each checked by ``item``."""

    item: Num
    length: int

    def check(self, value: Any, key: str) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != self.length:
            raise DreamMixError(f"expected a list of {self.length} numbers, got {value!r}", key)
        for i, v in enumerate(value):
            self.item.check(v, f"{key}[{i}]")


@dataclass(frozen=True)
class Devices:
    """Lightning's ``devices``: a count (-1 = all), ``auto``, or a list of device indices."""

    def check(self, value: Any, key: str) -> None:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)):
            return
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            return
        raise DreamMixError(f"devices must be a count >= 1, -1 (all), auto or a list of indices; got {value!r}", key)


def _int(low: float | None = None, high: float | None = MAX_INT, **kw: Any) -> Num:
    return Num(int, low, high, **kw)


def _float(low: float | None = None, high: float | None = None, **kw: Any) -> Num:
    return Num(float, low, high, **kw)


_PROB = _float(0.0, 1.0)
_STEPS = _int(1, 100_000)
_SEED = _int(0, 2**32 - 1)  # lightning.seed_everything: larger seeds are replaced by a random one
_RESOLUTION = _int(8, 16_384)
_GUIDANCE = _float(0.0, 1_000.0)
#: Lightning's precision strings (``lightning.pytorch.trainer.connectors.accelerator_connector``).
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16")

#: Per-key rules; a key missing from a config is skipped (the table serves every entry point).
RULES: dict[str, Any] = {
    # names that become path components
    "task_name": Name(), "run_name": Name(), "subject.name": Name(),
    # shared
    "seed": _SEED,
    "model.resolution": _RESOLUTION,
    # train.py
    "trainer.max_steps": _int(1, 10_000_000),
    "trainer.accumulate_grad_batches": _int(1, 1_000_000),
    "trainer.log_every_n_steps": _int(1),
    "trainer.gradient_clip_val": _float(0.0, nullable=True),
    "trainer.precision": Choice(PRECISIONS),
    "trainer.devices": Devices(),
    "checkpoint.every_n_steps": _int(0),
    "checkpoint.keep_last": _int(0),
    "noise.offset": _float(0.0, 10.0),
    "noise.snr_gamma": _float(0.0, 1e6),
    "validation.every_n_steps": _int(0),
    "validation.num_samples": _int(0, 1_000),
    "validation.num_inference_steps": _STEPS,
    "validation.guidance_scale": _GUIDANCE,
    "validation.lambda_": _PROB,
    "progress.every_n_steps": _int(1, nullable=True),
    "optim.lr": _float(0.0, 1.0, open_low=True),
    "optim.betas": NumList(_float(0.0, 1.0, open_high=True), 2),
    "optim.weight_decay": _float(0.0),
    "optim.eps": _float(0.0, 1.0, open_low=True),
    "optim.warmup_steps": _int(0),
    "loss.tau_in": _float(0.0, 1_000.0),
    "loss.tau_out": _float(0.0, 1_000.0),
    "loss.beta": _float(0.0, 1_000.0),
    "loss.regular_prob": _PROB,
    "lora.rank": _int(1, 4_096),
    "lora.alpha": _float(0.0, 1e6, open_low=True),
    "lora.dropout": _float(0.0, 1.0, open_high=True),
    "data.batch_size": _int(1, 4_096),
    "data.regular_batch_size": _int(1, 4_096),
    "data.mask_variants": _int(1, 1_000),
    "data.regular_mask_variants": _int(1, 1_000),
    "data.blob_grow": NumList(_float(0.0, 100.0), 2),
    "data.max_regular": _int(1, nullable=True),
    "data.num_workers": _int(0, 1_024),
    "data.mask_augmentation.dilate_prob": _PROB,
    "data.mask_augmentation.max_dilate": _PROB,
    "data.mask_augmentation.box_prob": _PROB,
    "data.mask_augmentation.max_box_margin": _PROB,
    # adm.py
    "adm.num_prompts": _int(1, 1_000_000),
    "adm.min_before": _int(0, 100),
    "adm.max_before": _int(0, 100),
    "adm.after_prob": _PROB,
    "adm.base_seed": _SEED,
    "adm.resolution": _RESOLUTION,
    "adm.num_inference_steps": _STEPS,
    "adm.guidance_scale": _GUIDANCE,
    "adm.batch_size": _int(1, 4_096),
    "adm.mask_area": NumList(_float(0.0, 1.0, open_low=True, open_high=True), 2),
    "adm.log_samples": _int(0, 100_000),
    "adm.t2i_segment.min_area": _PROB,
    "adm.t2i_segment.max_area": _PROB,
    "adm.t2i_segment.max_attempts": _int(1, 1_000),
    "segmenter.threshold": _float(0.0, 1.0, open_high=True),
    "segmenter.batch_size": _int(1, 4_096),
    # eval.py / inpaint.py
    "lora_scale": _float(-100.0, 100.0),
    "limit": _int(1, nullable=True),
    "steps": _STEPS,
    "guidance_scale": _GUIDANCE,
    "resolution": Num(int, 8, 16_384, nullable=True),
    "score_batch_size": _int(1, 100_000),
    "wandb_rows": _int(0),
    "thumbnail_size": _int(1, 16_384),
    "num_images": _int(1, 1_024),
    "dif.lambda_": _PROB,
    "dif.crop_scale": _float(0.0, 100.0, open_low=True),
    "dif.min_crop_frac": _float(0.0, 1.0, open_low=True),
    "dif.feather_radius": _float(0.0, 10_000.0, nullable=True),
    # sampler group (conf/sampler/; dreammix.sampling.SamplerSpec checks the same ranges)
    "sampler.guidance_scale": _GUIDANCE,
    "sampler.base_switch": _PROB,
    "sampler.sharpness": _float(0.0, 1e6),
    "sampler.size_scale.positive": _float(0.0, 100.0, open_low=True),
    "sampler.size_scale.negative": _float(0.0, 100.0, open_low=True),
    "sampler.size_scale.end": _PROB,
    "metrics.batch_size": _int(1, 100_000),
    "metrics.crop_scale": _float(0.0, 100.0, open_low=True),
    "metrics.dino.resize": _int(1, 16_384),
    "metrics.dino.crop": _int(1, 16_384),
    "metrics.fid.image_size": _int(1, 16_384),
    "metrics.fid.batch_size": _int(1, 100_000),
    "metrics.fid.num_workers": _int(0, 1_024),
    "metrics.fid.reference_limit": _int(2, nullable=True),
    "metrics.fid.seed": _SEED,
    # vlm
    "vlm.timeout": _float(0.0, 86_400.0, open_low=True),
    "vlm.max_retries": _int(0, 100),
    "vlm.backoff_base": _float(0.0, 3_600.0),
    "vlm.backoff_max": _float(0.0, 86_400.0),
    "vlm.invalid_answer_retries": _int(0, 100),
    "vlm.temperature": _float(0.0, 2.0),
    "vlm.max_tokens": _int(1, 1_000_000),
    "vlm.max_images": _int(1, 1_000),
    "vlm.image_max_side": _int(1, 16_384),
    # build_benchmark.py
    "benchmark.seed": _SEED,
    "benchmark.per_subject": _int(1, 10_000_000),
    "benchmark.filters.min_image_side": _int(0, 100_000),
    "benchmark.filters.min_box_side": _int(0, 100_000),
    "benchmark.filters.min_area_frac": _PROB,
    "benchmark.filters.max_area_frac": _float(0.0, 1.0, open_low=True),
    "benchmark.filters.max_aspect": _float(1.0, 1e6),
    "benchmark.prompts.attribute_count": _int(0, 1_000),
}


def _flatten(node: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dotted key → value of every resolvable leaf, and of every list (as a Python list) too;
    missing (``???``) and unresolvable values (e.g. ``${hydra:...}`` outside a job) are left out."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out = {} if out is None else out
    is_list = isinstance(node, ListConfig)
    for key in range(len(node)) if is_list else list(node.keys()):
        path = f"{prefix}[{key}]" if is_list else (f"{prefix}.{key}" if prefix else str(key))
        try:
            value = node[key]
        except OmegaConfBaseException:
            continue
        if isinstance(value, DictConfig):
            _flatten(value, path, out)
        elif isinstance(value, ListConfig):
            try:
                out[path] = OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException:
                pass
            _flatten(value, path, out)
        else:
            out[path] = value
    return out


def _leaves(cfg: Any) -> list[tuple[str, Any]]:
    """(dotted key, value) of every resolvable scalar leaf of ``cfg``."""
    return [(k, v) for k, v in _flatten(cfg).items() if not isinstance(v, list)]


def validate_config(cfg: Any) -> None:
    """Refuse any non-finite number and any value outside its rule (see the module docstring)."""
    flat = _flatten(cfg)
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DreamMixError(f"{key.rsplit('.', 1)[-1]} must be a finite number, got {value}", key)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise DreamMixError(f"{value} is too large", key)
    for key, rule in RULES.items():
        if key in flat:
            rule.check(flat[key], key)


# ------------------------------------------------------------------------------------------------
# The command line, before Hydra writes anything
# ------------------------------------------------------------------------------------------------

#: Config keys whose last part names a secret.
_SECRET_KEY = re.compile(r"(^|\.)(\w*api_?key|key|\w*token|\w*secret(_key)?|password|passwd)$", re.IGNORECASE)
#: Values that look like an API key whatever the key (OpenAI ``sk-...``, Hugging Face ``hf_...``).
_SECRET_VALUE = re.compile(r"(^|[^A-Za-z0-9])(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,})($|[^A-Za-z0-9_-])")
#: Keys whose value becomes a path component of the run folder (Hydra's ``hydra.run.dir``).
_NAME_KEYS = ("task_name", "run_name", "subject.name")


def _override_values(argument: str) -> tuple[str, list[str]] | None:
    """(key, [values]) of one ``key=value`` override (sweeps give several), None if it is not one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (override,) = OverridesParser.create().parse_overrides([argument])
    except Exception:  # noqa: BLE001 - Hydra reports malformed overrides itself, in one line
        return None
    key = override.key_or_group
    try:
        if override.is_sweep_override():
            values = [str(v) for v in override.sweep_string_iterator()]
        else:
            values = [str(override.value())]
    except Exception:  # noqa: BLE001 - range/glob sweeps and other forms: check the raw text
        values = [argument.partition("=")[2]]
    return key, values


def check_argv(argv: list[str]) -> None:
    """Refuse secrets and path-escaping names on the command line before Hydra sees them.

    The message never repeats the secret.
    """
    for argument in argv:
        if argument.startswith("-") or "=" not in argument:
            continue
        parsed = _override_values(argument)
        key, values = parsed if parsed else (argument.partition("=")[0].lstrip("+~"), [argument.partition("=")[2]])
        if _SECRET_KEY.search(key) or any(_SECRET_VALUE.search(v) for v in values):
            raise DreamMixError(
                "secrets are not accepted on the command line (Hydra would save them in .hydra/); export the key "
                "in the environment variable named by vlm.api_key_env instead", key,
            )
        if key in _NAME_KEYS:
            for value in values:
                safe_name(value, key)


# ------------------------------------------------------------------------------------------------
# Tensors: LoRA files and checkpoints
# ------------------------------------------------------------------------------------------------


def check_finite_tensors(tensors: Mapping[str, Any], where: str) -> None:
    """Refuse a state dict with any NaN or infinite value, naming the first such tensor."""
    import torch

    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DreamMixError(f"tensor {name} holds NaN or infinite values (a diverged training run?)", where)


def check_lora_file(path: str | Path, where: str) -> None:
    """A LoRA weights file must be a readable safetensors file of finite tensors.

    Read with safetensors (no pickle, so a hostile file cannot run code) before the base model
    loads: a corrupt or diverged LoRA costs a second, not a model load.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DreamMixError(f"cannot read LoRA weights ({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__})", where) from exc
    if not tensors:
        raise DreamMixError("the LoRA weights file holds no tensor", where)
    check_finite_tensors(tensors, where)


def load_checkpoint_safely(path: str | Path, where: str = "ckpt_path") -> dict[str, Any]:
    """A training checkpoint read with ``weights_only=True`` (no code from the file runs).

    A corrupt, empty or hostile file (one that needs unpickling of arbitrary objects) is refused
    in one line; the fix is to use a checkpoint this project wrote, never to load it unsafely.
    """
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's own text suggests the unsafe way out: not repeated
        raise DreamMixError("not a readable training checkpoint of this project: corrupt, or it holds objects other "
                            "than tensors and plain data (refused: they could run code); use one written by train.py",
                            where) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            AttributeError, TypeError, KeyError, IndexError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise DreamMixError(f"not a readable training checkpoint of this project ({exc.__class__.__name__}: {first})", where) from exc
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise DreamMixError("not a Lightning training checkpoint (no state_dict)", where)
    check_finite_tensors(state["state_dict"], where)
    return state
