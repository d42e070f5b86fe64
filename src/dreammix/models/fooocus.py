"""The Fooocus inpainting base (the paper's base model): an SDXL *base* + Fooocus's inpaint files.

Fooocus (lllyasviel/Fooocus, ``modules/inpaint_worker.py`` + ``ldm_patched``) turns any SDXL
text-to-image checkpoint into an inpainting model with two files from ``lllyasviel/fooocus_inpaint``:

``inpaint_v26.fooocus.patch``
    A ``torch.save``-d dict ``{key: (q, w_min, w_max)}``: per-weight deltas quantized to ``uint8``,
    dequantized as ``q / 255 * (w_max - w_min) + w_min`` and *added* to the UNet weight
    (Fooocus's ``calculate_weight_fooocus``, strength 1.0). Keys are the UNet's state-dict keys in
    the original LDM/SGM layout as Fooocus's ``BaseModel`` names them, i.e. with a
    ``diffusion_model.`` prefix (``diffusion_model.input_blocks.0.0.weight``); the checkpoint form
    ``model.diffusion_model.`` is accepted as well. Assumptions, since the format is only defined
    by Fooocus's code: ``w_min``/``w_max`` are float tensors broadcastable to ``q`` (scalars or
    keep-dim reductions), and an entry may also be a plain float tensor holding an un-quantized
    delta. Fooocus *skips* keys it cannot match or whose shape differs (with a print); here both
    are errors, so a patch made for another architecture cannot half-apply silently.

``fooocus_inpaint_head.pth``
    ``{"head": Tensor[320, 5, 3, 3]}``: a bias-free 3x3 conv, applied after replicate padding to
    ``cat([latent_mask, masked_image_latent * scaling_factor])`` once per image; Fooocus adds the
    result to the output of ``input_blocks.0`` (diffusers: ``conv_in``) at every step.

How the head is attached (:class:`FooocusConvIn`): ``unet.conv_in`` is replaced by a module that
takes the *same 9-channel input as SDXL-inpainting-0.1* — ``cat([noisy_latents(4), mask(1),
masked_image_latents(4)])`` — and returns ``conv_in(x[:, :4]) + head(x[:, 4:])``, and the UNet's
``config.in_channels`` is set to 9. The UNet stays a ``UNet2DConditionModel``, so

- training and validation code is identical for both bases (one call signature),
- diffusers' ``StableDiffusionXLInpaintPipeline`` works unchanged (it concatenates exactly these
  9 channels when ``unet.config.in_channels == 9``),
- peft LoRA (``unet.add_adapter``), ``lora_state_dict``/``save_lora`` and gradient checkpointing
  see the same module tree as before (the head is frozen; LoRA targets attention layers).

Computing the head per UNet call instead of once per image costs one 5→320 3x3 conv at latent
resolution, negligible next to the UNet. Differences from Fooocus's own inpaint engine that are
*not* reproduced here: its latent mask is ``max_pool2d(mask, 8)`` (dilated) where diffusers'
pipeline resizes with ``nearest``; its masked image fills the hole with gray (0.5), the same as
diffusers' ``image * (mask < 0.5)`` in [-1, 1]. Do not ``save_pretrained`` the wrapped UNet: its
config says 9 channels but its weights are the base's 4-channel ``conv_in`` plus the head.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dreammix.atomic import atomic_write_dir
from dreammix.errors import DreamMixError
from dreammix.models.pretrained import ModelSpec, _looks_like_path, check_model_folder, finish_pipeline, pretrained_pipeline

LATENT_CHANNELS = 4
HEAD_IN_CHANNELS = 1 + LATENT_CHANNELS  # latent mask ⊕ masked-image latent
INPAINT_IN_CHANNELS = LATENT_CHANNELS + HEAD_IN_CHANNELS  # the 9-channel calling convention

#: Prefixes under which Fooocus patch keys name UNet weights (stripped before conversion).
PATCH_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_PLACEHOLDER = None  # value of the fake LDM entries that only keep the converter's block counts right


# ----------------------------------------------------------------------------------------------
# Patch file
# ----------------------------------------------------------------------------------------------


def _torch_load(path: Path, what: str) -> object:
    """``torch.load`` with ``weights_only=True`` (no arbitrary pickles), errors as DreamMixError."""
    if not path.is_file():
        raise DreamMixError(f"{what} not found", str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice; keep the one fact that matters.
        detail = str(exc).partition("WeightsUnpickler error:")[2].strip().split(". Please")[0]
        detail = detail.strip().splitlines()[0].strip() if detail.strip() else ""
        if "global" in detail.lower():  # the pickle names code to run: not a tensor file, refused
            raise DreamMixError(f"{what} holds more than tensors, refused by weights_only loading ({detail})", str(path)) from exc
        raise DreamMixError(f"{what} is not a readable torch file ({detail or 'corrupt pickle'})", str(path)) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DreamMixError(f"{what} is not a readable torch file: {first}", str(path)) from exc


def dequantize_patch_entry(entry: object, *, key: str, source: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One patch value → the float delta to add. ``(q, min, max)`` or a plain float tensor."""
    where = f"{source}: {key}"
    if isinstance(entry, torch.Tensor):
        if not entry.is_floating_point():
            raise DreamMixError(f"plain patch entries must be float deltas, got dtype {entry.dtype}", where)
        delta = entry.to(torch.float32)
    elif isinstance(entry, (tuple, list)) and len(entry) == 3 and all(isinstance(t, torch.Tensor) for t in entry):
        q, w_min, w_max = entry
        if q.dtype != torch.uint8:
            raise DreamMixError(f"quantized patch weights must be uint8, got {q.dtype}", where)
        if not (w_min.is_floating_point() and w_max.is_floating_point()):
            raise DreamMixError(f"patch min/max must be float tensors, got {w_min.dtype}/{w_max.dtype}", where)
        try:
            out_shape = torch.broadcast_shapes(q.shape, w_min.shape, w_max.shape)
        except RuntimeError as exc:
            raise DreamMixError(
                f"patch min {tuple(w_min.shape)}/max {tuple(w_max.shape)} do not broadcast to {tuple(q.shape)}", where
            ) from exc
        if out_shape != q.shape:
            raise DreamMixError(
                f"patch min {tuple(w_min.shape)}/max {tuple(w_max.shape)} would enlarge the weight {tuple(q.shape)}", where
            )
        lo, hi = w_min.to(torch.float32), w_max.to(torch.float32)
        # Fooocus: w1 = (w1 / 255.0) * (w_max - w_min) + w_min, all in float32.
        delta = (q.to(torch.float32) / 255.0) * (hi - lo) + lo
    else:
        shape = type(entry).__name__ + (f" of length {len(entry)}" if isinstance(entry, (tuple, list)) else "")
        raise DreamMixError(f"patch entry must be a (uint8, min, max) triple or a float tensor, got {shape}", where)
    if not torch.isfinite(delta).all():
        raise DreamMixError("patch delta has non-finite values", where)
    return delta.to(dtype)


