"""Attribute Decoupling Mechanism (paper §3.3): the regular set for Eq. 8.

``run_adm(cfg)`` (``python src/adm.py subject=can``) does three things, each resumable:

1. **Attribute dictionary.** The VLM looks at the subject images and lists attribute words by
   category (``vlm=openai``); with ``vlm=offline`` the dictionary comes from
   ``subject.attributes_file`` or the subject config's ``attributes``. Saved to
   ``<out_dir>/attributes.json``; a later run of the same set reuses it.
2. **Regular prompts.** ``adm.num_prompts`` prompts "a [attributes] <class> [attributes]", by
   seeded random recombination of the dictionary words (``adm.prompt_source=random``) or written
   by the VLM (``vlm``). Saved to ``<out_dir>/prompts.json``.
3. **Regular images with masks.** Each prompt's class object is inpainted by the base model into
   a box/ellipse mask on a background (plain neutral ones made in code, or ``adm.background_dir``),
   so the mask is exact by construction and no segmentation model is needed. Item ``i`` uses
   ``seed = adm.base_seed + i`` for its background, mask and noise, so it is the same whether it
   is made in the first run or a resumed one, in any batch. ``adm.route=t2i_segment`` instead
   generates each prompt with the SDXL text-to-image base and segments the object
   (:mod:`dreammix.adm_t2i`, the paper's wording and the public code's route).

Output (the contract with the training datamodule)::

    <out_dir>/images/000000.png   RGB
    <out_dir>/masks/000000.png    L, 0/255 (255 = object), same size as the image
    <out_dir>/manifest.jsonl      {"image": "images/000000.png", "mask": "masks/000000.png",
                                   "prompt": "...", "seed": 123}   (paths relative to out_dir)

Image and mask are written atomically before their manifest line is appended and fsynced, so a
killed run never leaves a line whose files are missing; a rerun skips what the manifest lists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dreammix.attributes import (
    ask_vlm_for_attributes,
    ask_vlm_for_prompts,
    compose_prompts,
    load_attributes_file,
    normalize_attributes,
    offline_attributes,
    select_attributes_to_eliminate,
)
from dreammix.adm_manifest import MANIFEST_KEYS, MANIFEST_NAME, append_manifest, read_manifest, resolve_device
from dreammix.atomic import atomic_save_image, atomic_write_text
from dreammix.errors import DreamMixError
from dreammix.locks import folder_lock
from dreammix.paths import check_own_folder, ensure_writable_dir, is_empty_dir
from dreammix.tracking import wandb_enabled, wandb_init_kwargs
from dreammix.vlm import make_vlm_client

__all__ = [
    "MANIFEST_NAME",
    "RegularItem",
    "append_manifest",
    "generate_regular_set",
    "make_background",
    "make_mask",
    "read_manifest",
    "resolve_attributes",
    "run_adm",
    "select_attributes_to_eliminate",
]

log = logging.getLogger(__name__)

ATTRIBUTES_NAME = "attributes.json"
PROMPTS_NAME = "prompts.json"

#: Plain, low-saturation wall/floor colors for the default backgrounds.
_NEUTRALS = np.array(
    [
        [236, 236, 232], [214, 212, 206], [190, 188, 184], [160, 158, 155], [228, 220, 204],
        [204, 192, 172], [176, 164, 146], [208, 214, 220], [180, 188, 196], [150, 142, 134],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class RegularItem:
    """One regular sample to make: its index (file name), prompt and seed."""

    index: int
    prompt: str
    seed: int

    @property
    def image(self) -> str:
        return f"images/{self.index:06d}.png"

    @property
    def mask(self) -> str:
        return f"masks/{self.index:06d}.png"

    def manifest_entry(self) -> dict[str, Any]:
        return {"image": self.image, "mask": self.mask, "prompt": self.prompt, "seed": self.seed}


# ----------------------------------------------------------------------------------------------
# Masks and backgrounds


def make_mask(seed: int, size: tuple[int, int], shape: str = "random",
              area: Sequence[float] = (0.3, 0.6)) -> Image.Image:
    """A binary L-mode mask (0/255) with one box or ellipse covering ``area`` of the image.

    Area fraction, aspect ratio (0.6–1.6), shape (for ``random``) and position all follow from
    ``seed``, so the mask of item ``i`` never depends on the run that makes it.
    """
    lo, hi = float(area[0]), float(area[1])
    if not 0 < lo <= hi < 1:
        raise DreamMixError(f"mask area must satisfy 0 < low <= high < 1, got {list(area)}", "adm.mask_area")
    if shape not in ("box", "ellipse", "random"):
        raise DreamMixError(f"mask shape must be box|ellipse|random, got {shape!r}", "adm.mask_shape")
    rng = random.Random(f"dreammix-adm-mask:{seed}")
    width, height = size
    fraction = rng.uniform(lo, hi)
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    kind = rng.choice(("box", "ellipse")) if shape == "random" else shape
    # An ellipse fills pi/4 of its bounding box.
    box_area = fraction * width * height * (4 / math.pi if kind == "ellipse" else 1.0)
    w = min(float(width), math.sqrt(box_area * aspect))
    h = min(float(height), box_area / w)
    w = min(float(width), box_area / h)
    x0 = rng.uniform(0, width - w)
    y0 = rng.uniform(0, height - h)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    coords = [round(x0), round(y0), round(x0 + w) - 1, round(y0 + h) - 1]
    (draw.ellipse if kind == "ellipse" else draw.rectangle)(coords, fill=255)
    return mask


def make_background(seed: int, size: tuple[int, int], files: Sequence[Path] = ()) -> Image.Image:
    """The background for item ``seed``: a square crop of one of ``files``, or a plain neutral
    wall-and-floor gradient made in code (no data needed, nothing to distract the object)."""
    rng = np.random.default_rng([seed, 7])
    width, height = size
    if files:
        from dreammix.data.images import load_image

        image = load_image(files[int(rng.integers(len(files)))])
        side = min(image.size)
        left = int(rng.integers(image.width - side + 1))
        top = int(rng.integers(image.height - side + 1))
        return image.crop((left, top, left + side, top + side)).resize(size, Image.BICUBIC)
    wall, floor = _NEUTRALS[rng.choice(len(_NEUTRALS), size=2, replace=False)]
    horizon = rng.uniform(0.55, 0.8)
    y = (np.arange(height, dtype=np.float32) / max(1, height - 1))[:, None]
    light = 1.0 + 0.08 * (0.5 - y)  # a little brighter at the top, like room light
    wall_part = wall * (light * (1 - 0.1 * y / horizon))[..., None]
    floor_part = floor * (0.92 + 0.08 * (y - horizon) / max(1e-3, 1 - horizon))[..., None]
    column = np.where((y < horizon)[..., None], wall_part, floor_part)  # (H, 1, 3)
    pixels = np.broadcast_to(column, (height, width, 3))
    pixels = pixels + rng.normal(0.0, 2.0, size=(height, width, 1))  # faint grain, not flat color
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------------------------
# Files


def clear_regular_set(out_dir: str | Path) -> None:
    """Remove what ADM wrote in ``out_dir`` and nothing else: the files its manifest lists, its
    three bookkeeping files, then ``images/`` and ``masks/`` only if that left them empty.

    A file the manifest does not list (a user's own, or one a killed run wrote before its manifest
    line) is kept; a later run overwrites only its own ``images/NNNNNN.png`` names.
    """
    out_dir = Path(out_dir)
    for entry in read_manifest(out_dir):
        for key in ("image", "mask"):
            (out_dir / entry[key]).unlink(missing_ok=True)
    for name in (MANIFEST_NAME, ATTRIBUTES_NAME, PROMPTS_NAME, "dropped.jsonl"):  # dropped: adm_t2i
        (out_dir / name).unlink(missing_ok=True)
    for name in ("images", "masks"):
        if (out_dir / name).is_dir() and is_empty_dir(out_dir / name):
            (out_dir / name).rmdir()


def check_adm_folder(out_dir: Path) -> None:
    """``adm.out_dir`` must be a new or empty folder, or a regular set ADM made (it has one of its
    bookkeeping files): ADM never writes ``images/000000.png`` into a folder of someone else's."""
    check_own_folder(out_dir, (MANIFEST_NAME, ATTRIBUTES_NAME, PROMPTS_NAME), "an ADM regular set", "adm.out_dir")


