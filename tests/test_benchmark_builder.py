"""The COCO benchmark builder (paper §4.1), its manifest and records, and the `make data` script.

Synthetic COCO-format data is made in code with known answers: which images and boxes pass the
filters, how many cases each subject gets, which prompts. The shared ``coco_mini`` (4 real
val2017 images) checks the builder on the official annotation format.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreammix.benchmark.builder import (
    BoxFilters,
    assign_backgrounds,
    load_coco,
    pixel_box,
    select_backgrounds,
)
from dreammix.benchmark.manifest import read_manifest
from dreammix.benchmark.prompts import SubjectSpec, attribute_prompts, identity_prompts
from dreammix.benchmark.records import RecordLog
from dreammix.data.dreambooth import parse_prompts_and_classes
from dreammix.errors import DreamMixError

REPO = Path(__file__).resolve().parents[1]

PROMPTS_TEXT = """Classes

subject_name,class
can,can
clock,clock
dog,dog
teapot,teapot

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token),
'a purple {0} {1}'.format(unique_token, class_token),
'a shiny {0} {1}'.format(unique_token, class_token),
'a wet {0} {1}'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token),
'a purple {0} {1}'.format(unique_token, class_token),
'a shiny {0} {1}'.format(unique_token, class_token),
'a wet {0} {1}'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]
"""

# Filters for the synthetic set (small images keep the test fast).
FILTERS = dict(min_image_side=100, min_box_side=10, min_area_frac=0.02, max_area_frac=0.4, max_aspect=3.0)

# (id, width, height); image 3 is low resolution, image 4 has no annotation at all.
IMAGES = [(1, 200, 150), (2, 160, 120), (3, 90, 200), (4, 200, 200), (5, 150, 150), (6, 120, 180), (7, 180, 120), (8, 200, 100)]
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"}]
# (ann id, image id, category, bbox, iscrowd) and why it is kept or dropped (image area in comments).
ANNOTATIONS = [
    (10, 1, 2, [20.4, 30.6, 50.0, 40.0], 0),  # 2000/30000 = 6.7 %: kept
    (11, 1, 2, [0, 0, 5, 5], 0),  # side 5 < 10: dropped
    (12, 1, 1, [10, 10, 150, 120], 0),  # 60 % of the image: dropped
    (20, 2, 2, [10, 10, 40, 40], 1),  # crowd: dropped -> image 2 has no box
    (30, 3, 2, [10, 10, 40, 40], 0),  # image 3 is 90 px wide: dropped
    (50, 5, 2, [10, 10, 100, 20], 0),  # aspect 5 > 3: dropped
    (51, 5, 1, [50, 50, 40, 30], 0),  # 1200/22500 = 5.3 %: kept
    (60, 6, 2, [0, 0, 60, 60], 0),  # 16.7 %: kept
    (61, 6, 1, [60, 90, 50, 60], 0),  # 13.9 %: kept (image 6 has two eligible boxes)
    (70, 7, 2, [100.0, 50.0, 79.5, 69.2], 0),  # 25.5 %: kept, box touches the right/bottom edge
    (80, 8, 1, [30, 20, 40, 40], 0),  # 8 %: kept
]
ELIGIBLE_IMAGES = [1, 5, 6, 7, 8]


def write_synthetic_coco(root: Path) -> tuple[Path, Path]:
    images_dir = root / "coco" / "val2017"
    images_dir.mkdir(parents=True)
    for image_id, width, height in IMAGES:
        color = (image_id * 30 % 256, 80, 160)
        Image.new("RGB", (width, height), color).save(images_dir / f"{image_id:012d}.jpg")
    annotations = {
        "info": {"description": "synthetic"},
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, w, h in IMAGES],
        "annotations": [
            {"id": a, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
            for a, i, c, b, crowd in ANNOTATIONS
        ],
        "categories": CATEGORIES,
    }
    ann_path = root / "coco" / "annotations" / "instances_val2017.json"
    ann_path.parent.mkdir(parents=True)
    ann_path.write_text(json.dumps(annotations))
    return images_dir, ann_path


@pytest.fixture
def synthetic(tmp_path):
    images_dir, ann_path = write_synthetic_coco(tmp_path)
    prompts = tmp_path / "prompts_and_classes.txt"
    prompts.write_text(PROMPTS_TEXT)
    subjects = tmp_path / "subjects"
    subjects.mkdir()
    (subjects / "can.yaml").write_text(
        "name: can\nclass_noun: can\nkind: object\nimage_dir: ${paths.dreambooth_dir}/images/can\n"
        "attributes:\n  color: [red, silver]\n  material: [aluminium]\n"
    )
    # An ADM-style attribute file, found through an interpolation like the real configs use.
    (subjects / "clock.yaml").write_text(
        "name: clock\nclass_noun: clock\nkind: object\nattributes_file: ${paths.data_dir}/clock_attributes.json\n"
        "attributes:\n  color: [red]\n"
    )
    (tmp_path / "clock_attributes.json").write_text('{"color": ["Purple", "gold"]}')
    return {"root": tmp_path, "images": images_dir, "annotations": ann_path, "prompts": prompts, "subjects": subjects}


def overrides(data: dict, out_dir: Path, *extra: str) -> list[str]:
    filters = [f"benchmark.filters.{k}={v}" for k, v in FILTERS.items()]
    return [
        f"benchmark.coco_images={data['images']}",
        f"benchmark.coco_annotations={data['annotations']}",
        f"benchmark.out_dir={out_dir}",
        f"benchmark.prompts_file={data['prompts']}",
        f"benchmark.subject_dir={data['subjects']}",
        f"paths.data_dir={data['root']}",
        *filters,
        *extra,
    ]


def build(compose, data, out_dir, *extra):
    from dreammix.benchmark.builder import build_benchmark

    return build_benchmark(compose("build_benchmark", overrides(data, out_dir, *extra)))


# ------------------------------------------------------------------------------------------------
# Filters and selection
# ------------------------------------------------------------------------------------------------


def test_pixel_box_rounds_outwards_and_clips():
    assert pixel_box([20.4, 30.6, 50.0, 40.0], 200, 150) == (20, 30, 71, 71)
    assert pixel_box([100.0, 50.0, 79.5, 69.2], 180, 120) == (100, 50, 180, 120)  # 179.5 -> 180, 119.2 -> 120
    assert pixel_box([-3.0, -1.5, 20, 20], 50, 50) == (0, 0, 17, 19)


def test_filters_keep_exactly_the_hand_checked_images_and_boxes(synthetic):
    coco = load_coco(synthetic["annotations"])
    pool, stats = select_backgrounds(coco, BoxFilters(**FILTERS), seed=0)
    assert [bg.image_id for bg in pool] == ELIGIBLE_IMAGES
    by_id = {bg.image_id: bg for bg in pool}
    assert (by_id[1].ann_id, by_id[1].box, by_id[1].category) == (10, (20, 30, 71, 71), "cup")
    assert by_id[5].ann_id == 51
    assert by_id[6].ann_id in (60, 61)
    assert stats == {
        "images_listed": 8,
        "images_low_resolution": 1,  # image 3
        "images_without_box": 2,  # image 2 (crowd only), image 4 (no annotation)
        "boxes_listed": 11,
        "boxes_eligible": 6,
        "backgrounds": 5,
    }
    # Excluding a category removes its boxes: image 8 only has a person.
    pool, _ = select_backgrounds(coco, BoxFilters(**FILTERS, exclude_categories=("person",)), seed=0)
    assert [bg.image_id for bg in pool] == [1, 6, 7]


def test_box_choice_is_seeded_per_image():
    from dreammix.benchmark.builder import CocoIndex

    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in range(1, 41)]
    anns = {
        i: [{"id": 1000 * i + k, "category_id": 1, "bbox": [k * 20, 0, 40, 40], "iscrowd": 0} for k in range(4)]
        for i in range(1, 41)
    }
    coco = CocoIndex(images=images, annotations=anns, categories={1: "x"})
    a, _ = select_backgrounds(coco, BoxFilters(**FILTERS), seed=0)
    b, _ = select_backgrounds(coco, BoxFilters(**FILTERS), seed=0)
    c, _ = select_backgrounds(coco, BoxFilters(**FILTERS), seed=1)
    assert a == b
    assert [x.ann_id for x in a] != [x.ann_id for x in c]
    # The choice for an image does not depend on the other images.
    coco.images = images[10:]
    d, _ = select_backgrounds(coco, BoxFilters(**FILTERS), seed=0)
    assert d == a[10:]


def test_assignment_windows_are_distinct_within_and_disjoint_across_subjects():
    pool = list(range(100))
    assigned = assign_backgrounds(pool, {"a": 0, "b": 1, "c": 2}, per_subject=30, seed=3)
    assert all(len(v) == 30 and len(set(v)) == 30 for v in assigned.values())
    assert not set(assigned["a"]) & set(assigned["b"]) and not set(assigned["b"]) & set(assigned["c"])
    # Too few backgrounds: every subject still gets distinct ones, shared across subjects.
    small = assign_backgrounds(list(range(4)), {"a": 0, "b": 1}, per_subject=140, seed=0)
    assert all(sorted(v) == [0, 1, 2, 3] for v in small.values())


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------


def test_prompts_from_published_list_and_attribute_dictionary(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(PROMPTS_TEXT)
    facts = parse_prompts_and_classes(path)
    clock = SubjectSpec("clock", "clock")
    assert identity_prompts(clock, ["a photo of {identifier} {class_noun}", "a {identifier} {class_noun}"]) == [
        "a photo of sks clock",
        "a sks clock",
    ]
    published = ["a red sks clock", "a purple sks clock", "a shiny sks clock", "a wet sks clock", "a cube shaped sks clock"]
    assert attribute_prompts(clock, facts, count=5) == published
    assert attribute_prompts(clock, facts, count=3) == published[:3]
    dog = SubjectSpec("dog", "dog", kind="live")
    assert attribute_prompts(dog, facts, count=5) == [p.replace("clock", "dog") for p in published]

    # A red can: "a red sks can" is no edit; a colour it does not have replaces it.
    can = SubjectSpec("can", "can", attributes={"color": ["red", "silver"], "material": ["aluminium"]})
    vocabulary = {"color": ["red", "silver", "blue", "green"], "material": ["wooden"]}
    prompts = attribute_prompts(can, facts, count=5, edit_vocabulary=vocabulary, seed=0)
    assert len(prompts) == 5 and "a red sks can" not in prompts
    assert prompts[:4] == ["a purple sks can", "a shiny sks can", "a wet sks can", "a cube shaped sks can"]
    assert prompts[4] in {"a blue sks can", "a green sks can", "a wooden sks can"}
    assert prompts == attribute_prompts(can, facts, count=5, edit_vocabulary=vocabulary, seed=0)
    has_all = {"color": ["red", "purple"], "texture": ["shiny", "wet"], "shape": ["cube shaped"]}
    orange = attribute_prompts(
        SubjectSpec("vase", "vase", attributes=has_all),
        facts,
        count=2,
        edit_vocabulary={"color": ["orange"], "shape": ["oval"]},
    )
    assert sorted(orange) == ["an orange sks vase", "an oval sks vase"]  # all published ones dropped
    with pytest.raises(DreamMixError, match="identifier"):
        identity_prompts(clock, ["a photo of a {class_noun}"])


# ------------------------------------------------------------------------------------------------
# The whole build
# ------------------------------------------------------------------------------------------------


def test_build_counts_masks_and_manifest_fields(compose, synthetic):
    out = synthetic["root"] / "bench"
    result = build(compose, synthetic, out, "benchmark.per_subject=3", "benchmark.subjects=[can,clock,dog]")
    cases = read_manifest(result.manifest)
    # 3 subjects x 2 tasks x 3 backgrounds, one prompt each (cycle).
    assert len(cases) == 18 == result.summary["cases"]
    assert result.summary["image_mask_pairs"] == 9
    for subject in ("can", "clock", "dog"):
        for task in ("identity", "attribute"):
            mine = [c for c in cases if c.subject == subject and c.task == task]
            assert len(mine) == 3 and len({c.image_id for c in mine}) == 3
            assert [c.prompt_index for c in mine] == [0, 1, 2]
    identity = [c.prompt for c in cases if c.subject == "clock" and c.task == "identity"]
    assert identity == ["a photo of sks clock", "a sks clock", "a photo of a sks clock in the scene"]
    can_attr = [c.prompt for c in cases if c.subject == "can" and c.task == "attribute"]
    assert "a red sks can" not in can_attr  # the can config says it is red
    clock_attr = result.summary["prompts"]["clock"]["attribute"]
    assert "a purple sks clock" not in clock_attr and "a red sks clock" in clock_attr  # the file wins
    # Manifest fields resolve to the right files; masks are the filled box.
    for case in cases:
        assert case.image_id in ELIGIBLE_IMAGES
        assert case.image_path == (synthetic["images"] / f"{case.image_id:012d}.jpg").resolve()
        mask = Image.open(case.mask_path)
        assert mask.mode == "L" and mask.size == (case.width, case.height) == Image.open(case.image_path).size
        array = np.asarray(mask)
        x0, y0, x1, y1 = case.box
        assert set(np.unique(array)) <= {0, 255}
        assert (array[y0:y1, x0:x1] == 255).all() and (array == 255).sum() == (x1 - x0) * (y1 - y0)
    assert len({c.case_id for c in cases}) == len(cases)
    assert len({c.seed for c in cases}) == len(cases)
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted({Path(c.mask).name for c in cases})


def test_same_inputs_give_a_byte_identical_manifest(compose, synthetic):
    root = synthetic["root"]
    a = build(compose, synthetic, root / "a" / "bench", "benchmark.per_subject=2")
    first = a.manifest.read_bytes()
    again = build(compose, synthetic, root / "a" / "bench", "benchmark.per_subject=2")
    b = build(compose, synthetic, root / "b" / "bench", "benchmark.per_subject=2")
    assert again.manifest.read_bytes() == first == b.manifest.read_bytes()
    assert hashlib.sha256(first).hexdigest() == a.summary["manifest_sha256"]
    other = build(compose, synthetic, root / "c" / "bench", "benchmark.per_subject=2", "benchmark.seed=1")
    assert other.manifest.read_bytes() != first
    # Default subjects: the whole class table; a subject's cases do not depend on the others built.
    assert {c.subject for c in a.cases} == {"can", "clock", "dog", "teapot"}
    alone = build(compose, synthetic, root / "d" / "bench", "benchmark.per_subject=2", "benchmark.subjects=[dog]")
    assert [c.to_json() for c in alone.cases] == [c.to_json() for c in a.cases if c.subject == "dog"]


def test_prompt_assignment_all_and_single_task(compose, synthetic):
    result = build(
        compose,
        synthetic,
        synthetic["root"] / "bench",
        "benchmark.per_subject=2",
        "benchmark.subjects=[teapot]",
        "benchmark.prompt_assignment=all",
        "benchmark.tasks=[attribute]",
    )
    assert len(result.cases) == 2 * 5
    assert {c.task for c in result.cases} == {"attribute"}


def test_missing_image_is_an_error_unless_allowed(compose, synthetic):
    (synthetic["images"] / "000000000005.jpg").unlink()
    with pytest.raises(DreamMixError, match="missing"):
        build(compose, synthetic, synthetic["root"] / "bench")
    with pytest.warns(UserWarning, match="1 of 5 background images are missing"):
        result = build(compose, synthetic, synthetic["root"] / "bench", "benchmark.allow_missing_images=true")
    assert 5 not in {c.image_id for c in result.cases}


def test_bad_inputs_are_one_line_errors(compose, synthetic, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(DreamMixError, match="annotations"):
        build(compose, synthetic, tmp_path / "bench", f"benchmark.coco_annotations={bad}")
    with pytest.raises(DreamMixError, match="no COCO image passes"):
        build(compose, synthetic, tmp_path / "bench", "benchmark.filters.min_image_side=5000")
    with pytest.raises(DreamMixError, match="unknown subject"):
        build(compose, synthetic, tmp_path / "bench", "benchmark.subjects=[nope]")
    # The entry point turns it into `error: ...` and exit code 2.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / "build_benchmark.py"), *overrides(synthetic, tmp_path / "bench"),
         f"benchmark.coco_annotations={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: COCO annotation file has no 'annotations' list")


def test_coco_mini_real_annotations(compose, shared_data, tmp_path):
    """The 4 real val2017 images with the default (paper-scale) thresholds and all 30 subjects."""
    coco = shared_data / "coco_mini"
    result = build_benchmark_real(compose, coco, shared_data / "dreambooth", tmp_path / "bench")
    stats = result.summary["coco"]
    # 000000004495 is 500x375 (< 400 px): low resolution; one more image has no box in range.
    assert (stats["images_listed"], stats["images_low_resolution"], stats["images_without_box"]) == (4, 1, 1)
    cases = read_manifest(result.manifest)
    subjects = {c.subject for c in cases}
    assert len(subjects) == 30
    assert 4495 not in {c.image_id for c in cases}
    # Few images: every subject reuses the same two backgrounds, once per task.
    for subject in subjects:
        mine = [c for c in cases if c.subject == subject]
        assert len(mine) == 4 and len({(c.image_id, c.task) for c in mine}) == 4
    for case in cases:
        w, h = case.width, case.height
        x0, y0, x1, y1 = case.box
        assert min(w, h) >= 400 and min(x1 - x0, y1 - y0) >= 64
        assert 0.02 <= (x1 - x0) * (y1 - y0) / (w * h) <= 0.45
        assert Image.open(case.image_path).size == (w, h)
        assert "sks" in case.prompt
    prompts = result.summary["prompts"]
    assert all(3 <= len(p["identity"]) <= 5 and 3 <= len(p["attribute"]) <= 5 for p in prompts.values())
    assert prompts["bear_plushie"]["attribute"][0] == "a red sks stuffed animal"


def build_benchmark_real(compose, coco: Path, dreambooth: Path, out: Path):
    from dreammix.benchmark.builder import build_benchmark

    cfg = compose(
        "build_benchmark",
        [
            f"benchmark.coco_images={coco / 'val2017'}",
            f"benchmark.coco_annotations={coco / 'annotations' / 'instances_val2017.json'}",
            f"benchmark.out_dir={out}",
            f"paths.dreambooth_dir={dreambooth}",
        ],
    )
    return build_benchmark(cfg)


# ------------------------------------------------------------------------------------------------
# Manifest and records
# ------------------------------------------------------------------------------------------------


def test_read_manifest_names_the_bad_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"case_id": "x"}\n')
    with pytest.raises(DreamMixError, match=r"manifest.jsonl:1"):
        read_manifest(path)
    path.write_text("not json\n")
    with pytest.raises(DreamMixError, match="not JSON"):
        read_manifest(path)


def test_record_log_resumes_dedupes_and_survives_a_torn_write(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl", fsync=False)
    log.append({"case_id": "a", "clip_i": 0.5})
    log.append({"case_id": "b", "clip_i": 0.6})
    log.append({"case_id": "a", "clip_i": 0.7})  # a re-score replaces the old value
    assert log.load() == {"a": {"case_id": "a", "clip_i": 0.7}, "b": {"case_id": "b", "clip_i": 0.6}}
    assert log.pending([{"case_id": c} for c in "abc"]) == [{"case_id": "c"}]
    # A crash mid-append leaves a partial line: reopening drops it, the next append is clean.
    with open(log.path, "ab") as handle:
        handle.write(b'{"case_id": "c", "cli')
    with pytest.warns(UserWarning, match="incomplete"):
        log = RecordLog(log.path, fsync=False)
    log.append({"case_id": "c", "clip_i": 0.1})
    assert set(log.load()) == {"a", "b", "c"}
    assert log.compact() == 3
    assert len(log.path.read_text().splitlines()) == 3
    with pytest.raises(DreamMixError, match="case_id"):
        log.append({"clip_i": 1.0})


# ------------------------------------------------------------------------------------------------
# `make data` downloader (offline: a local HTTP server with Range support)
# ------------------------------------------------------------------------------------------------


def _load_downloader():
    import dreammix.data.download as module  # what scripts/download_data.py runs

    return module


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    ranges: list = []

    def do_GET(self):  # noqa: N802 - http.server API
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header else 0
        body = self.payload[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_downloader_resumes_with_range_verifies_and_installs(tmp_path):
    dl = _load_downloader()
    inner = tmp_path / "zipsrc"
    (inner / "val2017").mkdir(parents=True)
    (inner / "val2017" / "000000000001.jpg").write_bytes(b"jpeg")
    archive = tmp_path / "val2017.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(inner / "val2017" / "000000000001.jpg", "val2017/000000000001.jpg")
    payload = archive.read_bytes()
    _RangeHandler.payload, _RangeHandler.ranges = payload, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/val2017.zip"
        item = dl.Item(
            name="coco-val2017", url=url, filename="val2017.zip", md5=hashlib.md5(payload).hexdigest(),
            size=len(payload), install=dl.install_zip_folder("val2017", "coco/val2017"),
        )
        data = tmp_path / "data"
        part = data / "downloads" / "val2017.zip.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(payload[:40])  # an interrupted earlier run
        assert dl.fetch(item, data, retries=1)
        assert _RangeHandler.ranges == ["bytes=40-"]
        assert (data / "coco" / "val2017" / "000000000001.jpg").read_bytes() == b"jpeg"
        assert not part.exists() and not (data / "downloads" / "val2017.zip").exists()
        assert dl.fetch(item, data, retries=1) is False  # installed: skipped
        # A wrong checksum is refused and the bad file removed so a rerun starts over.
        bad = dl.Item(name="other", url=url, filename="other.zip", md5="0" * 32, install=item.install)
        with pytest.raises(dl.DownloadError, match="md5"):
            dl.fetch(bad, data, retries=1)
        assert not (data / "downloads" / "other.zip").exists()
    finally:
        server.shutdown()


def test_downloader_refuses_zip_slip(tmp_path):
    dl = _load_downloader()
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(dl.DownloadError, match="unsafe"):
        dl.safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_downloader_installs_dreambooth_layout_and_keeps_masks(tmp_path, monkeypatch):
    dl = _load_downloader()
    archive = tmp_path / "db.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dreambooth-abc/dataset/prompts_and_classes.txt", PROMPTS_TEXT)
        zf.writestr("dreambooth-abc/dataset/references_and_licenses.txt", "credits")
        zf.writestr("dreambooth-abc/dataset/can/00.jpg", b"x")
        zf.writestr("dreambooth-abc/dataset/can/01.jpg", b"y")
        zf.writestr("dreambooth-abc/dataset/dog/00.jpg", b"z")
    monkeypatch.setattr(dl, "DREAMBOOTH_SUBJECTS", 2)
    monkeypatch.setattr(dl, "DREAMBOOTH_IMAGES", 3)
    monkeypatch.setattr(dl, "DREAMBOOTH_PROMPTS_SHA256", hashlib.sha256(PROMPTS_TEXT.encode()).hexdigest())
    data = tmp_path / "data"
    (data / "dreambooth" / "masks" / "can").mkdir(parents=True)  # masks copied in by the user
    dl.install_dreambooth(archive, data)
    root = data / "dreambooth"
    assert sorted(p.name for p in (root / "images").iterdir()) == ["can", "dog"]
    assert (root / "images" / "can" / "01.jpg").read_bytes() == b"y"
    assert (root / "prompts_and_classes.txt").read_text() == PROMPTS_TEXT
    assert (root / "masks" / "can").is_dir()
    monkeypatch.setattr(dl, "DREAMBOOTH_IMAGES", 158)
    with pytest.raises(dl.DownloadError, match="3 images"):
        dl.install_dreambooth(archive, data)
