"""A run's LoRA in every format users load, from the trained UNet or after the fact.

``write_lora_folder`` is what a training run writes (``lora/`` at the end, one folder per
checkpoint): ``pytorch_lora_weights.safetensors`` (diffusers/peft names + adapter metadata),
``<subject>_<base>.safetensors`` (kohya/webui layout, :mod:`dreammix.models.kohya`), the run
record ``dreammix_run.json`` and the model card ``README.md`` (:mod:`dreammix.model_card`), built
in one staging folder and renamed into place. ``python src/export_lora.py`` converts an existing
run's ``lora/`` or a training checkpoint (``.ckpt``, LoRA + optimizer state) the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from dreammix.errors import DreamMixError
from dreammix.models.lora import LORA_WEIGHTS_NAME, LoraSpec

RUN_INFO_NAME = "dreammix_run.json"
CARD_NAME = "README.md"
SAMPLE_GRID_NAME = "samples.png"
FORMATS = ("diffusers", "kohya")
#: The SDXL UNet's block layout (both bases): what the kohya names depend on, for records that predate it.
SDXL_LAYOUT = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def unet_layout(unet_config: Mapping) -> dict:
    """The part of a UNet config the kohya module names depend on (recorded with every LoRA)."""
    return {"layers_per_block": unet_config["layers_per_block"], "up_block_types": list(unet_config["up_block_types"])}


def lora_record(spec: LoraSpec) -> dict:
    return {"rank": spec.rank, "alpha": spec.alpha, "target_modules": list(spec.target_modules), "use_dora": spec.use_dora}


@dataclass(frozen=True)
class LoraExport:
    """A LoRA to write: tensors in :func:`dreammix.models.lora.lora_state_dict` naming, its shape,
    the run record (subject, base, steps, loss, ...)."""

    weights: dict[str, torch.Tensor]
    spec: LoraSpec
    info: dict = field(default_factory=dict)

    def kohya_name(self) -> str:
        subject = str(self.info.get("subject", "subject"))
        base = str(self.info.get("model") or "sdxl")
        return f"{subject}_{base}.safetensors"


def write_lora_folder(
    export: LoraExport, directory: str | Path, formats: Sequence[str] = FORMATS, sample_grid: Path | None = None
) -> Path:
    """Write ``directory`` whole (staging folder + rename) with the asked formats, the run record
    and the model card."""
    from dreammix.atomic import atomic_write_dir
    from dreammix.model_card import model_card
    from dreammix.models.kohya import kohya_metadata, save_kohya_lora
    from dreammix.models.lora import save_lora_weights

    info = {**export.info, "lora": lora_record(export.spec)}
    layout = info.get("unet_layout") or SDXL_LAYOUT
    if export.spec.use_dora and "kohya" in formats:
        # peft's magnitude vector has no verified counterpart in the webui loaders' DoRA layout
        # (``dora_scale``), so no kohya file rather than one that loads wrong.
        if "diffusers" not in formats:
            raise DreamMixError("the kohya/webui export of a DoRA LoRA is not supported; use --format diffusers", "--format")
        formats = [f for f in formats if f != "kohya"]
    kohya_file = export.kohya_name() if "kohya" in formats else None
    # The kohya names are checked before anything is written: a module the scheme cannot express
    # must not leave a diffusers-only folder behind.
    from dreammix.models.kohya import to_kohya_state_dict

    if kohya_file:
        to_kohya_state_dict(export.weights, export.spec.alpha, layout)

    def extras(staging: Path) -> None:
        if kohya_file:
            title = kohya_file.removesuffix(".safetensors")
            meta = kohya_metadata(info, int(info.get("resolution") or 1024), title)
            save_kohya_lora(staging / kohya_file, export.weights, export.spec.alpha, layout, meta)
        (staging / RUN_INFO_NAME).write_text(json.dumps(info, indent=2))
        grid = None
        if sample_grid is not None and Path(sample_grid).is_file():
            shutil.copyfile(sample_grid, staging / SAMPLE_GRID_NAME)
            grid = SAMPLE_GRID_NAME
        (staging / CARD_NAME).write_text(model_card(info, kohya_file, LORA_WEIGHTS_NAME, grid))

    if "diffusers" in formats:
        save_lora_weights(export.weights, directory, export.spec, also=extras)
    else:
        atomic_write_dir(directory, extras, replace=True)
    return Path(directory)


def add_kohya_file(export: LoraExport, folder: Path) -> Path:
    """The kohya file and a refreshed model card in an existing ``lora/`` folder (atomic files)."""
    from dreammix.atomic import atomic_write_text
    from dreammix.model_card import model_card
    from dreammix.models.kohya import kohya_metadata, save_kohya_lora

    if export.spec.use_dora:
        raise DreamMixError("the kohya/webui export of a DoRA LoRA is not supported", "--format")
    info = {**export.info, "lora": lora_record(export.spec)}
    name = export.kohya_name()
    meta = kohya_metadata(info, int(info.get("resolution") or 1024), name.removesuffix(".safetensors"))
    save_kohya_lora(folder / name, export.weights, export.spec.alpha, info.get("unet_layout") or SDXL_LAYOUT, meta)
    grid = SAMPLE_GRID_NAME if (folder / SAMPLE_GRID_NAME).is_file() else None
    atomic_write_text(folder / CARD_NAME, model_card(info, name, LORA_WEIGHTS_NAME, grid))
    return folder


# ------------------------------------------------------------------ reading an existing LoRA
def _spec_from_record(record: Mapping, where: str) -> LoraSpec:
    try:
        return LoraSpec(
            rank=int(record["rank"]), alpha=float(record["alpha"]), target_modules=tuple(record["target_modules"]),
            use_dora=bool(record.get("use_dora", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DreamMixError(f"incomplete LoRA record {dict(record)!r}", where) from exc


def _check_tensors(weights: Mapping[str, torch.Tensor], spec: LoraSpec, where: str) -> None:
    """The tensors must be the LoRA the record describes (rank, targets): a checkpoint or folder
    of another LoRA config is refused, not exported under the wrong alpha or names."""
    if not weights:
        raise DreamMixError("no LoRA tensors found", where)
    downs = {k.removesuffix(".lora.down.weight").removesuffix(".lora_A.weight"): v for k, v in weights.items()
             if k.endswith((".lora.down.weight", ".lora_A.weight"))}
    ranks = {int(v.shape[0]) for v in downs.values()}
    if ranks != {spec.rank}:
        raise DreamMixError(f"LoRA tensors have rank {sorted(ranks)}, the record says rank {spec.rank}", where)
    leaves = set(downs)
    targets = set(spec.target_modules)
    stray = sorted(m for m in leaves if not any(m == t or m.endswith("." + t) for t in targets))
    if stray:
        raise DreamMixError(f"LoRA module {stray[0]!r} is not among the recorded targets {sorted(targets)}", where)


def read_lora_folder(directory: str | Path) -> LoraExport:
    """A ``lora/`` folder written by a run (diffusers file + ``dreammix_run.json``)."""
    from safetensors import safe_open

    directory = Path(directory)
    path = directory / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise DreamMixError(f"no {LORA_WEIGHTS_NAME} in the folder", str(directory))
    with safe_open(str(path), "pt") as handle:
        weights = {k.removeprefix("unet."): handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata() or {}
    info = json.loads((directory / RUN_INFO_NAME).read_text()) if (directory / RUN_INFO_NAME).is_file() else {}
    if "lora" in info:
        spec = _spec_from_record(info["lora"], str(directory / RUN_INFO_NAME))
    elif "lora_adapter_metadata" in meta:
        peft = json.loads(meta["lora_adapter_metadata"])
        spec = _spec_from_record(
            {"rank": peft["unet.r"], "alpha": peft["unet.lora_alpha"], "target_modules": peft["unet.target_modules"],
             "use_dora": peft.get("unet.use_dora", False)}, str(path),
        )
    else:
        raise DreamMixError("the LoRA file has no adapter metadata and no dreammix_run.json is beside it", str(path))
    _check_tensors(weights, spec, str(path))
    return LoraExport(weights, spec, info)


def read_checkpoint(path: str | Path, run_info: str | Path | None = None) -> LoraExport:
    """The LoRA held by a training checkpoint, with the run record of its run (``<run>/lora/`` by
    default, when present). A checkpoint whose LoRA differs from that run's is refused."""
    from dreammix.models.lora import checkpoint_lora_state_dict

    path = Path(path)
    if not path.is_file():
        raise DreamMixError("checkpoint not found", str(path))
    from dreammix.validation import load_checkpoint_safely

    ckpt = load_checkpoint_safely(path, str(path))  # weights_only: no code from the file runs
    if "dreammix_lora" not in ckpt:
        raise DreamMixError("not a DreamMix training checkpoint (no 'dreammix_lora' record)", str(path))
    spec = _spec_from_record(ckpt["dreammix_lora"], str(path))
    weights = checkpoint_lora_state_dict(ckpt["state_dict"])
    _check_tensors(weights, spec, str(path))
    info_path = Path(run_info) if run_info else path.parent.parent / "lora" / RUN_INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if run_info and not info_path.is_file():
        raise DreamMixError("run record not found", str(info_path))
    if "lora" in info:
        recorded = _spec_from_record(info["lora"], str(info_path))
        if recorded != spec:
            raise DreamMixError(
                f"checkpoint LoRA {lora_record(spec)} is not the LoRA of run record {lora_record(recorded)}", str(path)
            )
    info = {**info, **ckpt.get("dreammix_run", {})}
    info["steps"] = int(ckpt.get("global_step", info.get("steps", 0)))
    if ckpt["dreammix_lora"].get("unet_layout"):
        info["unet_layout"] = ckpt["dreammix_lora"]["unet_layout"]
    return LoraExport(weights, spec, info)