# ----------------------------------------------------------------------------------------------
# Generation


def generate_regular_set(
    pipe,
    items: Sequence[RegularItem],
    out_dir: str | Path,
    *,
    resolution: int,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    background_files: Sequence[Path] = (),
    mask_shape: str = "random",
    mask_area: Sequence[float] = (0.3, 0.6),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Inpaint each item's prompt into its mask on its background; returns the full manifest.

    Items already in the manifest are skipped. ``strength=1.0`` because the masked region must be
    generated from pure noise (diffusers' default 0.9999 would keep a trace of the background).
    Each item gets its own CPU generator seeded with ``item.seed``, so its noise does not depend
    on the batch it lands in or on the device.
    """
    import torch
    from tqdm.auto import tqdm

    from dreammix.metrics.common import batched

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    done = {e["image"] for e in read_manifest(out_dir, repair=True)}
    pending = [item for item in items if item.image not in done]
    size = (resolution, resolution)
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="ADM regular set", unit="img",
               disable=not progress)
    try:
        for batch in batched(pending, batch_size):
            backgrounds = [make_background(item.seed, size, background_files) for item in batch]
            masks = [make_mask(item.seed, size, mask_shape, mask_area) for item in batch]
            generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
            with torch.inference_mode():
                images = pipe(
                    prompt=[item.prompt for item in batch],
                    negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                    image=backgrounds,
                    mask_image=masks,
                    height=resolution,
                    width=resolution,
                    strength=1.0,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generators,
                    output_type="pil",
                ).images
            for item, image, mask in zip(batch, images, masks):
                image = image.convert("RGB")
                if image.size != size:
                    image = image.resize(size, Image.BICUBIC)
                atomic_save_image(image, out_dir / item.image)
                atomic_save_image(mask, out_dir / item.mask)
                append_manifest(out_dir, item.manifest_entry())
                bar.update(1)
    finally:
        bar.close()
    return read_manifest(out_dir)


# ----------------------------------------------------------------------------------------------
# The ADM run


def _subject_images(subject_cfg: Mapping[str, Any]) -> list[Path]:
    from dreammix.data.images import list_images

    image_dir = subject_cfg.get("image_dir")
    if not image_dir:
        raise DreamMixError("the VLM needs the subject images", "subject.image_dir")
    images = list_images(image_dir)
    if not images:
        raise DreamMixError("no images in the subject folder", str(image_dir))
    return images


def resolve_attributes(cfg, client=None, out_dir: str | Path | None = None) -> tuple[dict[str, list[str]], str]:
    """The subject's attribute dictionary and where it came from.

    ``<out_dir>/attributes.json`` of an existing regular set wins (a resumed run must use the
    dictionary its prompts were made from); then ``subject.attributes_file``; then the VLM when
    a client is given; else the subject config's ``attributes``.
    """
    subject = cfg.subject
    if out_dir is not None and (Path(out_dir) / ATTRIBUTES_NAME).is_file():
        return load_attributes_file(Path(out_dir) / ATTRIBUTES_NAME), str(Path(out_dir) / ATTRIBUTES_NAME)
    if subject.get("attributes_file"):
        return load_attributes_file(subject.attributes_file), str(subject.attributes_file)
    if client is not None:
        return ask_vlm_for_attributes(client, subject.class_noun, _subject_images(subject)), client.where
    attributes = offline_attributes(subject)
    if not attributes:
        raise DreamMixError(
            f"no attribute dictionary for subject {subject.name!r}: set subject.attributes_file=FILE.json or "
            "subject.attributes, or use a VLM (vlm=openai)",
            "subject.attributes",
        )
    return attributes, f"conf/subject/{subject.name}.yaml"


def _prompt_settings(cfg) -> dict[str, Any]:
    adm = cfg.adm
    if adm.prompt_source == "class":  # DreamBooth prior preservation: one class prompt, no attributes
        return {"source": "class", "base_seed": int(adm.base_seed), "class_prompt": str(adm.class_prompt)}
    return {
        "source": adm.prompt_source,
        "base_seed": int(adm.base_seed),
        "identifier": adm.identifier,
        "class_noun": cfg.subject.class_noun,
        "min_before": int(adm.min_before),
        "max_before": int(adm.max_before),
        "after_prob": float(adm.after_prob),
    }


def plan_prompts(cfg, attributes: Mapping[str, Sequence[str]], client, stored: Mapping[str, Any] | None) -> list[str]:
    """``adm.num_prompts`` prompts: the stored ones of this set first, then new ones.

    Composed prompts depend only on ``(base_seed, index)``, so a longer list keeps its start;
    VLM-written prompts are topped up with composed ones if the VLM gives too few.
    """
    adm = cfg.adm
    n = int(adm.num_prompts)
    settings = _prompt_settings(cfg)
    kept = list(stored["prompts"]) if stored else []
    if len(kept) >= n:
        return kept[:n]
    if settings["source"] == "class":
        return [settings["class_prompt"]] * n
    composed = compose_prompts(
        attributes, cfg.subject.class_noun, n, settings["base_seed"], identifier=settings["identifier"],
        min_before=settings["min_before"], max_before=settings["max_before"], after_prob=settings["after_prob"],
    )
    if settings["source"] == "random":
        return kept + composed[len(kept):]
    if client is None:
        raise DreamMixError("adm.prompt_source=vlm needs a VLM (vlm=openai), not vlm=offline", "adm.prompt_source")
    written = ask_vlm_for_prompts(client, attributes, cfg.subject.class_noun, n)
    if settings["identifier"]:
        written = [_with_identifier(p, settings["identifier"]) for p in written]
    fresh = [p for p in written if p not in kept]
    prompts = (kept + fresh)[:n]
    if len(prompts) < n:
        log.warning("the VLM wrote %d usable prompts; composing the other %d", len(prompts), n - len(prompts))
        prompts += composed[len(prompts):]
    return prompts


def _with_identifier(prompt: str, identifier: str) -> str:
    words = prompt.split()
    if identifier in words:
        return prompt
    if words and words[0].lower() in ("a", "an", "the"):
        return " ".join(["a", identifier] + words[1:])
    return f"a {identifier} {prompt}"


def _check_config(adm) -> None:
    if int(adm.num_prompts) < 1:
        raise DreamMixError(f"must be >= 1, got {adm.num_prompts}", "adm.num_prompts")
    if int(adm.batch_size) < 1:
        raise DreamMixError(f"must be >= 1, got {adm.batch_size}", "adm.batch_size")
    if adm.prompt_source not in ("random", "vlm", "class"):
        raise DreamMixError(f"must be random|vlm|class, got {adm.prompt_source!r}", "adm.prompt_source")
    if adm.prompt_source == "class" and not str(adm.get("class_prompt") or "").strip():
        raise DreamMixError("prompt_source=class needs a class prompt", "adm.class_prompt")
    if int(adm.num_inference_steps) < 1:
        raise DreamMixError(f"must be >= 1, got {adm.num_inference_steps}", "adm.num_inference_steps")
    make_mask(0, (8, 8), adm.mask_shape, adm.mask_area)  # validates shape and area


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DreamMixError(f"cannot read {path.name}: {exc}", str(path)) from exc


def run_adm(cfg) -> Path:
    """Build (or finish) the regular set of ``cfg.subject`` in ``cfg.adm.out_dir``; returns it.

    Every VLM call happens before anything is written (or, with ``adm.overwrite``, removed), so a
    run that cannot reach the VLM leaves ``out_dir`` as it was (give or take the folder itself and
    its lock file). The folder must be new, empty or an ADM set (:func:`check_adm_folder`), and one
    run at a time writes there (:func:`dreammix.locks.folder_lock`).
    """
    from dreammix.adm_t2i import check_route_config

    _check_config(cfg.adm)
    check_route_config(cfg)
    out_dir = Path(str(cfg.adm.out_dir))
    check_adm_folder(out_dir)
    with contextlib.ExitStack() as lock:  # taken in _run_adm before its first write
        return _run_adm(cfg, out_dir, lock)


def _run_adm(cfg, out_dir: Path, lock: contextlib.ExitStack) -> Path:
    from dreammix.adm_t2i import check_route

    adm = cfg.adm
    overwrite = bool(adm.overwrite)
    client = make_vlm_client(cfg.get("vlm"))

    if adm.prompt_source == "class":  # class-prior images need no attribute dictionary (Eq. 2)
        attributes, source = {}, "none: adm.prompt_source=class"
    else:
        attributes, source = resolve_attributes(cfg, client, None if overwrite else out_dir)
    log.info("attribute dictionary of %s (from %s): %s", cfg.subject.name, source, json.dumps(attributes))
    offline = offline_attributes(cfg.subject) if client is None else None
    if source.endswith(ATTRIBUTES_NAME) and offline and normalize_attributes(offline, "subject") != attributes:
        log.warning("%s differs from the subject's dictionary; keeping the set's own (adm.overwrite=true rebuilds)",
                    out_dir / ATTRIBUTES_NAME)

    settings = _prompt_settings(cfg)
    stored = _read_json(out_dir / PROMPTS_NAME) if (out_dir / PROMPTS_NAME).is_file() and not overwrite else None
    if stored is not None and stored.get("settings") != settings:
        if read_manifest(out_dir):
            raise DreamMixError(
                "this regular set was made with other prompt settings (prompt_source, base_seed, identifier, "
                "...); use adm.overwrite=true to rebuild it or another adm.out_dir",
                str(out_dir / PROMPTS_NAME),
            )
        stored = None
    prompts = plan_prompts(cfg, attributes, client, stored)
    items = [RegularItem(i, prompt, int(adm.base_seed) + i) for i, prompt in enumerate(prompts)]

    ensure_writable_dir(out_dir, "adm.out_dir")
    lock.enter_context(folder_lock(out_dir, "adm.out_dir"))  # a second run on this set stops here
    if overwrite:  # only now: a failed VLM call above must not cost the user the old set
        clear_regular_set(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / ATTRIBUTES_NAME, json.dumps(attributes, indent=2, ensure_ascii=False) + "\n")
    all_prompts = prompts if not stored or len(stored["prompts"]) <= len(prompts) else list(stored["prompts"])
    atomic_write_text(out_dir / PROMPTS_NAME,
                      json.dumps({"settings": settings, "prompts": all_prompts}, indent=1,
                                 ensure_ascii=False) + "\n")

    existing = {e["image"]: e for e in read_manifest(out_dir, repair=True)}
    _check_manifest_matches(existing, items, out_dir)
    check_route(existing.values(), str(adm.route), out_dir)
    pending = [item for item in items if item.image not in existing]
    log.info("regular set %s: %d of %d items to make", out_dir, len(pending), len(items))
    if pending:
        _generate(cfg, items, out_dir)
    entries = read_manifest(out_dir)
    _log_to_wandb(cfg, out_dir, attributes, entries)
    return out_dir


def _check_manifest_matches(existing: Mapping[str, Mapping[str, Any]], items: Sequence[RegularItem], out_dir: Path) -> None:
    """An item already made for another prompt or seed means the plan changed under the set."""
    for item in items:
        entry = existing.get(item.image)
        if entry is not None and (entry["prompt"] != item.prompt or int(entry["seed"]) != item.seed):
            raise DreamMixError(
                f"{item.image} was made for {entry['prompt']!r} (seed {entry['seed']}), not {item.prompt!r} "
                f"(seed {item.seed}); use adm.overwrite=true or another adm.out_dir",
                str(out_dir / MANIFEST_NAME),
            )


def _generate(cfg, items: Sequence[RegularItem], out_dir: Path) -> None:
    from dreammix.data.images import list_images
    from dreammix.models.loading import load_pipeline, model_spec_from_config, resolve_dtype

    adm = cfg.adm
    if adm.route == "t2i_segment":
        from dreammix.adm_t2i import generate_t2i_segment

        return generate_t2i_segment(cfg, items, out_dir)
    background_files: list[Path] = []
    if adm.background_dir:
        background_files = list_images(adm.background_dir)
        if not background_files:
            raise DreamMixError("no images in the background folder", "adm.background_dir")
    spec = model_spec_from_config(cfg.model)
    device = resolve_device(adm.device)
    pipe = load_pipeline(spec, resolve_dtype(spec.weight_dtype, device))
    pipe.to(device)
    generate_regular_set(
        pipe,
        items,
        out_dir,
        resolution=int(adm.resolution),
        num_inference_steps=int(adm.num_inference_steps),
        guidance_scale=float(adm.guidance_scale),
        negative_prompt=adm.negative_prompt or None,
        batch_size=int(adm.batch_size),
        background_files=background_files,
        mask_shape=adm.mask_shape,
        mask_area=list(adm.mask_area),
    )


def _log_to_wandb(cfg, out_dir: Path, attributes: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> None:
    """Log the dictionary and a sample table to W&B (offline unless WANDB_MODE says otherwise).

    The logged config holds the *name* of the key's environment variable, never the key.
    """
    if not wandb_enabled(cfg):
        return
    import wandb

    run = wandb.init(**wandb_init_kwargs(cfg, f"adm-{cfg.subject.name}-{Path(str(cfg.run_dir)).name}", cfg.run_dir, "adm"))
    try:
        table = wandb.Table(columns=["image", "mask", "prompt", "seed"])
        for entry in list(entries)[: int(cfg.adm.get("log_samples", 16))]:
            table.add_data(wandb.Image(str(out_dir / entry["image"])), wandb.Image(str(out_dir / entry["mask"])),
                           entry["prompt"], entry["seed"])
        run.log({"adm/samples": table, "adm/num_items": len(entries)})
        run.summary["adm/attributes"] = json.dumps(dict(attributes), ensure_ascii=False)
    finally:
        run.finish()
