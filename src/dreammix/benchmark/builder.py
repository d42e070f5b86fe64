"""Build the DreamMix COCO benchmark (paper §4.1) into ``<benchmark.out_dir>/manifest.jsonl``.

§4.1: "we collect the images from the COCO-val2017 dataset, filtering out images or bounding boxes
with lower resolutions. We mix the 30 subjects with these background images, resulting in an
average of approximately 140 background images per subject [over 4,000 image–mask pairs].
Besides, we create 3–5 prompts for identity preservation or attribute editing for each object."

What we do, step by step (thresholds in ``conf/benchmark/default.yaml``):

1. **Backgrounds.** Read ``instances_val2017.json``. Drop images whose shorter side is below
   ``filters.min_image_side`` and boxes that are crowd regions, smaller than
   ``filters.min_box_side`` on a side, outside ``[min_area_frac, max_area_frac]`` of the image,
   or more elongated than ``max_aspect``. An image with at least one box left is a background;
   it gets one of its boxes, chosen by ``random.Random(f"{seed}:{image_id}")`` so the choice does
   not depend on any other image.
2. **Mixing.** The pool (sorted by image id) is shuffled once with ``random.Random(seed)``. Subject
   *k* (its index among all known subjects, sorted — so building a subset gives the same cases for
   a subject as the full build) takes the next ``per_subject`` backgrounds of that cyclic order,
   starting at ``k * per_subject``. With the full val2017 pool the subjects get disjoint
   backgrounds; with a small pool (``coco_mini``: 4 images) the backgrounds are reused across
   subjects, never within one.
3. **Prompts.** :mod:`dreammix.benchmark.prompts`; the *j*-th background of a subject gets prompt
   ``j mod n`` of each task (``prompt_assignment: cycle``, every prompt equally often) or every
   prompt (``all``).
4. **Output.** A mask per (image, box): an L-mode PNG of the image's size, 255 inside the box, 0
   elsewhere (``masks/<image_id>_<ann_id>.png``, shared by subjects reusing a background), the
   manifest (one line per case, canonical JSON, atomic) and ``summary.json`` (counts, filters,
   the manifest's sha256). The same inputs give a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dreammix.atomic import atomic_write_bytes
from dreammix.benchmark.manifest import (
    MANIFEST_NAME,
    SUMMARY_NAME,
    TASKS,
    Case,
    relative_to_manifest,
    write_manifest,
)
from dreammix.benchmark.prompts import SubjectSpec, attribute_prompts, identity_prompts
from dreammix.data.dreambooth import DreamBoothFacts, parse_prompts_and_classes
from dreammix.errors import DreamMixError
from dreammix.paths import check_own_folder, ensure_writable_dir

log = logging.getLogger(__name__)

_MASK_NAME_RE = re.compile(r"^\d{12}_\d+\.png$")


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxFilters:
    """Which COCO images and boxes are high-resolution enough to inpaint a subject into."""

    min_image_side: int = 400
    min_box_side: int = 64
    min_area_frac: float = 0.02
    max_area_frac: float = 0.4
    max_aspect: float = 3.0
    skip_crowd: bool = True
    exclude_categories: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> BoxFilters:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DreamMixError(f"unknown filter option(s) {unknown}; known: {sorted(known)}", "benchmark.filters")
        values = dict(cfg)
        if "exclude_categories" in values:
            values["exclude_categories"] = tuple(values["exclude_categories"] or ())
        filters = cls(**values)
        if not 0 <= filters.min_area_frac < filters.max_area_frac <= 1:
            raise DreamMixError(
                "need 0 <= min_area_frac < max_area_frac <= 1", "benchmark.filters.min_area_frac/max_area_frac"
            )
        if filters.max_aspect < 1:
            raise DreamMixError("max_aspect must be >= 1", "benchmark.filters.max_aspect")
        return filters


@dataclass(frozen=True)
class Background:
    """A COCO image with the one box a subject will be inpainted into."""

    image_id: int
    file_name: str
    width: int
    height: int
    ann_id: int
    category: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass
class CocoIndex:
    images: list[dict[str, Any]]  # sorted by id
    annotations: dict[int, list[dict[str, Any]]]  # image id -> annotations sorted by id
    categories: dict[int, str]


def load_coco(path: str | Path) -> CocoIndex:
    """Read a COCO ``instances_*.json``; missing fields are one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DreamMixError("COCO annotation file not found (run `make data`, or set benchmark.coco_annotations)", str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DreamMixError(f"COCO annotation file is not JSON ({exc.__class__.__name__})", str(path)) from exc
    if not isinstance(data, dict):
        raise DreamMixError("COCO annotation file is not a JSON object", str(path))
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DreamMixError(f"COCO annotation file has no '{key}' list", str(path))
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = sorted(
            (
                {"id": int(i["id"]), "file_name": str(i["file_name"]), "width": int(i["width"]), "height": int(i["height"])}
                for i in data["images"]
            ),
            key=lambda i: i["id"],
        )
        annotations: dict[int, list[dict[str, Any]]] = {}
        for a in data["annotations"]:
            bbox = [float(v) for v in a["bbox"]]
            if len(bbox) != 4:
                raise ValueError(f"annotation {a.get('id')} bbox has {len(bbox)} values")
            annotations.setdefault(int(a["image_id"]), []).append(
                {
                    "id": int(a["id"]),
                    "category_id": int(a["category_id"]),
                    "bbox": bbox,
                    "iscrowd": int(a.get("iscrowd", 0)),
                }
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise DreamMixError(f"malformed COCO annotation file ({exc.__class__.__name__}: {exc})", str(path)) from exc
    for anns in annotations.values():
        anns.sort(key=lambda a: a["id"])
    return CocoIndex(images=images, annotations=annotations, categories=categories)


def pixel_box(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` (floats) → integer ``(x0, y0, x1, y1)`` covering it, clipped to the image.

    Rounded outwards so the mask never under-covers the annotated object.
    """
    x, y, w, h = bbox
    x0 = max(0, math.floor(x))
    y0 = max(0, math.floor(y))
    x1 = min(width, math.ceil(x + w))
    y1 = min(height, math.ceil(y + h))
    return x0, y0, x1, y1


def _box_ok(ann: Mapping[str, Any], width: int, height: int, filters: BoxFilters, categories: Mapping[int, str]) -> bool:
    if filters.skip_crowd and ann["iscrowd"]:
        return False
    if categories.get(ann["category_id"], "") in filters.exclude_categories:
        return False
    _, _, w, h = ann["bbox"]
    if min(w, h) < filters.min_box_side:
        return False
    frac = (w * h) / float(width * height)
    if not filters.min_area_frac <= frac <= filters.max_area_frac:
        return False
    return max(w, h) / min(w, h) <= filters.max_aspect


def select_backgrounds(coco: CocoIndex, filters: BoxFilters, seed: int) -> tuple[list[Background], dict[str, int]]:
    """Every image that passes the filters with one chosen box, sorted by image id, plus counts."""
    stats = {"images_listed": len(coco.images), "images_low_resolution": 0, "images_without_box": 0}
    stats["boxes_listed"] = sum(len(a) for a in coco.annotations.values())
    stats["boxes_eligible"] = 0
    pool: list[Background] = []
    for image in coco.images:
        width, height = image["width"], image["height"]
        if min(width, height) < filters.min_image_side:
            stats["images_low_resolution"] += 1
            continue
        boxes = [a for a in coco.annotations.get(image["id"], []) if _box_ok(a, width, height, filters, coco.categories)]
        if not boxes:
            stats["images_without_box"] += 1
            continue
        stats["boxes_eligible"] += len(boxes)
        ann = random.Random(f"{seed}:{image['id']}").choice(boxes)
        pool.append(
            Background(
                image_id=image["id"],
                file_name=image["file_name"],
                width=width,
                height=height,
                ann_id=ann["id"],
                category=coco.categories.get(ann["category_id"], str(ann["category_id"])),
                box=pixel_box(ann["bbox"], width, height),
            )
        )
    stats["backgrounds"] = len(pool)
    return pool, stats


def check_background_files(
    pool: list[Background], image_dir: Path, *, allow_missing: bool, verify_sizes: bool
) -> list[Background]:
    """Drop (or refuse) backgrounds whose image file is missing; check sizes against the JSON.

    A partial download would otherwise silently give a different benchmark, so missing files are
    an error unless ``allow_missing_images`` says to skip them. The size check reads only the
    image header (fast) and catches an annotation file that does not belong to the folder.
    """
    if not image_dir.is_dir():
        raise DreamMixError("COCO image folder not found (run `make data`, or set benchmark.coco_images)", str(image_dir))
    kept: list[Background] = []
    missing: list[str] = []
    for bg in pool:
        path = image_dir / bg.file_name
        if not path.is_file():
            missing.append(bg.file_name)
            continue
        if verify_sizes:
            try:
                with Image.open(path) as img:
                    size = img.size
            except OSError as exc:
                raise DreamMixError(f"cannot read COCO image ({exc.__class__.__name__})", str(path)) from exc
            if size != (bg.width, bg.height):
                raise DreamMixError(
                    f"image is {size[0]}x{size[1]} but the annotation file says {bg.width}x{bg.height}", str(path)
                )
        kept.append(bg)
    if missing:
        message = f"{len(missing)} of {len(pool)} background images are missing (first: {missing[0]})"
        if not allow_missing:
            raise DreamMixError(message + "; set benchmark.allow_missing_images=true to skip them", str(image_dir))
        warnings.warn(f"{message}; skipping them", stacklevel=2)
    return kept


def assign_backgrounds(
    pool: Sequence[Background], subject_index: Mapping[str, int], per_subject: int, seed: int
) -> dict[str, list[Background]]:
    """Each subject's backgrounds: a window of ``per_subject`` in one seeded cyclic order."""
    if per_subject < 1:
        raise DreamMixError(f"per_subject must be at least 1, got {per_subject}", "benchmark.per_subject")
    order = list(pool)
    random.Random(seed).shuffle(order)
    n = min(per_subject, len(order))
    return {
        name: [order[(k * per_subject + j) % len(order)] for j in range(n)] for name, k in subject_index.items()
    }


# --------------------------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------------------------


def load_subject_specs(
    names: Sequence[str], subject_dir: Path | None, facts: DreamBoothFacts, paths: Mapping[str, Any] | None = None
) -> list[SubjectSpec]:
    """Subject name → class noun, kind and attribute dictionary.

    From ``<subject_dir>/<name>.yaml`` when it exists (the same files as ``subject=<name>``),
    otherwise from the DreamBooth class table. The attribute dictionary is the one ADM/TAS use
    offline (:func:`dreammix.attributes.offline_attributes`): ``attributes_file`` if set, else the
    inline ``attributes``. Only those keys are resolved (against ``paths``), so other
    interpolations in the file need not resolve here.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dreammix.attributes import offline_attributes

    specs = []
    for name in names:
        path = subject_dir / f"{name}.yaml" if subject_dir is not None else None
        if path is not None and path.is_file():
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            if not isinstance(raw, dict):
                raise DreamMixError("subject config is not a mapping", str(path))
            class_noun = raw.get("class_noun") or facts.classes.get(name)
            if not class_noun:
                raise DreamMixError("subject config has no class_noun", str(path))
            kind = raw.get("kind") or facts.kind(name)
            root = OmegaConf.create({"paths": dict(paths or {}), "subject": raw})
            try:  # attribute access resolves interpolations (e.g. ${paths.adm_dir}/can/attributes.json)
                file = root.subject.get("attributes_file")
                inline = root.subject.get("attributes")
                if OmegaConf.is_config(inline):
                    inline = OmegaConf.to_container(inline, resolve=True)
            except OmegaConfBaseException as exc:
                raise DreamMixError(f"cannot resolve the subject's attributes ({exc.__class__.__name__})", str(path)) from exc
            attributes = offline_attributes({"attributes_file": file, "attributes": inline}) or {}
        elif name in facts.classes:
            class_noun, kind, attributes = facts.classes[name], facts.kind(name), {}
        else:
            where = str(path) if path is not None else "benchmark.subjects"
            raise DreamMixError(f"unknown subject '{name}': no subject config and not in the DreamBooth class table", where)
        if kind not in ("live", "object"):
            raise DreamMixError(f"subject kind must be 'live' or 'object', got {kind!r}", str(path or name))
        specs.append(SubjectSpec(name=str(name), class_noun=str(class_noun), kind=str(kind), attributes=attributes))
    return specs


def default_subject_dir() -> Path | None:
    """``conf/subject`` of the config tree this run was composed from (Hydra's main config
    source), else the one beside the installed package (an editable install of this repo)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                candidate = Path(source.path) / "subject"
                if candidate.is_dir():
                    return candidate
    except Exception:  # noqa: BLE001 - no Hydra run (tests, library use): fall back
        pass
    candidate = Path(__file__).resolve().parents[3] / "conf" / "subject"
    return candidate if candidate.is_dir() else None


# --------------------------------------------------------------------------------------------
# Cases, masks, outputs
# --------------------------------------------------------------------------------------------


def case_seed(seed: int, case_id: str) -> int:
    """A generation seed that depends only on the benchmark seed and the case (31-bit)."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def mask_name(bg: Background) -> str:
    return f"{bg.image_id:012d}_{bg.ann_id}.png"


def box_mask_png(width: int, height: int, box: Sequence[int]) -> bytes:
    """The PNG bytes of an L-mode ``width × height`` mask: 255 inside ``box``, 0 elsewhere."""
    mask = Image.new("L", (width, height), 0)
    x0, y0, x1, y1 = box
    mask.paste(255, (x0, y0, x1, y1))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class BenchmarkResult:
    out_dir: Path
    manifest: Path
    cases: list[Case]
    summary: dict[str, Any] = field(default_factory=dict)


def _to_container(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def subject_prompts(
    subjects: Sequence[SubjectSpec], pcfg: Any, facts: DreamBoothFacts, seed: int
) -> dict[str, dict[str, list[str]]]:
    """Subject name → task → its prompts, from ``benchmark.prompts``."""
    identifier = str(pcfg.identifier)
    vocabulary = _to_container(pcfg.edit_vocabulary) or {}
    return {
        subject.name: {
            "identity": identity_prompts(subject, list(pcfg.identity_templates), identifier),
            "attribute": attribute_prompts(
                subject,
                facts,
                count=int(pcfg.attribute_count),
                identifier=identifier,
                template=str(pcfg.attribute_template),
                edit_vocabulary=vocabulary,
                seed=seed,
            ),
        }
        for subject in subjects
    }


def make_cases(
    subjects: Sequence[SubjectSpec],
    tasks: Sequence[str],
    assigned: Mapping[str, Sequence[Background]],
    prompts_by_subject: Mapping[str, Mapping[str, Sequence[str]]],
    *,
    assignment: str,
    image_dir: Path,
    out_dir: Path,
    seed: int,
) -> list[Case]:
    """The manifest's cases in their fixed order: subject, task, background, prompt."""
    cases: list[Case] = []
    for subject in subjects:
        for task in tasks:
            prompts = prompts_by_subject[subject.name][task]
            for j, bg in enumerate(assigned[subject.name]):
                indices = [j % len(prompts)] if assignment == "cycle" else list(range(len(prompts)))
                for p in indices:
                    case_id = f"{subject.name}-{task}-{bg.image_id:012d}-{bg.ann_id}-p{p}"
                    cases.append(
                        Case(
                            case_id=case_id,
                            subject=subject.name,
                            class_noun=subject.class_noun,
                            task=task,
                            prompt=prompts[p],
                            prompt_index=p,
                            image=relative_to_manifest(image_dir / bg.file_name, out_dir),
                            image_id=bg.image_id,
                            ann_id=bg.ann_id,
                            category=bg.category,
                            box=list(bg.box),
                            width=bg.width,
                            height=bg.height,
                            mask=f"masks/{mask_name(bg)}",
                            seed=case_seed(seed, case_id),
                        )
                    )
    return cases


def write_masks(mask_dir: Path, cases: Sequence[Case]) -> int:
    """Write the box mask of every case's background (one file shared by the cases that use it)
    and delete masks of other builds; returns how many masks there are.

    A mask already on disk with the same bytes is left alone, so a rebuild rewrites no file.
    """
    masks = {Path(case.mask).name: case for case in cases}
    mask_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(masks):
        case = masks[name]
        data = box_mask_png(case.width, case.height, case.box)
        target = mask_dir / name
        if not (target.is_file() and target.read_bytes() == data):
            atomic_write_bytes(target, data)
    # Masks of an earlier build with other settings would be mistaken for part of this one.
    for stale in sorted(mask_dir.iterdir()):
        if _MASK_NAME_RE.match(stale.name) and stale.name not in masks:
            stale.unlink()
    return len(masks)


def build_benchmark(cfg: Any) -> BenchmarkResult:
    """Build the benchmark described by ``cfg.benchmark`` (see ``conf/benchmark/default.yaml``)."""
    bcfg = cfg.benchmark
    out_dir = Path(str(bcfg.out_dir))
    image_dir = Path(str(bcfg.coco_images))
    seed = int(bcfg.seed)
    per_subject = int(bcfg.per_subject)
    tasks = [str(t) for t in bcfg.tasks]
    for task in tasks:
        if task not in TASKS:
            raise DreamMixError(f"unknown task {task!r}; known: {list(TASKS)}", "benchmark.tasks")
    assignment = str(bcfg.prompt_assignment)
    if assignment not in ("cycle", "all"):
        raise DreamMixError(f"prompt_assignment must be 'cycle' or 'all', got {assignment!r}", "benchmark.prompt_assignment")

    check_own_folder(out_dir, (MANIFEST_NAME, SUMMARY_NAME), "a benchmark folder", "benchmark.out_dir")
    ensure_writable_dir(out_dir, "benchmark.out_dir")  # before the COCO annotations are read

    facts = parse_prompts_and_classes(str(bcfg.prompts_file))
    subject_dir = Path(str(bcfg.subject_dir)) if bcfg.get("subject_dir") else default_subject_dir()
    names = [str(n) for n in bcfg.subjects] if bcfg.get("subjects") else sorted(facts.classes)
    if len(set(names)) != len(names):
        raise DreamMixError("duplicate subject names", "benchmark.subjects")
    paths = _to_container(cfg.paths) if "paths" in cfg else None
    subjects = load_subject_specs(names, subject_dir, facts, paths)
    # A subject's window in the background order is fixed by its rank among *all* known subjects.
    universe = sorted(set(facts.classes) | set(names))
    subject_index = {s.name: universe.index(s.name) for s in subjects}

    filters = BoxFilters.from_config(_to_container(bcfg.filters))
    coco = load_coco(str(bcfg.coco_annotations))
    pool, stats = select_backgrounds(coco, filters, seed)
    pool = check_background_files(
        pool, image_dir, allow_missing=bool(bcfg.allow_missing_images), verify_sizes=bool(bcfg.verify_image_sizes)
    )
    stats["backgrounds_on_disk"] = len(pool)
    if not pool:
        raise DreamMixError(
            f"no COCO image passes the filters ({stats}); relax benchmark.filters", str(bcfg.coco_annotations)
        )
    if len(pool) < per_subject * len(subjects):
        log.warning(
            "only %d backgrounds for %d subjects x %d: backgrounds are shared across subjects",
            len(pool),
            len(subjects),
            per_subject,
        )
    assigned = assign_backgrounds(pool, subject_index, per_subject, seed)

    prompts_by_subject = subject_prompts(subjects, bcfg.prompts, facts, seed)
    cases = make_cases(
        subjects, tasks, assigned, prompts_by_subject, assignment=assignment, image_dir=image_dir, out_dir=out_dir, seed=seed
    )
    distinct_backgrounds = write_masks(out_dir / "masks", cases)

    manifest_path = out_dir / MANIFEST_NAME
    digest = write_manifest(manifest_path, cases)
    pairs = {s.name: len(assigned[s.name]) for s in subjects}
    summary = {
        "manifest": MANIFEST_NAME,
        "manifest_sha256": digest,
        "cases": len(cases),
        "image_mask_pairs": sum(pairs.values()),
        "distinct_backgrounds": distinct_backgrounds,
        "pairs_per_subject": pairs,
        "prompts": prompts_by_subject,
        "tasks": tasks,
        "prompt_assignment": assignment,
        "seed": seed,
        "per_subject": per_subject,
        "filters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in filters.__dict__.items()},
        "coco": stats,
    }
    atomic_write_bytes(out_dir / SUMMARY_NAME, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    log.info(
        "benchmark: %d cases, %d image-mask pairs over %d subjects (%d distinct backgrounds) -> %s",
        len(cases),
        summary["image_mask_pairs"],
        len(subjects),
        distinct_backgrounds,
        manifest_path,
    )
    return BenchmarkResult(out_dir=out_dir, manifest=manifest_path, cases=cases, summary=summary)


__all__ = [
    "Background",
    "BenchmarkResult",
    "BoxFilters",
    "CocoIndex",
    "assign_backgrounds",
    "box_mask_png",
    "build_benchmark",
    "case_seed",
    "check_background_files",
    "load_coco",
    "load_subject_specs",
    "pixel_box",
    "select_backgrounds",
]
