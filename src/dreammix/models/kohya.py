"""The webui/kohya LoRA layout: what ComfyUI, A1111/Forge and Fooocus load for SDXL.

kohya's sd-scripts train SDXL on Stability's original (SGM/LDM) UNet, so an SDXL LoRA names each
adapted module by its *original* path with dots turned into underscores, behind ``lora_unet_``:
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k`` (diffusers) is
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k`` (kohya). Each module has three
tensors: ``.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and a scalar
``.alpha``; the loaders scale the product by ``alpha / rank``. Without ``.alpha`` they take
``alpha = rank`` — which is also what diffusers' ``convert_state_dict_to_kohya`` writes, so a
rank-2 / alpha-8 LoRA converted with it acts 4× weaker. Here alpha is the trained one.

Block mapping (diffusers → SGM), per ``per = layers_per_block + 1`` (SDXL: 3):

- ``down_blocks.b.resnets.j`` → ``input_blocks.{1 + b·per + j}.0``, ``.attentions.j`` → ``….1``,
  ``down_blocks.b.downsamplers.0.conv`` → ``input_blocks.{(b+1)·per}.0.op``
- ``mid_block.resnets.j`` → ``middle_block.{2j}``, ``mid_block.attentions.0`` → ``middle_block.1``
- ``up_blocks.b.resnets.j`` → ``output_blocks.{b·per + j}.0``, ``.attentions.j`` → ``….1``,
  ``up_blocks.b.upsamplers.0.conv`` → ``output_blocks.{b·per + per − 1}.{2 if attentions else 1}.conv``
- inside a resnet: ``norm1/conv1/norm2/conv2/time_emb_proj/conv_shortcut`` →
  ``in_layers.0/in_layers.2/out_layers.0/out_layers.3/emb_layers.1/skip_connection``; inside an
  attention block the names are the same in both layouts
- ``conv_in`` → ``input_blocks.0.0``, ``time_embedding.linear_{1,2}`` → ``time_embed.{0,2}``,
  ``add_embedding.linear_{1,2}`` → ``label_emb.0.{0,2}``, ``conv_out`` → ``out.2``

The Fooocus base is an SDXL *base* UNet: the same names (its inpaint head is not a LoRA target;
``conv_in.conv`` of :class:`~dreammix.models.fooocus.FooocusConvIn` is the base's ``conv_in``).
A module outside this scheme is refused (:class:`DreamMixError`), never written under a name no
loader would find.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from dreammix.errors import DreamMixError

PREFIX = "lora_unet_"
#: Suffixes of the two factors in the diffusers-format file (``save_lora``: diffusers renames only
#: the attention projections to ``lora.down/up``, other layers keep peft's ``lora_A/B``) and in kohya's.
DIFFUSERS_FACTORS = {
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
}

_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0", "conv_in.conv": "input_blocks.0.0",  # plain / Fooocus-wrapped conv_in
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}
_ATTENTION_LEAF = re.compile(
    r"^(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)


def _cannot(module: str, why: str) -> DreamMixError:
    return DreamMixError(f"the kohya/webui LoRA layout cannot express UNet module {module!r}: {why}", "lora.target_modules")


def sgm_module_name(module: str, unet_config: Mapping) -> str:
    """The original SGM path of a diffusers UNet module that carries a LoRA (see module docstring)."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    lpb = unet_config.get("layers_per_block")
    if not isinstance(lpb, int):
        raise _cannot(module, f"layers_per_block must be one integer, got {lpb!r}")
    per = lpb + 1
    p = module.split(".")

    def inner(kind: str, rest: list[str]) -> str:
        leaf = ".".join(rest)
        if kind == "resnets":
            if len(rest) != 1 or rest[0] not in _RESNET:
                raise _cannot(module, f"no original name for resnet layer {leaf!r}")
            return _RESNET[rest[0]]
        if not _ATTENTION_LEAF.match(leaf):
            raise _cannot(module, f"no original name for attention layer {leaf!r}")
        return leaf

    try:
        if p[0] == "down_blocks" and p[2] in ("resnets", "attentions"):
            b, j = int(p[1]), int(p[3])
            if j >= lpb:
                raise _cannot(module, f"down block layer {j} >= layers_per_block {lpb}")
            return f"input_blocks.{1 + b * per + j}.{0 if p[2] == 'resnets' else 1}.{inner(p[2], p[4:])}"
        if p[0] == "down_blocks" and p[2:] == ["downsamplers", "0", "conv"]:
            return f"input_blocks.{(int(p[1]) + 1) * per}.0.op"
        if p[0] == "mid_block" and p[1] == "resnets" and p[2] in ("0", "1"):
            return f"middle_block.{2 * int(p[2])}.{inner('resnets', p[3:])}"
        if p[0] == "mid_block" and p[1:3] == ["attentions", "0"]:
            return f"middle_block.1.{inner('attentions', p[3:])}"
        if p[0] == "up_blocks" and p[2] in ("resnets", "attentions"):
            b, j = int(p[1]), int(p[3])
            if j >= per:
                raise _cannot(module, f"up block layer {j} >= layers_per_block + 1")
            return f"output_blocks.{b * per + j}.{0 if p[2] == 'resnets' else 1}.{inner(p[2], p[4:])}"
        if p[0] == "up_blocks" and p[2:] == ["upsamplers", "0", "conv"]:
            b = int(p[1])
            has_attention = "CrossAttn" in unet_config["up_block_types"][b]
            return f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.conv"
    except (IndexError, ValueError) as exc:
        raise _cannot(module, "unexpected path") from exc
    raise _cannot(module, "not a block, resnet, attention or embedding layer of an SDXL UNet")


