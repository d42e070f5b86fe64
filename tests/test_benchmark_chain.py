"""`make benchmark`: the chain benchmark → LoRAs → evaluation → tables, and the experiment rows.

The end-to-end test runs the `bench=tiny` preset (what `make benchmark BENCH=tiny` runs) in-process
on the shared coco_mini + DreamBooth data, then reruns it to check that nothing is redone.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from dreammix.benchmark.report import table1_markdown, table3_markdown
from conftest import CONF_DIR
from dreammix.benchmark.run import kv, loss_variant

ROWS = ["baseline", "dif", "dif_tas", "dif_tas_adm"]


@pytest.mark.parametrize(
    "row,loss,lambda_,tas",
    [("baseline", (1.0, 1.0, 0.0), 0.0, False), ("dif", (1.0, 1.0, 0.0), 0.7, False),
     ("dif_tas", (1.0, 1.0, 0.0), 0.7, True), ("dif_tas_adm", (1.5, 0.7, 0.4), 0.7, True)],
)  # fmt: skip
def test_experiment_rows_set_training_in_both_configs_and_inference_in_eval(compose, row, loss, lambda_, tas):
    train = compose("train", [f"experiment={row}", "run_dir=/tmp/x"])
    evalc = compose("eval", [f"experiment={row}", "run_dir=/tmp/x", "lora_dir=null"])
    for cfg in (train, evalc):
        assert (cfg.loss.tau_in, cfg.loss.tau_out, cfg.loss.beta) == loss
    assert "dif" not in train and "tas" not in train  # train.yaml gets only keys it has
    assert (evalc.row, evalc.dif.lambda_, evalc.tas.enabled) == (row, lambda_, tas)
    # the command line still wins over the row (sweeps)
    assert compose("eval", [f"experiment={row}", "run_dir=/tmp/x", "lora_dir=null", "dif.lambda_=0.3"]).dif.lambda_ == 0.3


def test_rows_share_loras_by_training_variant(compose):
    variants = {row: loss_variant(compose("train", [f"experiment={row}", "run_dir=/tmp/x"]).loss) for row in ROWS}
    assert variants == {"baseline": "tau1-1_beta0", "dif": "tau1-1_beta0", "dif_tas": "tau1-1_beta0",
                        "dif_tas_adm": "tau1.5-0.7_beta0.4"}  # fmt: skip
    from dreammix.evaluate import RUN_INFO_NAME
    from dreammix.train import RUN_INFO_NAME as written_by_train

    assert RUN_INFO_NAME == written_by_train  # evaluate reads the file train writes last
    assert kv("run_dir", "/a b/c") == "run_dir='/a b/c'" and kv("x", "/a/b") == "x=/a/b"


def test_tables_put_paper_numbers_beside_ours():
    paper = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "benchmark_run.yaml").paper)
    ours = {"tasks": {"identity": {"n": 8, "mean": {"clip_t": 0.3, "clip_i": 0.7, "dino": 0.6}}}}
    t3 = table3_markdown({"dif": ours}, paper["table3"], ROWS)
    assert "| +DIF | 0.300 | 0.291 | 0.700 | 0.723 | 0.600 | 0.717 | 8 |" in t3
    assert "| Baseline | n/a | 0.253 | n/a | 0.644 | n/a | 0.628 | 0 |" in t3  # row not run
    assert "| ++ADM | n/a | 0.289 | n/a | 0.674 | n/a | 0.695 | 0 |" in t3  # attribute editing section
    real = {"n": 5, "mean": {"clip_t": 0.2, "clip_i": 0.8, "dino": 0.7}}
    t1 = table1_markdown(ours, real, paper["table1"], fid={"identity": 50.123}, real_fid=10.0)
    assert "| Real images (ours) | 0.200 | 0.800 | 0.700 | 10.00 | 5 images |" in t1
    assert "| DreamMix (ours) | 0.300 | 0.700 | 0.600 | 50.12 | 8 |" in t1
    assert "| DreamMix (paper) | 0.285 | 0.728 | 0.712 | 42.90 | |" in t1
    assert "| DreamMix (paper) | 0.289 | 0.674 | 0.695 | 43.90 | |" in t1


def test_tiny_benchmark_chain_end_to_end_and_rerun_redoes_nothing(compose, shared_data, tmp_path):
    from dreammix.benchmark.run import run_benchmark

    root = tmp_path / "bench"
    out = root / "paper"  # the default preset's folder
    cfg = compose("benchmark_run", ["bench=tiny", f"bench.shared_data={shared_data}", f"bench.root={root}", f"run_dir={tmp_path / 'r'}"])
    first = run_benchmark(cfg)
    assert first.out_dir == out
    # one LoRA per subject and training variant (3 rows share the DreamBooth one), ADM sets where needed
    assert sorted(first.trained) == ["tau1-1_beta0/can", "tau1-1_beta0/dog", "tau1.5-0.7_beta0.4/can", "tau1.5-0.7_beta0.4/dog"]
    assert sorted(first.adm_built) == ["can", "dog"]
    results = json.loads(first.results.read_text())
    for row in ROWS:
        tasks = results["rows"][row]["tasks"]
        # coco_mini: 2 usable backgrounds per subject → 2 subjects × 2 cases per task
        assert tasks["identity"]["n"] == 4 and tasks["attribute"]["n"] == 4
        assert set(tasks["identity"]["per_subject"]) == {"can", "dog"}
        assert all(results["rows"][row]["fid"][t] is not None for t in ("identity", "attribute"))
    assert results["real_images"]["n"] == 11  # 6 can + 5 dog training images
    table1, table3 = first.table1.read_text(), first.table3.read_text()
    for label, paper in (("Baseline", "0.253"), ("+DIF", "0.291"), ("++TAS", "0.290"), ("++ADM", "0.285")):
        assert any(line.startswith(f"| {label} |") and f"| {paper} |" in line for line in table3.splitlines())
    assert "| Real images (ours) |" in table1 and "| DreamMix (paper) | 0.285 | 0.728 | 0.712 | 42.90 | |" in table1
    # every table names the base model and the preset that produced it (the tiny Fooocus base here)
    for table in (table1, table3):
        assert "Base model `tiny_fooocus`" in table and "inpaint_v26.fooocus.patch" in table and "preset `paper`" in table
    assert results["preset"] == "paper" and results["base_model"]["name"] == "tiny_fooocus"
    assert "published FID of the DreamMix (paper) row is unverified" in table1
    # records of a row are those of its evaluation runs, once each
    runs = results["rows"]["dif_tas_adm"]["runs"]
    lines = [json.loads(l) for s in ("can", "dog") for l in (out / "eval" / "dif_tas_adm" / s / "records.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and len({r["case_id"] for r in lines}) == 8 and set(runs) == {"can", "dog"}

    # rerun: nothing trained, generated or scored again; same tables
    before = {p: p.stat().st_mtime_ns for p in out.glob("eval/*/*/images/*.png")}
    second = run_benchmark(cfg)
    assert second.trained == [] and second.adm_built == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("eval/*/*/images/*.png")} == before
    assert second.table3.read_text() == table3 and second.table1.read_text() == table1
