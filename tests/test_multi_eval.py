"""Multi-subject evaluation (``src/eval.py -cn eval_multi``) on the tiny benchmark: pair cases from
the benchmark builder's pool, per-region scores against own and other subject, the leak check."""

import json

import numpy as np
import pytest
from PIL import Image

from dreammix.multi_eval import _disjoint, pair_cases, summarize_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(compose, shared_data, tmp_path, *overrides):
    return compose("eval_multi", [
        f"paths.dreambooth_dir={shared_data / 'dreambooth'}",
        f"benchmark.coco_images={shared_data / 'coco_mini' / 'val2017'}",
        f"benchmark.coco_annotations={shared_data / 'coco_mini' / 'annotations' / 'instances_val2017.json'}",
        "model=tiny", "metrics=tiny", "metrics.device=cpu", "device=cpu", "steps=2", f"run_dir={tmp_path / 'run'}",
        *overrides,
    ])  # fmt: skip


def test_pairs_are_two_disjoint_eligible_boxes_of_one_background(compose, shared_data, tmp_path):
    from dreammix.benchmark.builder import BoxFilters, _box_ok, load_coco, pixel_box

    cfg = _cfg(compose, shared_data, tmp_path)
    cases = pair_cases(cfg)
    coco = load_coco(str(cfg.benchmark.coco_annotations))
    assert len(cases) >= 1 and len({c.image for c in cases}) == len(cases)  # coco_mini: one such image
    for case in cases:
        a, b = case.boxes
        assert _disjoint(a, b) and case.subjects == ("dog", "can")
        image = next(i for i in coco.images if i["file_name"] in case.image)
        eligible = {pixel_box(x["bbox"], image["width"], image["height"]) for x in coco.annotations[image["id"]]
                    if _box_ok(x, image["width"], image["height"], BoxFilters(), coco.categories)}  # fmt: skip
        assert {a, b} <= eligible
        assert "sks dog" in case.prompts[0] and "sks can" in case.prompts[1]
    assert pair_cases(cfg) == cases  # deterministic
    # boxes that overlap never pair up
    assert not _disjoint((0, 0, 10, 10), (9, 9, 20, 20)) and _disjoint((0, 0, 10, 10), (10, 0, 20, 10))


def test_leak_check_compares_own_with_other_means():
    rows = [{"case_id": "c", "region": r, "subject": s, "clip_t": 0.2, "clip_i_own": own, "clip_i_other": other,
             "dino_own": own, "dino_other": own + 0.1} for r, s, own, other in (("a", "dog", 0.9, 0.5), ("b", "can", 0.3, 0.4))]  # fmt: skip
    summary = summarize_pairs(rows)
    assert summary["overall"]["clip_i_own"] == pytest.approx(0.6) and summary["overall"]["clip_i_other"] == pytest.approx(0.45)
    assert summary["own_beats_other"] == {"clip_i": True, "dino": False}
    assert summary["regions"]["b"]["clip_i_own"] == pytest.approx(0.3)
    assert summary["own_beats_other_per_region"] == {"a": {"clip_i": True, "dino": False}, "b": {"clip_i": False, "dino": False}}


def test_tiny_multi_subject_eval_scores_each_region_against_both_subjects(compose, shared_data, tmp_path, tiny_model_dir):
    from dreammix.evaluate import evaluate
    from lora_runs import make_lora

    dog, can = make_lora(tiny_model_dir, tmp_path / "dog", 0), make_lora(tiny_model_dir, tmp_path / "can", 1)
    cfg = _cfg(compose, shared_data, tmp_path, f"lora_a={dog}", f"lora_b={can}")
    summary = evaluate(cfg)
    run = tmp_path / "run"
    cases = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(cases) and summary["cases"] == len(cases)
    for case in cases:
        out = np.asarray(Image.open(run / "images" / f"{case['case_id']}.png"))
        assert out.shape == (case["height"], case["width"], 3)
        x = np.asarray(Image.open(case["image"]).convert("RGB"))
        for x0, y0, x1, y1 in case["boxes"]:
            assert not np.array_equal(out[y0:y1, x0:x1], x[y0:y1, x0:x1])  # each region inpainted
        mine = [r for r in records if r["case_id"] == case["case_id"]]
        assert [(r["subject"], r["other"]) for r in mine] == [("dog", "can"), ("can", "dog")]
        for r in mine:
            assert all(-1.0 <= r[k] <= 1.0 for k in ("clip_t", "clip_i_own", "clip_i_other", "dino_own", "dino_other"))
            assert r["clip_i_own"] != r["clip_i_other"]  # scored against two different photo sets
    assert set(summary["own_beats_other"]) == {"clip_i", "dino"}
    assert "Leak check (own > other)" in (run / "summary.md").read_text()