def kohya_module_name(module: str, unet_config: Mapping) -> str:
    """``lora_unet_`` + the SGM path with ``_`` for ``.``."""
    return PREFIX + sgm_module_name(module, unet_config).replace(".", "_")


def to_kohya_state_dict(weights: Mapping[str, torch.Tensor], alpha: float, unet_config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers-format LoRA (``[unet.]<module>.lora.{down,up}.weight``) to kohya's layout
    and add the trained ``alpha`` per module. Pure renaming: works on meta tensors too."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            raise DreamMixError(f"only UNet LoRAs can be exported, got tensor {key!r}", "lora")
        body = key.removeprefix("unet.")
        for suffix, kohya_suffix in DIFFUSERS_FACTORS.items():
            if body.endswith("." + suffix):
                module = body[: -len(suffix) - 1]
                name = kohya_module_name(module, unet_config)
                if f"{name}.{kohya_suffix}" in out:
                    raise DreamMixError(f"two LoRA modules map to the kohya name {name!r}", "lora")
                out[f"{name}.{kohya_suffix}"] = tensor
                out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
                break
        else:
            raise DreamMixError(f"tensor {key!r} is not a LoRA factor the kohya layout has (DoRA is not exported)", "lora")
    return out


def kohya_metadata(info: Mapping, resolution: int, title: str) -> dict[str, str]:
    """``ss_*`` (kohya's training metadata, shown by A1111/Forge) and SAI ModelSpec 1.0 keys
    (``modelspec.*``) from a run's ``dreammix_run.json`` record. All values are strings (safetensors)."""
    from dreammix.model_card import trigger_words

    trigger = trigger_words(info)
    lora = info["lora"]
    steps = str(info.get("steps", ""))
    loss = info.get("loss", {})
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora["rank"]),
        "ss_network_alpha": str(float(lora["alpha"])),
        "ss_network_args": json.dumps({"target_modules": list(lora.get("target_modules", []))}),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": str(info.get("base_model", "")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_output_name": title,
        "ss_tag_frequency": json.dumps({str(info.get("subject", "subject")): {trigger: 1}}),
        "ss_training_comment": f"DreamMix subject LoRA; trigger words: {trigger}; "
        f"loss: {info.get('loss_preset') or 'custom'} {json.dumps(loss, sort_keys=True)}",
        "ss_dreammix_loss": json.dumps(loss, sort_keys=True),
        "ss_dreammix_loss_preset": str(info.get("loss_preset") or ""),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger,
        "modelspec.usage_hint": f"Trigger words: {trigger}",
        "modelspec.description": f"DreamMix inpainting LoRA of {info.get('subject', 'a subject')} "
        f"on {info.get('base_model', 'SDXL')}, {steps} steps, rank {lora['rank']}, alpha {float(lora['alpha'])}.",
    }


def save_kohya_lora(
    path: str | Path, weights: Mapping[str, torch.Tensor], alpha: float, unet_config: Mapping, metadata: Mapping[str, str]
) -> Path:
    """Write ``weights`` (diffusers format) as one kohya-layout ``.safetensors`` file, atomically."""
    from safetensors.torch import save

    from dreammix.atomic import atomic_write_bytes

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in to_kohya_state_dict(weights, alpha, unet_config).items()}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=dict(metadata)))
    return path
