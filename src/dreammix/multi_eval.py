"""Multi-subject evaluation: ``python src/eval.py -cn eval_multi`` (two subjects in one photo).

Cases come from the same COCO pool and filters as the single-subject benchmark
(:mod:`dreammix.benchmark.builder`): every background with **two disjoint eligible boxes** (chosen
by ``random.Random(f"{seed}:pair:{image_id}")``, independent of other images) gets subject A in one
box and subject B in the other, each with its identity prompt (the benchmark's templates, cycled)
and a seed from the case id. Each case is inpainted with
:func:`dreammix.multi_region.inpaint_regions` (A's LoRA in A's box, B's in B's) and scored **per
region**, on the crop of its box like the single-subject table:

- CLIP-T of the region against its own prompt (``sks`` removed);
- CLIP-I and DINO of the region against its **own** subject's photos and against the **other**
  subject's photos. Identity must not leak between regions: own > other, reported per metric as
  the leak check (means over regions and cases).

Images are written as they finish and skipped when present (a rerun in the same ``run_dir`` only
scores); ``cases.jsonl`` records the cases, ``records.jsonl`` the scores, ``summary.json`` /
``summary.md`` the means and the leak check.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dreammix.atomic import atomic_save_image, atomic_write_bytes
from dreammix.cli import config_value
from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

ROLES = ("a", "b")


@dataclass(frozen=True)
class PairCase:
    """One background with a box per subject (``[x0, y0, x1, y1]``, x1/y1 exclusive)."""

    case_id: str
    image: str
    width: int
    height: int
    subjects: tuple[str, str]
    boxes: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]
    prompts: tuple[str, str]
    seed: int


def _disjoint(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def select_pair_backgrounds(coco, filters, seed: int) -> list[tuple[dict, tuple[int, ...], tuple[int, ...]]]:
    """``(image, box_a, box_b)`` for every image with two disjoint eligible boxes, by image id."""
    from dreammix.benchmark.builder import _box_ok, pixel_box

    pairs = []
    for image in coco.images:
        width, height = image["width"], image["height"]
        if min(width, height) < filters.min_image_side:
            continue
        boxes = [pixel_box(a["bbox"], width, height) for a in coco.annotations.get(image["id"], [])
                 if _box_ok(a, width, height, filters, coco.categories)]  # fmt: skip
        candidates = [(p, q) for i, p in enumerate(boxes) for q in boxes[i + 1 :] if _disjoint(p, q)]
        if candidates:
            a, b = random.Random(f"{seed}:pair:{image['id']}").choice(candidates)
            pairs.append((image, a, b))
    return pairs


def pair_cases(cfg: DictConfig) -> list[PairCase]:
    """The multi-subject cases of ``cfg`` (subjects ``subject_a``/``subject_b``, ``benchmark.*``)."""
    from dreammix.benchmark.builder import BoxFilters, _to_container, case_seed, load_coco
    from dreammix.benchmark.prompts import SubjectSpec, identity_prompts

    bcfg = cfg.benchmark
    seed = int(bcfg.seed)
    filters = BoxFilters.from_config(_to_container(bcfg.filters))
    image_dir = Path(str(bcfg.coco_images))
    pairs = select_pair_backgrounds(load_coco(str(bcfg.coco_annotations)), filters, seed)
    pairs = [p for p in pairs if (image_dir / p[0]["file_name"]).is_file()]
    if cfg.get("limit") is not None:
        pairs = pairs[: config_value(cfg, "limit", int)]
    if not pairs:
        raise DreamMixError("no COCO image has two disjoint boxes that pass benchmark.filters", str(bcfg.coco_annotations))
    subjects = [cfg.subject_a, cfg.subject_b]
    prompts = [identity_prompts(SubjectSpec(str(s.name), str(s.class_noun)), list(bcfg.prompts.identity_templates),
                                str(bcfg.prompts.identifier)) for s in subjects]  # fmt: skip
    cases = []
    for j, (image, box_a, box_b) in enumerate(pairs):
        case_id = f"{subjects[0].name}+{subjects[1].name}-{image['id']:012d}"
        cases.append(PairCase(
            case_id=case_id, image=str((image_dir / image["file_name"]).resolve()), width=image["width"],
            height=image["height"], subjects=(str(subjects[0].name), str(subjects[1].name)), boxes=(box_a, box_b),
            prompts=(prompts[0][j % len(prompts[0])], prompts[1][j % len(prompts[1])]), seed=case_seed(seed, case_id),
        ))  # fmt: skip
    return cases


def box_mask(width: int, height: int, box: Sequence[int]) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return mask


def _references(subject_cfg) -> list[Path]:
    from dreammix.data.images import list_images

    folder = Path(str(subject_cfg.image_dir))
    paths = list_images(folder) if folder.is_dir() else []
    if not paths:
        raise DreamMixError("no reference images", f"{subject_cfg.name}: {folder}")
    return paths


def _eliminate(cfg: DictConfig, subject_cfg, prompt: str) -> list[str]:
    if not cfg.tas.enabled or not subject_cfg.get("attributes"):
        return []
    from dreammix.attributes import normalize_attributes, select_attributes_to_eliminate

    return select_attributes_to_eliminate(prompt, normalize_attributes(subject_cfg.attributes, "subject.attributes"))


def generate_pairs(cfg: DictConfig, cases: Sequence[PairCase], run_dir: Path, pipe) -> int:
    """Inpaint every case without an image on disk (both subjects, one call each)."""
    import torch

    from dreammix.data.images import load_image
    from dreammix.multi_region import Region

    pending = [c for c in cases if not (run_dir / "images" / f"{c.case_id}.png").is_file()]
    subjects = [cfg.subject_a, cfg.subject_b]
    loras = [cfg.get("lora_a"), cfg.get("lora_b")]
    for number, case in enumerate(pending, start=1):
        image = load_image(case.image)
        regions = [
            Region(box_mask(image.width, image.height, box), prompt, lora, config_value(cfg, "lora_scale", float),
                   _eliminate(cfg, subject, prompt))
            for box, prompt, lora, subject in zip(case.boxes, case.prompts, loras, subjects)
        ]  # fmt: skip
        result = pipe.inpaint_regions(
            image, regions,
            negative_prompt=cfg.get("negative_prompt"),
            num_inference_steps=config_value(cfg, "steps", int),
            guidance_scale=config_value(cfg, "guidance_scale", float),
            lambda_=config_value(cfg, "dif.lambda_", float),
            tas_stages=list(cfg.tas.stages) if cfg.tas.enabled else [],
            generator=torch.Generator("cpu").manual_seed(case.seed),
            resolution=cfg.get("resolution"),
            crop_scale=config_value(cfg, "dif.crop_scale", float),
            min_crop_frac=config_value(cfg, "dif.min_crop_frac", float),
            blend=bool(cfg.dif.blend),
            feather_radius=cfg.dif.get("feather_radius"),
        )  # fmt: skip
        atomic_save_image(result.images[0], run_dir / "images" / f"{case.case_id}.png")
        log.info("[%d/%d] %s", number, len(pending), case.case_id)
    return len(pending)


def score_pairs(suite, cases: Sequence[PairCase], run_dir: Path, references: Sequence[Sequence[Path]]) -> list[dict[str, Any]]:
    """One record per case and region: CLIP-T, and CLIP-I / DINO against own and other subject."""
    from dreammix.data.images import load_image

    records = []
    images = [load_image(run_dir / "images" / f"{c.case_id}.png") for c in cases]
    for r, role in enumerate(ROLES):
        boxes = [list(c.boxes[r]) for c in cases]
        prompts = [c.prompts[r] for c in cases]
        own = suite.score(images, boxes, prompts, references[r])
        other = suite.score(images, boxes, prompts, references[1 - r])
        for case, o, x in zip(cases, own, other):
            records.append({
                "case_id": case.case_id, "region": role, "subject": case.subjects[r], "other": case.subjects[1 - r],
                "prompt": case.prompts[r], "box": list(case.boxes[r]), "clip_t": o["clip_t"],
                "clip_i_own": o["clip_i"], "dino_own": o["dino"], "clip_i_other": x["clip_i"], "dino_other": x["dino"],
            })  # fmt: skip
    return records


def summarize_pairs(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means per region and over both, and the leak check (own > other, per metric)."""
    keys = ("clip_t", "clip_i_own", "clip_i_other", "dino_own", "dino_other")

    def means(rows):
        return {k: float(np.mean([r[k] for r in rows])) for k in keys}

    per_region = {role: means([r for r in records if r["region"] == role]) for role in ROLES}
    overall = means(records)
    leak = {m: overall[f"{m}_own"] > overall[f"{m}_other"] for m in ("clip_i", "dino")}
    per_region_leak = {role: {m: per_region[role][f"{m}_own"] > per_region[role][f"{m}_other"] for m in ("clip_i", "dino")}
                       for role in ROLES}  # fmt: skip
    return {"cases": len({r["case_id"] for r in records}), "regions": per_region, "overall": overall,
            "own_beats_other": leak, "own_beats_other_per_region": per_region_leak,
            "subjects": {role: next(r["subject"] for r in records if r["region"] == role) for role in ROLES}}  # fmt: skip


