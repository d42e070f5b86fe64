"""The benchmark's W&B summary run: Table 1 and Table 3 as tables, every job's run linked, one
contact sheet per subject (rows = ablation rows, columns = cases) — read back from the offline run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dreammix.benchmark.records import RecordLog
from dreammix.benchmark.wandb_log import contact_sheet, log_benchmark, table1_rows, table3_rows
from wandb_files import offline_runs

ROWS = ["baseline", "dif_tas_adm"]
CASES = ["can-identity-0", "can-attribute-0"]


def _eval_dirs(out):
    """Two rows × one subject × two cases, each image a flat colour by (row, case)."""
    dirs = {}
    for r, row in enumerate(ROWS):
        run = out / "eval" / row / "can"
        (run / "images").mkdir(parents=True)
        log = RecordLog(run / "records.jsonl", fsync=False)
        for c, case in enumerate(CASES):
            Image.new("RGB", (128, 128), (100 * r, 60 * c, 20)).save(run / "images" / f"{case}.png")
            log.append({"case_id": case, "task": case.split("-")[1], "subject": "can", "clip_i": 0.5})
        (run / "wandb" / f"offline-run-20261203_000000-{row[:4]}{r}").mkdir(parents=True)
        dirs[row] = {"can": run}
    return dirs


def _payload():
    means = {"baseline": 0.6, "dif_tas_adm": 0.7}
    return {
        "subjects": ["can"],
        "rows": {row: {"tasks": {task: {"n": 1, "mean": {"clip_t": m - 0.4, "clip_i": m, "dino": m + 0.01}}
                                 for task in ("identity", "attribute")},
                       "fid": {"identity": 40.0 + i, "attribute": 50.0 + i}} for i, (row, m) in enumerate(means.items())},
        "real_images": {"n": 4, "mean": {"clip_t": 0.2, "clip_i": 0.9, "dino": 0.8}},
        "real_images_fid": 12.5,
        "paper": {"table3": {"baseline": {"identity": {"clip_t": 0.253, "clip_i": 0.644, "dino": 0.628}}},
                  "table1": {"dreammix": {"attribute": {"clip_t": 0.289, "clip_i": 0.674, "dino": 0.695, "fid": 43.9}}}},
    }


def test_tables_put_ours_beside_the_paper():
    columns, rows = table3_rows(_payload(), ROWS)
    assert columns[:5] == ["row", "method", "task", "clip_t", "clip_t (paper)"]
    first = dict(zip(columns, rows[0]))
    assert first["method"] == "Baseline" and first["task"] == "identity"
    assert first["clip_i"] == pytest.approx(0.6) and first["clip_i (paper)"] == 0.644 and first["fid"] == 40.0
    assert dict(zip(columns, rows[3]))["clip_i (paper)"] is None and dict(zip(columns, rows[3]))["fid"] == 51.0
    columns, rows = table1_rows(_payload(), "dif_tas_adm")
    by = {(r[0], r[1]): dict(zip(columns, r)) for r in rows}
    assert by[("DreamMix (ours)", "attribute")]["clip_i"] == pytest.approx(0.7)
    assert by[("DreamMix (paper)", "attribute")]["fid"] == 43.9
    assert by[("Real images (ours)", "identity")]["dino"] == 0.8 and by[("Real images (ours)", "identity")]["fid"] == 12.5


def test_contact_sheet_rows_are_ablation_rows_and_columns_cases(tmp_path):
    dirs = _eval_dirs(tmp_path)
    sheet = np.asarray(contact_sheet({row: dirs[row]["can"] for row in ROWS}, ROWS))
    assert sheet.shape == (16 + 2 * 128, 90 + 2 * 128, 3)
    for r in range(2):
        for c in range(2):
            cell = sheet[16 + r * 128 : 16 + (r + 1) * 128, 90 + c * 128 : 90 + (c + 1) * 128]
            assert (cell == (100 * r, 60 * c, 20)).all()


@pytest.mark.slow  # W&B start-up: ~20 s on a busy 2-core machine
def test_summary_run_holds_the_tables_job_links_and_contact_sheets(compose, tmp_path):
    dirs = _eval_dirs(tmp_path / "bench")
    cfg = compose("benchmark_run", ["bench=tiny", f"run_dir={tmp_path / 'summary'}", f"bench.experiments={ROWS}".replace("'", "")])
    log_benchmark(cfg, tmp_path / "bench", _payload(), dirs)
    (run,) = offline_runs(tmp_path / "summary")
    assert run.job_type == "benchmark" and run.group == "benchmark-tiny-paper"
    assert sorted(j["run_id"] for j in run.config["job_runs"]) == ["base0", "dif_1"]
    files = run.files / "media"
    table3 = json.loads(next((files / "table" / "benchmark").glob("table3_*.table.json")).read_text())
    assert [row[:3] for row in table3["data"]] == [["baseline", "Baseline", "identity"], ["baseline", "Baseline", "attribute"],
                                                   ["dif_tas_adm", "++ADM", "identity"], ["dif_tas_adm", "++ADM", "attribute"]]
    table1 = json.loads(next((files / "table" / "benchmark").glob("table1_*.table.json")).read_text())
    assert ["DreamMix (paper)", "attribute", 0.289, 0.674, 0.695, 43.9] in table1["data"]
    jobs = json.loads(next((files / "table" / "benchmark").glob("jobs_*.table.json")).read_text())
    assert sorted(row[0] for row in jobs["data"]) == ["eval/baseline/can", "eval/dif_tas_adm/can"]
    (sheet_file,) = (files / "images" / "contact_sheet").glob("can_*.png")
    assert Image.open(sheet_file).size == (90 + 2 * 128, 16 + 2 * 128)
    captions = [row["contact_sheet/can/caption"] for row in run.history if "contact_sheet/can/caption" in row]
    assert captions == ["can: rows Baseline, ++ADM; columns = cases"]
    assert run.summary["dif_tas_adm/attribute/clip_i"] == pytest.approx(0.7)
