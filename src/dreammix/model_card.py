"""``lora/README.md``: the model card of a trained subject LoRA.

What someone who is handed only the ``lora/`` folder needs: which base it was trained on, the
trigger words, the training settings and loss (Eq. 7/8 weights, or the reference preset), a sample
grid when the run rendered one, and how to load each file in diffusers, ComfyUI and Fooocus.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


def trigger_words(info: Mapping) -> str:
    """``sks <class>``: the identifier and class noun the subject was trained under (the training
    prompt is ``a photo of sks <class>``)."""
    from dreammix.tas import IDENTIFIER

    return f"{IDENTIFIER} {info.get('class_noun', '')}".strip()


def model_card(info: Mapping, kohya_file: str | None, diffusers_file: str, sample_grid: str | None = None) -> str:
    """Markdown for ``lora/README.md`` from a run record (``dreammix_run.json``); ``kohya_file``
    None: no webui file (DoRA), the card says so."""
    if kohya_file is None:
        kohya_file = "(none: DoRA LoRAs are exported for diffusers only)"
    lora, loss = info["lora"], info.get("loss", {})
    trigger = trigger_words(info)
    base = info.get("base_model", "?")
    model = info.get("model", "")
    fooocus = model in ("fooocus", "tiny_fooocus")
    loss_lines = "\n".join(f"| `loss.{k}` | `{v}` |" for k, v in sorted(loss.items()))
    extra = info.get("training", {})
    rows = [
        f"| steps | `{info.get('steps', '?')}` |",
        f"| resolution | `{info.get('resolution', '?')}` |",
        f"| LoRA rank | `{lora['rank']}` |",
        f"| LoRA alpha | `{lora['alpha']}` (scale alpha/rank = {float(lora['alpha']) / int(lora['rank']):g}) |",
        f"| target modules | `{', '.join(lora.get('target_modules', []))}` |",
    ] + [f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(extra.items())]
    settings = "\n".join(rows)
    sample = f"\n## Samples\n\n![masked input | sample]({sample_grid})\n" if sample_grid else ""
    base_note = (
        "an SDXL **base** checkpoint made an inpainting model with Fooocus's inpaint head and patch: "
        "use the LoRA in Fooocus (inpaint mode) or with the same base + Fooocus inpaint files"
        if fooocus
        else "an SDXL **inpainting** checkpoint (9-channel UNet): load the LoRA on top of it"
    )
    return f"""---
base_model: {base}
tags: [stable-diffusion-xl, lora, inpainting, dreammix]
instance_prompt: {trigger}
---

# DreamMix LoRA: {info.get('subject', 'subject')}

Subject-driven inpainting LoRA trained with DreamMix (LoRA fine-tuning of an SDXL inpainting UNet).

- **Base model:** `{base}` (`model={model}`): {base_note}.
- **Trigger words:** `{trigger}` — put them in the prompt, e.g. `a {trigger} on a table` (trained with `{info.get('source_prompt', '')}`).
- **Files:** `{diffusers_file}` (diffusers/peft names, adapter metadata) and `{kohya_file}`
  (kohya/webui layout: `lora_unet_*` names with the trained alpha, `ss_*` + `modelspec.*` metadata).

## Training settings

| setting | value |
|---|---|
{settings}

## Loss{f" (`loss={info['loss_preset']}`)" if info.get("loss_preset") else ""}

The mask-reweighted loss (paper Eq. 7: weight `tau_in` inside the mask, `tau_out` outside) on the
subject images plus `beta` × the same loss on regular images (Eq. 8); `regular_mode: sampled` is
the public reference code's preset (a step is a regular batch with probability `regular_prob`).

| key | value |
|---|---|
{loss_lines}
{sample}
## Use it

**diffusers**

```python
from diffusers import StableDiffusionXLInpaintPipeline
pipe = StableDiffusionXLInpaintPipeline.from_pretrained("{base}")
pipe.load_lora_weights("path/to/lora")  # {diffusers_file}; "path/to/lora/{kohya_file}" also works
image = pipe("a {trigger} on a table", image=image, mask_image=mask).images[0]
```

or DreamMix's own pipeline (DIF + TAS): `python src/inpaint.py lora=path/to/lora ...`.

**ComfyUI**: copy `{kohya_file}` to `ComfyUI/models/loras/`, add a *Load LoRA* node between the
checkpoint loader and the sampler (strength 1.0), and use the trigger words in the prompt.

**A1111 / Forge**: copy `{kohya_file}` to `models/Lora/` and write `<lora:{kohya_file.removesuffix('.safetensors')}:1> {trigger}` in the prompt.

**Fooocus**: copy `{kohya_file}` to `Fooocus/models/loras/`, pick it under *Advanced → Models → LoRAs*
(weight 1.0), switch on *Input Image → Inpaint or Outpaint*, and use the trigger words.
"""