def load_fooocus_patch(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read ``inpaint_v26.fooocus.patch`` safely and dequantize every entry (keys unchanged).

    The full SDXL patch dequantizes to a few GB of float32; pass ``dtype=torch.bfloat16`` to halve
    that when the UNet is held in bf16 anyway.
    """
    path = Path(path).expanduser()
    raw = _torch_load(path, "Fooocus patch file")
    if not isinstance(raw, Mapping) or not raw:
        raise DreamMixError(f"Fooocus patch must be a non-empty dict of key → (uint8, min, max), got {type(raw).__name__}", str(path))
    out: dict[str, torch.Tensor] = {}
    for key, entry in raw.items():
        if not isinstance(key, str):
            raise DreamMixError(f"Fooocus patch keys must be strings, got {key!r}", str(path))
        out[key] = dequantize_patch_entry(entry, key=key, source=str(path), dtype=dtype)
    return out


def quantize_delta(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse used to *write* synthetic patches in the real format (per-tensor min/max)."""
    delta = delta.detach().to(torch.float32)
    lo, hi = delta.min(), delta.max()
    scale = (hi - lo).clamp_min(1e-12)
    q = torch.round((delta - lo) / scale * 255.0).clamp(0, 255).to(torch.uint8)
    return q, lo.clone(), hi.clone()


# ----------------------------------------------------------------------------------------------
# Key mapping (LDM/SGM → diffusers) through diffusers' own single-file converter
# ----------------------------------------------------------------------------------------------


def _strip_prefix(key: str) -> str | None:
    for prefix in PATCH_KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def _block_id(bare: str, family: str) -> int | None:
    parts = bare.split(".")
    if parts[0] == family and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return None


def _format_keys(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def ldm_to_diffusers_unet_keys(keys: Iterable[str], unet_config: Mapping) -> dict[str, str]:
    """``{patch key: diffusers UNet key}`` for every key, via ``convert_ldm_unet_checkpoint``.

    The converter renames a *checkpoint*, so we feed it a fake LDM state dict whose values are the
    original patch keys and read the mapping back from the converted dict. Two details of the
    converter make a plain subset unsafe, and are compensated with placeholder entries that are
    dropped afterwards: it counts blocks (``len({input_blocks.i})``) instead of taking the largest
    index, so a patch that skips a block would lose later ones; and it indexes the four
    ``label_emb`` keys unconditionally for ``text_time`` UNets, and moves down/upsampler biases
    only alongside their weights. Every key must come back exactly once; anything the converter
    does not place (text-encoder keys, unknown prefixes, typos) raises :class:`DreamMixError`.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY, convert_ldm_unet_checkpoint

    config = dict(unet_config)
    if not isinstance(config.get("layers_per_block"), int):
        raise DreamMixError(
            f"only UNets with an integer layers_per_block can take a Fooocus patch, got {config.get('layers_per_block')!r}",
            "model.pretrained",
        )
    keys = list(keys)
    bare_of: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        bare = _strip_prefix(key)
        if bare is None:
            unknown.append(key)
        elif bare in bare_of:
            raise DreamMixError(f"patch names the same weight twice: {bare_of[bare]!r} and {key!r}", "model.patch_file")
        else:
            bare_of[bare] = key

    fake: dict[str, str | None] = {LDM_UNET_KEY + bare: key for bare, key in bare_of.items()}

    def add_placeholder(bare: str) -> None:
        fake.setdefault(LDM_UNET_KEY + bare, _PLACEHOLDER)

    for family in ("input_blocks", "middle_block", "output_blocks"):
        ids = [i for b in bare_of if (i := _block_id(b, family)) is not None]
        for i in range(max(ids) + 1 if ids else 0):
            add_placeholder(f"{family}.{i}.__dreammix_placeholder__")
    for table in ("addition_embed_type", "class_embed_type"):
        for ldm_key in DIFFUSERS_TO_LDM_MAPPING["unet"][table].values():
            add_placeholder(ldm_key)
    for bare in list(bare_of):
        stem, _, leaf = bare.rpartition(".")
        if leaf in ("weight", "bias"):
            add_placeholder(f"{stem}.{'bias' if leaf == 'weight' else 'weight'}")

    converted = convert_ldm_unet_checkpoint(fake, config)
    mapping: dict[str, str] = {}
    for diffusers_key, source in converted.items():
        if source is _PLACEHOLDER:
            continue
        if source in mapping:
            raise DreamMixError(
                f"patch key {source!r} maps to two UNet weights ({mapping[source]}, {diffusers_key})", "model.patch_file"
            )
        mapping[source] = diffusers_key
    unknown += [key for key in bare_of.values() if key not in mapping]
    if unknown:
        raise DreamMixError(
            f"{len(unknown)} Fooocus patch key(s) do not name a UNet weight of this model: {_format_keys(unknown)}",
            "model.patch_file",
        )
    return mapping


def map_patch_keys_to_diffusers(
    patch: Mapping[str, torch.Tensor], unet_config: Mapping, expected_keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Rename a dequantized patch to diffusers UNet keys; every key must map.

    ``expected_keys`` (the UNet's state-dict keys) additionally rejects keys that the converter
    renames but that this UNet does not have (a patch for another architecture).
    """
    mapping = ldm_to_diffusers_unet_keys(patch.keys(), unet_config)
    if expected_keys is not None:
        expected = set(expected_keys)
        missing = [f"{k} → {mapping[k]}" for k in patch if mapping[k] not in expected]
        if missing:
            raise DreamMixError(
                f"{len(missing)} Fooocus patch key(s) name weights this UNet does not have: {_format_keys(missing)}",
                "model.patch_file",
            )
    return {mapping[k]: v for k, v in patch.items()}


def _patchable_parameters(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's parameters under their plain diffusers names, also when the head or LoRA is on."""
    names = {}
    for name, param in unet.named_parameters():
        if name.startswith("conv_in.head.") or "lora_" in name:
            continue
        plain = name.replace("conv_in.conv.", "conv_in.").replace(".base_layer.", ".")
        names[plain] = param
    return names


@torch.no_grad()
def apply_fooocus_patch(unet: nn.Module, patch: Mapping[str, torch.Tensor]) -> list[str]:
    """Add the (diffusers-named) deltas to the UNet's weights in place; return the patched keys.

    Everything is checked before anything is changed, so a bad patch leaves the UNet untouched.
    The sum is formed in float32 and rounded once to the weight's dtype.
    """
    params = _patchable_parameters(unet)
    missing = [k for k in patch if k not in params]
    if missing:
        raise DreamMixError(f"{len(missing)} patch weight(s) not in this UNet: {_format_keys(missing)}", "model.patch_file")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in patch.items() if v.shape != params[k].shape]
    if bad:
        raise DreamMixError(f"patch shape mismatch for {len(bad)} weight(s): {_format_keys(bad, 3)}", "model.patch_file")
    for key, delta in patch.items():
        w = params[key]
        w.copy_((w.to(torch.float32) + delta.to(device=w.device, dtype=torch.float32)).to(w.dtype))
    return sorted(patch)


def fooocus_patch_deltas(unet: nn.Module, device: torch.device | str = "cpu"):
    """Yield ``(diffusers key, float32 delta on device)`` of the patch that built ``unet``, one at a time.

    The file is read once and kept *quantized* on the CPU (uint8: a quarter of the float32
    deltas, half a bf16 UNet for SDXL); each entry is moved to ``device`` still quantized and
    dequantized there only while it is used.
    """
    path = getattr(unet, "_dreammix_fooocus_patch_file", None)
    if path is None:
        raise DreamMixError("this UNet was not built from a Fooocus patch file", "model.patch_file")
    raw = unet.__dict__.get("_dreammix_fooocus_patch_raw")
    if raw is None:
        raw = _torch_load(Path(path), "Fooocus patch file")
        unet.__dict__["_dreammix_fooocus_patch_raw"] = raw
    for key, diffusers_key in unet._dreammix_fooocus_patch_keys.items():
        entry = raw[key]
        entry = entry.to(device) if isinstance(entry, torch.Tensor) else type(entry)(t.to(device) for t in entry)
        yield diffusers_key, dequantize_patch_entry(entry, key=key, source=str(path))


# ----------------------------------------------------------------------------------------------
# Inpaint head and how it enters the UNet
# ----------------------------------------------------------------------------------------------


class FooocusInpaintHead(nn.Module):
    """Fooocus's ``InpaintHead``: replicate-pad by 1, then a bias-free 3x3 conv, 5 → C channels.

    The parameter is called ``head`` as in Fooocus, so the ``.pth`` state dict loads as is.
    """

    def __init__(self, out_channels: int = 320):
        super().__init__()
        self.head = nn.Parameter(torch.zeros(out_channels, HEAD_IN_CHANNELS, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.head.to(x.dtype))

    @classmethod
    def from_file(cls, path: str | Path, out_channels: int | None = None) -> "FooocusInpaintHead":
        """Load ``fooocus_inpaint_head.pth`` (``{"head": Tensor[C, 5, 3, 3]}``) with weights_only."""
        path = Path(path).expanduser()
        raw = _torch_load(path, "Fooocus inpaint head file")
        if not isinstance(raw, Mapping) or set(raw) != {"head"} or not isinstance(raw["head"], torch.Tensor):
            got = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
            raise DreamMixError(f"inpaint head file must hold exactly {{'head': Tensor}}, got {got}", str(path))
        weight = raw["head"]
        if weight.ndim != 4 or tuple(weight.shape[1:]) != (HEAD_IN_CHANNELS, 3, 3) or not weight.is_floating_point():
            raise DreamMixError(f"inpaint head must be a float [C, 5, 3, 3] tensor, got {weight.dtype} {tuple(weight.shape)}", str(path))
        if out_channels is not None and weight.shape[0] != out_channels:
            raise DreamMixError(
                f"inpaint head has {weight.shape[0]} output channels, the UNet's conv_in has {out_channels}", str(path)
            )
        module = cls(weight.shape[0])
        module.load_state_dict({"head": weight.to(torch.float32)})
        return module


class FooocusConvIn(nn.Module):
    """Drop-in ``conv_in`` for a 4-channel UNet that accepts the 9-channel inpainting input.

    ``x = cat([noisy_latents, mask, masked_image_latents], dim=1)`` →
    ``conv(x[:, :4]) + head(x[:, 4:9])``: Fooocus's ``h = input_blocks.0(x) + head_feature``.
    """

    def __init__(self, conv: nn.Conv2d, head: FooocusInpaintHead):
        super().__init__()
        if conv.out_channels != head.head.shape[0]:
            raise DreamMixError(
                f"inpaint head has {head.head.shape[0]} output channels, conv_in has {conv.out_channels}", "model.head_file"
            )
        self.conv = conv
        self.head = head
        # False while the sampler's unpatched-base tail runs (dreammix.sampling.BaseTail): the
        # base's own conv_in only, like Fooocus's refiner, which has no inpaint head.
        self.head_enabled = True
        # Attributes diffusers/peft read from a conv_in.
        self.in_channels = conv.in_channels + HEAD_IN_CHANNELS
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.conv.in_channels
        if x.shape[1] != n + HEAD_IN_CHANNELS:
            # A 4-channel call would silently drop the inpainting conditioning: a caller bug.
            raise ValueError(
                f"Fooocus UNet expects {n + HEAD_IN_CHANNELS} channels "
                f"(noisy latents ⊕ mask ⊕ masked-image latents), got {x.shape[1]}"
            )
        out = self.conv(x[:, :n])
        return out + self.head(x[:, n:]) if self.head_enabled else out


def attach_fooocus_head(unet: nn.Module, head: FooocusInpaintHead) -> nn.Module:
    """Make a 4-channel SDXL UNet take the 9-channel inpainting input (in place; returns ``unet``).

    The head is frozen and moved to the UNet's device/dtype; ``unet.config.in_channels`` becomes 9
    so diffusers' inpainting pipeline feeds mask and masked-image latents.
    """
    if isinstance(unet.conv_in, FooocusConvIn):
        raise DreamMixError("the UNet already has a Fooocus inpaint head", "model")
    if unet.config.in_channels != LATENT_CHANNELS:
        raise DreamMixError(
            f"model=fooocus needs an SDXL base UNet with {LATENT_CHANNELS} input channels, got {unet.config.in_channels}"
            " (use model=sdxl_inpaint for 9-channel inpainting checkpoints)",
            "model.pretrained",
        )
    conv = unet.conv_in
    head.requires_grad_(False)
    head.to(device=conv.weight.device, dtype=conv.weight.dtype)
    unet.conv_in = FooocusConvIn(conv, head)
    unet.register_to_config(in_channels=INPAINT_IN_CHANNELS)
    return unet


def is_fooocus_unet(unet: nn.Module) -> bool:
    return isinstance(getattr(unet, "conv_in", None), FooocusConvIn)


# ----------------------------------------------------------------------------------------------
# Loading the whole thing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FooocusSpec(ModelSpec):
    """``conf/model/fooocus.yaml``: the SDXL base plus where the two Fooocus files come from.

    ``inpaint_repo`` is a hub repo id or a local folder; ``head_file``/``patch_file`` are file
    names inside it, or paths to files (used as they are when they exist or are absolute).
    """

    inpaint_repo: str = "lllyasviel/fooocus_inpaint"
    inpaint_revision: str | None = None
    head_file: str = "fooocus_inpaint_head.pth"
    patch_file: str = "inpaint_v26.fooocus.patch"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("inpaint_repo", "head_file", "patch_file"):
            if not getattr(self, name):
                raise DreamMixError(f"{name} must be set", f"model.{name}")


def resolve_fooocus_file(spec: FooocusSpec, filename: str, key: str) -> Path:
    """A local path for one of the two files: explicit path, file in a local folder, or the hub."""
    candidate = Path(filename).expanduser()
    if candidate.is_absolute() or candidate.is_file():
        if not candidate.is_file():
            raise DreamMixError(f"file not found: {candidate}", f"model.{key}")
        return candidate
    repo = spec.inpaint_repo
    if _looks_like_path(repo):
        local = Path(repo).expanduser() / filename
        if not local.is_file():
            raise DreamMixError(f"file not found: {local}", f"model.{key}")
        return local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=spec.inpaint_revision))
    except (OSError, ValueError, EntryNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DreamMixError(f"cannot get {filename!r} from {repo!r}: {first}", f"model.{key}") from exc


def load_fooocus_components(spec: FooocusSpec, dtype: torch.dtype = torch.float32):
    """SDXL base + Fooocus patch + head → a ``StableDiffusionXLInpaintPipeline`` (9-channel calls).

    The base is loaded with ``StableDiffusionXLPipeline.from_pretrained`` (hub id or local folder),
    the patch is applied to its UNet, the head attached (:func:`attach_fooocus_head`), and the
    components are re-wrapped in the inpainting pipeline so callers treat both bases alike.
    """
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    source = spec.pretrained
    if spec.build_if_missing:
        # Only the tiny test model is built, and only into local folders: never create a folder
        # named like a hub repo in the working directory.
        for value, key in ((source, "pretrained"), (spec.inpaint_repo, "inpaint_repo")):
            if not _looks_like_path(value):
                raise DreamMixError(f"build_if_missing needs a local folder, got hub id {value!r}", f"model.{key}")
        ensure_tiny_fooocus(source, spec.inpaint_repo)
    check_model_folder(source)
    head_path = resolve_fooocus_file(spec, spec.head_file, "head_file")
    patch_path = resolve_fooocus_file(spec, spec.patch_file, "patch_file")
    base = pretrained_pipeline(StableDiffusionXLPipeline, spec, dtype)
    unet = base.unet
    if unet.config.in_channels != LATENT_CHANNELS:
        raise DreamMixError(
            f"model=fooocus needs an SDXL base (4-channel UNet), {source!r} has {unet.config.in_channels} channels",
            "model.pretrained",
        )
    patch = load_fooocus_patch(patch_path)
    apply_fooocus_patch(unet, map_patch_keys_to_diffusers(patch, unet.config, unet.state_dict().keys()))
    # where the patch came from, so the sampler's base tail can take it off in place later
    unet._dreammix_fooocus_patch_file = patch_path
    unet._dreammix_fooocus_patch_keys = ldm_to_diffusers_unet_keys(patch.keys(), unet.config)
    del patch
    head = FooocusInpaintHead.from_file(head_path, out_channels=unet.conv_in.out_channels)
    attach_fooocus_head(unet, head)
    components = {k: v for k, v in base.components.items()}
    pipe = StableDiffusionXLInpaintPipeline(
        **components,
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=bool(base.config.get("force_zeros_for_empty_prompt", True)),
    )
    return finish_pipeline(pipe, spec)


# ----------------------------------------------------------------------------------------------
# Tiny base + synthetic Fooocus files (tests and offline runs)
# ----------------------------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def diffusers_to_ldm_unet_key(key: str, unet_config: Mapping) -> str:
    """A diffusers UNet key in LDM layout (without prefix) — only to *write* synthetic patches.

    The inverse of diffusers' converter for SDXL-shaped UNets; :func:`build_tiny_fooocus_files`
    checks every name by running it back through :func:`ldm_to_diffusers_unet_keys`.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    for table in ("layers", "addition_embed_type"):
        if key in tables[table]:
            return tables[table][key]
    per = unet_config["layers_per_block"] + 1
    p = key.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET_TO_LDM.get(rest[0], rest[0])] + rest[1:])

    if p[0] == "down_blocks":
        b, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * per}.0.op.{p[-1]}"
        j = int(p[3])
        idx = 1 + b * per + j
        return f"input_blocks.{idx}.0.{resnet(p[4:])}" if kind == "resnets" else f"input_blocks.{idx}.1.{'.'.join(p[4:])}"
    if p[0] == "mid_block":
        j = int(p[2])
        return f"middle_block.{2 * j}.{resnet(p[3:])}" if p[1] == "resnets" else f"middle_block.1.{'.'.join(p[3:])}"
    if p[0] == "up_blocks":
        b, kind = int(p[1]), p[2]
        if kind == "upsamplers":
            has_attn = "CrossAttn" in unet_config["up_block_types"][b]
            return f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv.{p[-1]}"
        idx = b * per + int(p[3])
        return f"output_blocks.{idx}.0.{resnet(p[4:])}" if kind == "resnets" else f"output_blocks.{idx}.1.{'.'.join(p[4:])}"
    raise ValueError(f"no LDM name for UNet key {key!r}")


def build_tiny_fooocus(seed: int = 0):
    """A tiny SDXL *base* pipeline (4-channel UNet) with the tiny inpainting model's other parts."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from dreammix.models.tiny import build_tiny_pipeline

    inpaint = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 10)
    unet = UNet2DConditionModel.from_config({**inpaint.unet.config, "in_channels": LATENT_CHANNELS})
    return StableDiffusionXLPipeline(
        vae=inpaint.vae,
        text_encoder=inpaint.text_encoder,
        text_encoder_2=inpaint.text_encoder_2,
        tokenizer=inpaint.tokenizer,
        tokenizer_2=inpaint.tokenizer_2,
        unet=unet,
        scheduler=inpaint.scheduler,
        force_zeros_for_empty_prompt=True,
    )


def synthetic_fooocus_patch(unet: nn.Module, seed: int = 0, scale: float = 0.02, every: int = 1) -> dict[str, tuple]:
    """A patch for ``unet`` in Fooocus's file format: ``{"diffusion_model.<ldm key>": (q, min, max)}``.

    Covers every ``every``-th parameter (all by default) with random deltas of size ~``scale``.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, tuple] = {}
    for i, (name, param) in enumerate(sorted(unet.state_dict().items())):
        if i % every:
            continue
        delta = (torch.rand(param.shape, generator=gen) * 2 - 1) * scale
        out["diffusion_model." + diffusers_to_ldm_unet_key(name, unet.config)] = quantize_delta(delta)
    return out


def build_tiny_fooocus_files(unet: nn.Module, directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``fooocus_inpaint_head.pth`` and ``inpaint_v26.fooocus.patch`` for ``unet`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    patch = synthetic_fooocus_patch(unet, seed)
    mapping = ldm_to_diffusers_unet_keys(patch, unet.config)  # the synthetic names must round-trip
    if sorted(mapping.values()) != sorted(unet.state_dict()):
        raise RuntimeError("synthetic Fooocus patch does not cover the tiny UNet")
    gen = torch.Generator().manual_seed(seed + 1)
    head = torch.randn(unet.config.block_out_channels[0], HEAD_IN_CHANNELS, 3, 3, generator=gen) * 0.1
    head_path, patch_path = directory / "fooocus_inpaint_head.pth", directory / "inpaint_v26.fooocus.patch"
    torch.save({"head": head}, head_path)
    torch.save(patch, patch_path)
    return head_path, patch_path


def ensure_tiny_fooocus(base_dir: str | Path, inpaint_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Build and save the tiny base and its synthetic Fooocus files unless present (atomic renames)."""
    base_dir, inpaint_dir = Path(base_dir).expanduser(), Path(inpaint_dir).expanduser()
    if (base_dir / "model_index.json").is_file() and (inpaint_dir / "inpaint_v26.fooocus.patch").is_file():
        return base_dir, inpaint_dir
    pipe = build_tiny_fooocus(seed)
    for target, write in (
        (base_dir, lambda d: pipe.save_pretrained(d, safe_serialization=True)),
        (inpaint_dir, lambda d: build_tiny_fooocus_files(pipe.unet, d, seed)),
    ):
        marker = "model_index.json" if target == base_dir else "inpaint_v26.fooocus.patch"
        # A leftover without its marker file is replaced; another process's copy is identical (same seed).
        atomic_write_dir(target, write, marker=marker, remove_incomplete=True)
    return base_dir, inpaint_dir
