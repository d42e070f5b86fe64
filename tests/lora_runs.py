"""Trained-subject fixtures for the multi-subject and app tests: real LoRAs for the tiny UNet laid
out as ``train.py`` writes a run (``<run>/lora`` + ``dreammix_run.json`` + ``.hydra/config.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import LORA_ALPHA, LORA_RANK, make_real_lora


def make_lora(tiny_model_dir: Path, directory: Path, seed: int) -> Path:
    """A LoRA with its own random B per seed (seed 0 = conftest's ``make_real_lora``)."""
    if seed == 0 or (directory / "pytorch_lora_weights.safetensors").is_file():
        return make_real_lora(tiny_model_dir, directory)
    import torch
    from diffusers import UNet2DConditionModel

    from dreammix.models.lora import LoraSpec, add_lora, save_lora

    spec = LoraSpec(rank=LORA_RANK, alpha=LORA_ALPHA)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    add_lora(unet, spec)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    save_lora(unet, directory, spec)
    return directory


def make_train_run(tiny_model_dir: Path, run_dir: Path, subject: str, class_noun: str, attributes: dict,
                   seed: int, base_model: str | None = None) -> Path:
    """A train run folder as train.py leaves it; returns its ``lora/`` folder."""
    lora = make_lora(tiny_model_dir, run_dir / "lora", seed)
    info = {"subject": subject, "class_noun": class_noun, "source_prompt": f"a photo of sks {class_noun}",
            "base_model": base_model or str(tiny_model_dir), "steps": 1}
    (lora / "dreammix_run.json").write_text(json.dumps(info))
    (run_dir / ".hydra").mkdir(exist_ok=True)
    subject_yaml = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in attributes.items())
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"subject:\n  name: {subject}\n  class_noun: {class_noun}\n  image_dir: ${{paths.dreambooth_dir}}/x\n"
        f"  attributes_file: null\n  attributes:\n{subject_yaml}\n"
    )
    return lora
