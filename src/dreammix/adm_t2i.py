"""ADM's text-to-image route (``adm.route=t2i_segment``): paper §3.3 as written and as run publicly.

§3.3: "we generate new images based on the reconstructed text prompts to form a regular
benchmark D_r = {x_r, p_r}". The authors' public code does this with an SDXL *text-to-image*
model and then finds each object's mask by text-prompted segmentation. This module does the same:

1. the SDXL base (``model.t2i_pretrained``: ``stabilityai/stable-diffusion-xl-base-1.0`` for
   ``model=sdxl_inpaint``, the model's own base for ``model=fooocus``; the tiny base for tiny
   models) generates each composed prompt with diffusers' ``StableDiffusionXLPipeline``;
2. CLIPSeg (:mod:`dreammix.segment`) segments the class noun (``adm.t2i_segment.query``);
3. an image whose mask covers less than ``min_area`` (no object found) or more than ``max_area``
   (the "object" is the whole picture) of the image is dropped and regenerated with the item's
   next seed, at most ``max_attempts`` times in all.

Seeds: attempt ``k`` of item ``i`` uses ``base_seed + i + k * SEED_STRIDE``, so retries never
reuse another item's seed, and every attempt is the same in a first or a resumed run. The default
route (``inpaint``, :mod:`dreammix.adm`) needs no segmentation: its masks are exact by construction.

Files (beside the usual ``images/``, ``masks/``, ``manifest.jsonl``): each manifest line adds
``route``, ``image_seed`` (the seed of the kept image), ``dropped`` (how many images of this item
were dropped before it) and ``mask_area``; every dropped attempt is a line of ``dropped.jsonl``
(``index``, ``seed``, ``reason``, ``mask_area``), so a resumed run neither redoes rejected
attempts nor retries an item whose attempts are used up.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreammix.atomic import atomic_save_image
from dreammix.errors import DreamMixError

__all__ = [
    "DROPPED_NAME",
    "ROUTES",
    "SEED_STRIDE",
    "T2ISegmentSpec",
    "attempt_seed",
    "check_route",
    "check_route_config",
    "generate_t2i_segment",
    "generate_t2i_segment_set",
    "load_t2i_pipeline",
    "read_dropped",
]

log = logging.getLogger(__name__)

ROUTES = ("inpaint", "t2i_segment")
ROUTE = "t2i_segment"
DROPPED_NAME = "dropped.jsonl"
#: Seed offset between two attempts of one item; prompts per set must stay below it.
SEED_STRIDE = 1_000_000


@dataclass(frozen=True)
class T2ISegmentSpec:
    """``adm.t2i_segment``: the segmentation query and when a generated image is dropped."""

    query: str
    min_area: float = 0.01
    max_area: float = 0.9
    max_attempts: int = 4

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise DreamMixError("the segmentation query is empty", "adm.t2i_segment.query")
        if not 0.0 <= self.min_area < 1.0:
            raise DreamMixError(f"must be in [0, 1), got {self.min_area}", "adm.t2i_segment.min_area")
        if not self.min_area < self.max_area <= 1.0:
            raise DreamMixError(f"must be in (min_area={self.min_area}, 1], got {self.max_area}",
                                "adm.t2i_segment.max_area")  # fmt: skip
        if self.max_attempts < 1:
            raise DreamMixError(f"must be >= 1, got {self.max_attempts}", "adm.t2i_segment.max_attempts")

    @classmethod
    def from_config(cls, cfg) -> "T2ISegmentSpec":
        try:
            return cls(query=str(cfg.query), min_area=float(cfg.min_area), max_area=float(cfg.max_area),
                       max_attempts=int(cfg.max_attempts))  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise DreamMixError(f"bad value: {exc}", "adm.t2i_segment") from exc

    def verdict(self, mask: np.ndarray) -> str | None:
        """Why an image with this mask is dropped, or None to keep it."""
        area = float(np.mean(mask))
        if not mask.any() or area < self.min_area:
            return "no object"
        if area > self.max_area:
            return "mask covers almost everything"
        return None


def attempt_seed(item_seed: int, attempt: int) -> int:
    return int(item_seed) + int(attempt) * SEED_STRIDE


def _route(cfg) -> str:
    return str(cfg.adm.get("route", "inpaint"))


def check_route_config(cfg) -> T2ISegmentSpec | None:
    """Check ``adm.route`` and the route's settings before anything is loaded or written; the
    route's spec for ``t2i_segment``, None for ``inpaint``."""
    route = _route(cfg)
    if route not in ROUTES:
        raise DreamMixError(f"must be one of {'|'.join(ROUTES)}, got {route!r}", "adm.route")
    spec = T2ISegmentSpec.from_config(cfg.adm.t2i_segment) if "t2i_segment" in cfg.adm else None
    if route != ROUTE:
        return None
    if spec is None:
        raise DreamMixError("adm.route=t2i_segment needs the adm.t2i_segment settings", "adm.t2i_segment")
    from dreammix.segment import SegmenterSpec

    SegmenterSpec.from_config(cfg.get("segmenter"))
    _t2i_source(cfg.model)
    if int(cfg.adm.num_prompts) >= SEED_STRIDE:
        raise DreamMixError(f"adm.route=t2i_segment takes fewer than {SEED_STRIDE} prompts", "adm.num_prompts")
    return spec