# ------------------------------------------------------------------ command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2: the project's bad-input contract
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def export_lora(source: str | Path, formats: Sequence[str], out: str | Path | None = None, run_info: str | Path | None = None) -> Path:
    """Convert ``source`` (a run folder, its ``lora/`` folder, or a ``.ckpt``) into ``out``."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise DreamMixError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})", "--format")
    source = Path(source)
    if source.suffix == ".ckpt" or source.is_file():
        export = read_checkpoint(source, run_info)
        out = Path(out) if out else source.with_name(f"{source.stem}_lora")
    else:
        folder = source / "lora" if (source / "lora" / LORA_WEIGHTS_NAME).is_file() else source
        export = read_lora_folder(folder)
        out = Path(out) if out else folder
        if out.resolve() == folder.resolve():
            if "kohya" not in formats:
                raise DreamMixError("the folder already holds the diffusers file; give --out to write a copy", "--format")
            # In place: add the kohya file and refresh the card; everything else in the folder stays.
            return add_kohya_file(export, folder)
    if source.is_file():  # the grid rendered at the checkpoint's step, when there is one
        grid = source.parent.parent / "samples" / f"step_{int(export.info.get('steps', 0)):06d}.png"
    else:
        run = source if (source / "lora").is_dir() else source.parent
        grid = next(iter(sorted(run.glob("samples/step_*.png"))[-1:]), None)
    return write_lora_folder(export, out, formats, sample_grid=grid)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = _Parser(prog="python src/export_lora.py", description="Export a DreamMix LoRA (run, lora/ folder or .ckpt).")
    parser.add_argument("source", help="a training run folder, its lora/ folder, or a training checkpoint (.ckpt)")
    parser.add_argument("--format", default="kohya", help="diffusers | kohya (default kohya)")
    parser.add_argument("--out", default=None, help="output folder (default: the lora/ folder; <ckpt>_lora/ for a checkpoint)")
    parser.add_argument("--run-info", default=None, help="dreammix_run.json to describe a checkpoint (default: its run's)")
    args = parser.parse_args(argv)
    try:
        out = export_lora(args.source, [args.format], args.out, args.run_info)
    except DreamMixError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(out)
    return out



# ------------------------------------------------------------------ during training
class CheckpointLoraCallback(L.Callback):
    """Beside every training checkpoint, ``lora_step_<N>/``: the LoRA of that step in both formats
    (+ record and card), so any checkpoint can be tried in ComfyUI/Fooocus without converting.
    With ``keep_last`` K > 0 only the K newest folders stay (like the checkpoints themselves)."""

    def __init__(self, directory: Path, every_n_steps: int, keep_last: int, spec: LoraSpec, info: Callable[[int], dict]):
        self.directory, self.every, self.keep, self.spec, self.info = Path(directory), every_n_steps, keep_last, spec, info
        self._last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last or not trainer.is_global_zero:
            return
        self._last = step
        from dreammix.models.lora import lora_state_dict

        export = LoraExport(lora_state_dict(pl_module.unet), self.spec, self.info(step))
        write_lora_folder(export, self.directory / f"lora_step_{step:06d}")
        if self.keep > 0:
            for old in sorted(self.directory.glob("lora_step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
