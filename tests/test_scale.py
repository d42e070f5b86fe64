"""Scale-out: sharded evaluation, the rank-aware step-indexed sampler (DDP), the benchmark as a job
graph on the local / Ray / submitit executors, Hydra launcher configs.

Fast tests use stub pipelines (sharding) or plain planning (job graph); the end-to-end runs on real
Ray / submitit / DDP processes are `slow`-marked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dreammix.errors import DreamMixError
from test_eval import StubPipe, StubSuite, bench, eval_cfg  # noqa: F401 - bench is a fixture

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# sharded evaluation
# ------------------------------------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shards_are_disjoint_and_their_merge_equals_the_unsharded_run(compose, tmp_path, bench):
    from dreammix.evaluate import evaluate

    straight = evaluate(eval_cfg(compose, tmp_path, bench, "straight"), pipe_factory=lambda c: StubPipe(), metric_suite=StubSuite())
    pipes = []
    for i in range(2):
        pipes.append(StubPipe())
        part = evaluate(eval_cfg(compose, tmp_path, bench, "sharded", f"shard={i}/2"), pipe_factory=lambda c: pipes[-1],
                        metric_suite=StubSuite())  # fmt: skip
        assert part.run_dir == tmp_path / "sharded" / "shards" / f"{i}-of-2"
        assert part.fid == {} and part.summary["shard"] == f"{i}/2"  # FID of a slice is not the set's
    ids = [{r["case_id"] for r in _lines(tmp_path / "sharded" / "shards" / f"{i}-of-2" / "records.jsonl")} for i in range(2)]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {r["case_id"] for r in straight.records}
    assert [len(p.calls) for p in pipes] == [3, 3]  # 6 cases: each generated once, by one shard

    # the merge: the unsharded command on the same run_dir generates and scores nothing again
    suite = StubSuite(crash_on_batch=1)
    merged = evaluate(eval_cfg(compose, tmp_path, bench, "sharded"), pipe_factory=lambda c: StubPipe(crash_at=1), metric_suite=suite)
    assert (merged.generated, merged.scored) == (0, 0)
    assert merged.records == straight.records  # same cases, same order, same scores and fields
    lines = _lines(tmp_path / "sharded" / "records.jsonl")
    assert sorted(r["case_id"] for r in lines) == sorted(r["case_id"] for r in straight.records)  # each once
    assert merged.summary["tasks"] == straight.summary["tasks"]
    assert merged.fid == pytest.approx(straight.fid) and merged.fid["all"] is not None  # FID once, over all 6
    for record in merged.records:
        assert (tmp_path / "sharded" / record["image"]).read_bytes() == (tmp_path / "straight" / record["image"]).read_bytes()
    again = evaluate(eval_cfg(compose, tmp_path, bench, "sharded"), pipe_factory=lambda c: StubPipe(crash_at=1), metric_suite=suite)
    assert len(_lines(tmp_path / "sharded" / "records.jsonl")) == 6 and again.records == straight.records


def test_merge_of_an_unfinished_shard_generates_only_the_rest(compose, tmp_path, bench):
    from dreammix.evaluate import evaluate

    with pytest.raises(RuntimeError):  # shard 0 dies after 2 of its 3 images
        evaluate(eval_cfg(compose, tmp_path, bench, "run", "shard=0/2"), pipe_factory=lambda c: StubPipe(crash_at=3),
                 metric_suite=StubSuite())  # fmt: skip
    pipe = StubPipe()
    merged = evaluate(eval_cfg(compose, tmp_path, bench, "run"), pipe_factory=lambda c: pipe, metric_suite=StubSuite())
    assert merged.generated == 4 and len(merged.records) == 6  # 2 adopted images, 4 generated here
    with pytest.raises(DreamMixError, match="shard made with other settings"):
        evaluate(eval_cfg(compose, tmp_path, bench, "other", "shard=1/2", "steps=3"), pipe_factory=lambda c: StubPipe(),
                 metric_suite=StubSuite())  # fmt: skip
        evaluate(eval_cfg(compose, tmp_path, bench, "other"), pipe_factory=lambda c: StubPipe(), metric_suite=StubSuite())


@pytest.mark.parametrize("value", ["3/2", "a/b", "2/2", "1/0", "1", "-1/2"])
def test_bad_shard_is_refused_before_any_model(compose, tmp_path, bench, value):
    from dreammix.evaluate import evaluate

    with pytest.raises(DreamMixError, match="must be i/n") as info:
        evaluate(eval_cfg(compose, tmp_path, bench, "run", f"shard='{value}'"), pipe_factory=lambda c: pytest.fail("model loaded"),
                 metric_suite=StubSuite())  # fmt: skip
    assert info.value.where == "shard" and not (tmp_path / "run").exists()


def test_bad_shard_on_the_command_line_is_one_line_exit_2(tmp_path, bench):
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / "eval.py"), "model=tiny", "logger=none", f"manifest={bench.manifest}",
         "subject=custom", "subject.name=thing", "subject.class_noun=thing", f"subject.image_dir={bench.refs}",
         f"lora_dir={bench.lora}", f"hydra.run.dir={tmp_path / 'r'}", "shard=3/2"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: must be i/n with 0 <= i < n, got '3/2' (shard)"]


# ------------------------------------------------------------------------------------------------
# DDP: the step-indexed stream split over ranks
# ------------------------------------------------------------------------------------------------


def test_ranks_read_disjoint_blocks_of_each_global_batch_and_resume_exactly():
    import itertools

    from dreammix.data.datamodule import StepIndexedSampler

    n_items, per_device, ranks = 7, 2, 3
    single = [pair for pair in itertools.islice(StepIndexedSampler(n_items, per_device * ranks, seed=5), 6 * per_device * ranks)]
    streams = [list(itertools.islice(StepIndexedSampler(n_items, per_device, 5, num_replicas=ranks, rank=r), 6 * per_device))
               for r in range(ranks)]  # fmt: skip
    for b in range(6):  # global batch b = the ranks' b-th batches side by side = positions 6b..6b+5 of one stream
        joined = [pair for r in range(ranks) for pair in streams[r][b * per_device : (b + 1) * per_device]]
        assert joined == single[b * per_device * ranks : (b + 1) * per_device * ranks]
    positions = [{p for p, _ in s} for s in streams]
    assert not (positions[0] & positions[1]) and not (positions[1] & positions[2]) and not (positions[0] & positions[2])
    # the module seeds noise by micro-batch number = position // batch size: distinct per rank and step
    assert len({p // per_device for s in streams for p, _ in s[::per_device]}) == 6 * ranks
    # resumed at global batch 4: rank 1 reads exactly its uninterrupted batches 4, 5
    resumed = list(itertools.islice(StepIndexedSampler(n_items, per_device, 5, start_batch=4, num_replicas=ranks, rank=1), 4))
    assert resumed == streams[1][4 * per_device : 6 * per_device]
    bounded = StepIndexedSampler(n_items, per_device, 5, start_batch=1, num_replicas=ranks, rank=2, stop_batch=4)
    assert len(bounded) == 6 and list(bounded) == streams[2][2:8]
    with pytest.raises(TypeError):
        len(StepIndexedSampler(n_items, per_device, 5))  # endless: no length, the trainer stops at max_steps
    with pytest.raises(ValueError):
        StepIndexedSampler(n_items, per_device, 5, num_replicas=2, rank=2)


def _train_cli(tmp_path: Path, shared: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(REPO / "src" / "train.py"), "model=tiny", "logger=none", "subject=can",
        f"paths.dreambooth_dir={shared / 'dreambooth'}", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "validation.every_n_steps=0", "data.mask_variants=2", "optim.lr=1e-2",
        f"run_dir={tmp_path / run}", f"hydra.run.dir={tmp_path / run}", *extra,
    ]  # fmt: skip
    import os

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_ddp_on_cpu_two_ranks_one_lora_different_samples_exact_resume(tmp_path, shared_data, tiny_model_dir):
    """`trainer.devices=2 trainer.strategy=ddp` on CPU (gloo): one LoRA, written by rank 0; resume
    from the step-2 checkpoint of a 4-step run ends at the same LoRA; and the ranks did not read the
    same samples: two ranks reading identical batches would average two equal gradients, i.e. give
    exactly the single-device LoRA, which it is not."""
    from safetensors.torch import load_file

    ddp = ("trainer.devices=2", "trainer.strategy=ddp", f"model.pretrained={tiny_model_dir}")
    _train_cli(tmp_path, shared_data, "straight", *ddp, "trainer.max_steps=4", "checkpoint.every_n_steps=2")
    straight = tmp_path / "straight"
    assert sorted(p.name for p in (straight / "lora").iterdir()) == ["dreammix_run.json", "pytorch_lora_weights.safetensors"]
    assert json.loads((straight / "lora" / "dreammix_run.json").read_text())["steps"] == 4
    assert not list(straight.rglob("*.tmp")) and (straight / "checkpoints" / "step_000002.ckpt").is_file()
    ckpt = straight / "checkpoints" / "step_000002.ckpt"
    _train_cli(tmp_path, shared_data, "resumed", *ddp, "trainer.max_steps=4", f"ckpt_path={ckpt}")
    _train_cli(tmp_path, shared_data, "single", f"model.pretrained={tiny_model_dir}", "trainer.max_steps=4")
    a, b, c = (load_file(tmp_path / r / "lora" / "pytorch_lora_weights.safetensors") for r in ("straight", "resumed", "single"))
    assert a.keys() == b.keys() == c.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4