def check_route(entries: Iterable[Mapping[str, Any]], route: str, out_dir: Path) -> None:
    """A set is made by one route: items of the other one in the manifest mean another set."""
    for entry in entries:
        made_by = entry.get("route", "inpaint")
        if made_by != route:
            raise DreamMixError(
                f"this regular set was made with adm.route={made_by}, not {route}; use adm.overwrite=true to "
                "rebuild it or another adm.out_dir",
                str(out_dir / "manifest.jsonl"),
            )


# ----------------------------------------------------------------------------------------------
# Loading the text-to-image base


def _t2i_source(model_cfg) -> str:
    source = model_cfg.get("t2i_pretrained")
    if not source:
        raise DreamMixError(f"model {model_cfg.get('name')!r} names no text-to-image SDXL base for "
                            "adm.route=t2i_segment", "model.t2i_pretrained")  # fmt: skip
    return str(source)


def load_t2i_pipeline(model_cfg, dtype):
    """``StableDiffusionXLPipeline.from_pretrained(model.t2i_pretrained)`` (hub id or local folder,
    ``model.t2i_revision`` / ``model.t2i_variant``), VAE in fp32 when ``model.vae_fp32``; the tiny
    base is built first when ``model.build_if_missing``. Errors name ``model.t2i_pretrained``."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from dreammix.models.loading import _looks_like_path

    source = _t2i_source(model_cfg)
    if model_cfg.get("build_if_missing"):
        from dreammix.models.tiny_adm import ensure_tiny_t2i

        ensure_tiny_t2i(source)
    if _looks_like_path(source):
        source = str(Path(source).expanduser())
        if not (Path(source) / "model_index.json").is_file():
            raise DreamMixError(f"no diffusers model at {source} (model_index.json missing)", "model.t2i_pretrained")
    vae_fp32 = bool(model_cfg.get("vae_fp32", True))
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            source, revision=model_cfg.get("t2i_revision"), variant=model_cfg.get("t2i_variant"),
            dtype={"default": dtype, "vae": torch.float32} if vae_fp32 else dtype,
        )
    except (OSError, ValueError) as exc:
        raise DreamMixError(f"cannot load model {model_cfg.t2i_pretrained!r}: {str(exc).splitlines()[0]}",
                            "model.t2i_pretrained") from exc  # fmt: skip
    if vae_fp32 and pipe.vae.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------
# The generate → segment → keep or drop loop


def _append_line(path: Path, entry: Mapping[str, Any]) -> None:
    """Append one JSON line and fsync it (as :func:`dreammix.adm.append_manifest`, all keys kept)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(dict(entry), ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_dropped(out_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """``dropped.jsonl`` by item index (a last line cut off by a kill is ignored)."""
    path = Path(out_dir) / DROPPED_NAME
    out: dict[int, list[dict[str, Any]]] = {}
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines[:-1], start=1):
        try:
            entry = json.loads(line)
            out.setdefault(int(entry["index"]), []).append(entry)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DreamMixError(f"line {number} is not a dropped-image record ({exc})", str(path)) from exc
    if lines[-1].strip():  # written up to the kill: rewrite without it so appends start clean
        from dreammix.atomic import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in lines[:-1]))
    return out