def summary_markdown(summary: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", f"{summary['cases']} case(s); crop of each region's box.", "",
             "| region | subject | CLIP-T | CLIP-I own | CLIP-I other | DINO own | DINO other |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = [(role, summary["subjects"][role], summary["regions"][role]) for role in ROLES] + [("all", "", summary["overall"])]
    for role, subject, m in rows:
        lines.append(f"| {role} | {subject} | {m['clip_t']:.3f} | {m['clip_i_own']:.3f} | {m['clip_i_other']:.3f} | "
                     f"{m['dino_own']:.3f} | {m['dino_other']:.3f} |")  # fmt: skip
    ok = summary["own_beats_other"]
    lines += ["", "Leak check (own > other): " + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in ok.items())]
    for role, checks in summary.get("own_beats_other_per_region", {}).items():
        lines.append(f"- region {role} ({summary['subjects'][role]}): "
                     + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in checks.items()))  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def evaluate_multi(cfg: DictConfig, *, pipe=None, metric_suite=None) -> dict[str, Any]:
    """Build the pair cases, generate what is missing, score per region, write the summaries."""
    run_dir = Path(str(cfg.run_dir))
    for key in ("lora_a", "lora_b"):
        if cfg.get(key):
            from dreammix.lora_catalog import read_lora_entry

            read_lora_entry(cfg[key])  # a folder without weights fails now, not after loading the model
    if str(cfg.subject_a.name) == str(cfg.subject_b.name):
        raise DreamMixError("subject_a and subject_b must be two different subjects", "subject_b")
    cases = pair_cases(cfg)
    references = [_references(cfg.subject_a), _references(cfg.subject_b)]
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "cases.jsonl", "".join(json.dumps(asdict(c)) + "\n" for c in cases).encode())

    if any(not (run_dir / "images" / f"{c.case_id}.png").is_file() for c in cases):
        if pipe is None:
            from dreammix.inference_setup import load_base_pipeline
            from dreammix.inference_setup import set_scheduler

            pipe = load_base_pipeline(cfg)
            pipe.set_progress_bar_config(disable=not cfg.get("progress", False))
            set_scheduler(pipe, cfg.scheduler)
        generate_pairs(cfg, cases, run_dir, pipe)
    if metric_suite is None:
        from dreammix.metrics import MetricSuite

        metric_suite = MetricSuite.from_config(cfg.metrics)
    records = score_pairs(metric_suite, cases, run_dir, references)
    atomic_write_bytes(run_dir / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    summary = summarize_pairs(records)
    summary["dif"] = OmegaConf.to_container(cfg.dif, resolve=True)
    summary["loras"] = {"a": cfg.get("lora_a"), "b": cfg.get("lora_b")}
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    title = f"Multi-subject evaluation: {cfg.subject_a.name} + {cfg.subject_b.name}"
    atomic_write_bytes(run_dir / "summary.md", summary_markdown(summary, title).encode())
    log.info("multi-subject evaluation: %d case(s) -> %s; leak check %s", len(cases), run_dir, summary["own_beats_other"])
    return summary