def generate_t2i_segment_set(
    pipe,
    segmenter,
    items: Sequence,
    out_dir: str | Path,
    spec: T2ISegmentSpec,
    *,
    resolution: int,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Make every item not yet in the manifest: text-to-image, segment, keep or drop and retry.

    ``pipe`` is a text-to-image pipeline (prompt → ``.images``), ``segmenter`` has
    ``masks(images, queries)`` (:class:`dreammix.segment.TextSegmenter`). Each attempt gets its own
    CPU generator seeded with :func:`attempt_seed`, so its image does not depend on its batch.
    Returns counts: ``kept``, ``dropped`` (images dropped in this call), ``failed`` (indices of
    items whose attempts are all used up).
    """
    import torch
    from tqdm.auto import tqdm

    from dreammix.adm_manifest import read_manifest
    from dreammix.segment import mask_image

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    queue, failed = _plan_attempts(items, out_dir, spec)
    size = (resolution, resolution)
    kept = dropped = 0
    bar = tqdm(total=len(queue), desc="ADM t2i + segmentation", unit="item", disable=not progress)
    try:
        while queue:
            batch, queue = queue[:batch_size], queue[batch_size:]
            seeds = [attempt_seed(item.seed, attempt) for item, attempt in batch]
            with torch.inference_mode():
                images = pipe(
                    prompt=[item.prompt for item, _ in batch],
                    negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                    output_type="pil",
                ).images
            images = [im.convert("RGB") if im.size == size else im.convert("RGB").resize(size, Image.BICUBIC)
                      for im in images]  # fmt: skip
            masks = segmenter.masks(images, [spec.query] * len(images))
            for (item, attempt), seed, image, mask in zip(batch, seeds, images, masks):
                mask = np.asarray(mask, dtype=bool)
                area = round(float(mask.mean()), 6)
                reason = spec.verdict(mask)
                if reason is not None:
                    dropped += 1
                    _append_line(out_dir / DROPPED_NAME, {"index": item.index, "image": item.image, "prompt": item.prompt,
                                                          "seed": seed, "reason": reason, "mask_area": area})  # fmt: skip
                    if attempt + 1 < spec.max_attempts:
                        queue.append((item, attempt + 1))
                    else:
                        failed.append(item.index)
                        bar.update(1)
                    continue
                atomic_save_image(image, out_dir / item.image)
                atomic_save_image(mask_image(mask), out_dir / item.mask)
                _append_line(out_dir / "manifest.jsonl", {**item.manifest_entry(), "route": ROUTE, "image_seed": seed,
                                                          "dropped": attempt, "mask_area": area})  # fmt: skip
                kept += 1
                bar.update(1)
    finally:
        bar.close()
    entries = read_manifest(out_dir)
    return {"kept": kept, "dropped": dropped, "failed": sorted(failed), "items": len(entries)}


def _plan_attempts(items: Sequence, out_dir: Path, spec: T2ISegmentSpec) -> tuple[list[tuple[Any, int]], list[int]]:
    """``(item, next attempt)`` for every item still to make; indices whose attempts are used up."""
    from dreammix.adm_manifest import read_manifest

    done = {e["image"] for e in read_manifest(out_dir, repair=True)}
    dropped = read_dropped(out_dir)
    queue, failed = [], []
    for item in items:
        if item.image in done:
            continue
        attempts = dropped.get(item.index, [])
        if any(int(e["seed"]) != attempt_seed(item.seed, k) or e.get("prompt", item.prompt) != item.prompt
               for k, e in enumerate(attempts)):  # fmt: skip
            raise DreamMixError(f"{DROPPED_NAME} records other seeds or prompts for item {item.index}; use "
                                "adm.overwrite=true or another adm.out_dir", str(out_dir / DROPPED_NAME))  # fmt: skip
        if len(attempts) >= spec.max_attempts:
            failed.append(item.index)
        else:
            queue.append((item, len(attempts)))
    return queue, failed


def generate_t2i_segment(cfg, items: Sequence, out_dir: Path) -> None:
    """The route from the composed config: load the base and CLIPSeg only when there is work."""
    from dreammix.adm_manifest import resolve_device
    from dreammix.models.loading import resolve_dtype
    from dreammix.segment import SegmenterSpec, load_segmenter

    adm = cfg.adm
    spec = check_route_config(cfg)
    queue, failed = _plan_attempts(items, out_dir, spec)
    if queue:
        device = resolve_device(adm.device)
        segmenter_spec = SegmenterSpec.from_config(cfg.segmenter)
        pipe = load_t2i_pipeline(cfg.model, resolve_dtype(str(cfg.model.weight_dtype), device))
        pipe.to(device)
        segmenter = load_segmenter(segmenter_spec, device)
        counts = generate_t2i_segment_set(
            pipe, segmenter, items, out_dir, spec, resolution=int(adm.resolution),
            num_inference_steps=int(adm.num_inference_steps), guidance_scale=float(adm.guidance_scale),
            negative_prompt=adm.negative_prompt or None, batch_size=int(adm.batch_size),
        )  # fmt: skip
        failed = counts["failed"]
        log.info("t2i_segment: %d images kept, %d dropped in this run", counts["kept"], counts["dropped"])
    total_dropped = sum(len(v) for v in read_dropped(out_dir).values())
    log.info("t2i_segment: %d images dropped in all (%s)", total_dropped, out_dir / DROPPED_NAME)
    if failed:
        log.warning("%d prompt(s) gave no usable mask in %d attempts and are left out of the set: items %s",
                    len(failed), spec.max_attempts, failed)  # fmt: skip
    from dreammix.adm_manifest import read_manifest

    if not read_manifest(out_dir):
        raise DreamMixError(
            f"segmentation found no usable '{spec.query}' mask in any generated image; check the segmenter "
            "(segmenter.*), adm.t2i_segment.query and the area limits",
            str(out_dir / DROPPED_NAME),
        )
