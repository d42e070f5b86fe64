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
    assert {"dreammix_run.json", "pytorch_lora_weights.safetensors"} <= {p.name for p in (straight / "lora").iterdir()}
    assert json.loads((straight / "lora" / "dreammix_run.json").read_text())["steps"] == 4
    assert not list(straight.rglob("*.tmp")) and (straight / "checkpoints" / "step_000002.ckpt").is_file()
    ckpt = straight / "checkpoints" / "step_000002.ckpt"
    _train_cli(tmp_path, shared_data, "resumed", *ddp, "trainer.max_steps=4", f"ckpt_path={ckpt}")
    _train_cli(tmp_path, shared_data, "single", f"model.pretrained={tiny_model_dir}", "trainer.max_steps=4")
    a, b, c = (load_file(tmp_path / r / "lora" / "pytorch_lora_weights.safetensors") for r in ("straight", "resumed", "single"))
    assert a.keys() == b.keys() == c.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


# ------------------------------------------------------------------------------------------------
# the benchmark as a job graph
# ------------------------------------------------------------------------------------------------


def _bench_cfg(compose, shared_data, out: Path, *extra: str):
    return compose("benchmark_run", ["bench=tiny", f"bench.shared_data={shared_data}", f"bench.root={out}", f"run_dir={out / 'r'}", *extra])


def test_dry_run_lists_every_job_with_its_command_and_the_full_count(compose, shared_data, tmp_path, capsys):
    from dreammix.benchmark.run import run_benchmark

    result = run_benchmark(_bench_cfg(compose, shared_data, tmp_path / "b", "bench.dry_run=true", "bench.shards=2"))
    out = capsys.readouterr().out
    assert not (tmp_path / "b").exists()  # nothing run, nothing written
    # 1 manifest + ADM for 2 subjects + 2 variants x 2 subjects + 4 rows x 2 subjects x (2 shards + merge)
    assert len(result.jobs) == 1 + 2 + 4 + 4 * 2 * 3 == 31
    assert "planned: 31 jobs (31 to run) for 2 subject(s) x 4 row(s)" in out
    # the 30 DreamBooth subjects: 1 + 30 ADM + 60 trainings + 4 x 30 x 3 evaluations
    assert "all 30 subjects: 451 jobs (manifest 1, train 60, adm 30, eval 360)" in out
    for name in result.jobs:
        assert f"[todo] {name}" in out
    lines = out.splitlines()
    shard = lines.index(next(l for l in lines if "[todo] eval/dif/dog/shard-1-of-2" in l))
    command = lines[shard + 1].strip()
    assert command.startswith("python src/eval.py ") and " experiment=dif " in command and " subject=dog " in command
    assert command.endswith("fid=false shard=1/2") and " loss.beta=0.0 " in command  # the LoRA's training loss, checked
    merge = next(l for l in lines if "[todo] eval/dif/dog (after" in l)
    assert "(after eval/dif/dog/shard-0-of-2, eval/dif/dog/shard-1-of-2)" in merge
    train = lines.index(next(l for l in lines if "[todo] train/tau1.5-0.7_beta0.4/can" in l))
    assert "(after adm/can)" in lines[train] and "experiment=dif_tas_adm subject=can" in lines[train + 1]


@pytest.mark.parametrize(
    "override,message",
    [("bench.executor=pbs", "error: unknown executor 'pbs'; known: local, ray, slurm, submitit_local (bench.executor)"),
     ("bench.executor=slurm", "error: sbatch not found on PATH"),
     ("bench.ray.address=auto", "error: Ray cannot start: Could not find any running Ray instance")],
)  # fmt: skip
def test_executor_that_cannot_run_is_a_one_line_error(tmp_path, override, message):
    import os

    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "RAY_ADDRESS": ""}
    extra = ["bench.executor=ray"] if override.startswith("bench.ray") else []
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / "benchmark.py"), "bench=tiny", f"bench.root={tmp_path / 'b'}", "bench.experiments=[dif]",
         "bench.subjects=[can]", *extra, override, f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len([l for l in lines if l.startswith("error:")]) == 1 and lines[-1].startswith(message)


def test_failing_job_is_retried_reported_and_the_others_go_on(shared_data, tmp_path):
    """A graph of real commands: the manifest (succeeds), an evaluation with a LoRA folder that does
    not exist (fails, retried once), the merge that needs it (not run), and nothing else stopped;
    the record says which job, its log file and the reason."""
    from dreammix.benchmark.executors import LocalExecutor, execute
    from dreammix.benchmark.jobs import Job

    out = tmp_path / "b"
    bench = out / "benchmark"
    manifest = Job("manifest", "build_benchmark", (f"paths.dreambooth_dir={shared_data / 'dreambooth'}", f"benchmark.out_dir={bench}",
                   f"benchmark.coco_images={shared_data / 'coco_mini' / 'val2017'}", "benchmark.per_subject=1",
                   f"benchmark.coco_annotations={shared_data / 'coco_mini' / 'annotations' / 'instances_val2017.json'}"),
                   gpu=False, done_files=(str(bench / "manifest.jsonl"),))  # fmt: skip
    shard = Job("eval/dif/can/shard-0-of-2", "eval", ("model=tiny", "logger=none", "subject=can", f"paths.dreambooth_dir={shared_data / 'dreambooth'}",
                f"benchmark.out_dir={bench}", f"lora_dir={tmp_path / 'nowhere'}", f"run_dir={out / 'e'}", "shard=0/2"), ("manifest",),
                summary=str(out / "e" / "shards" / "0-of-2" / "summary.json"))  # fmt: skip
    merge = Job("eval/dif/can", "eval", ("model=tiny",), (shard.name,), summary=str(out / "e" / "summary.json"))
    lines: list[str] = []
    result = execute([manifest, shard, merge], LocalExecutor(), retries=1, out=out, conf_dir=None, echo=lines.append)
    assert result.done == ["manifest"] and result.blocked == ["eval/dif/can"] and list(result.failed) == [shard.name]
    failure = result.failed[shard.name]
    assert failure["reason"] == f"DreamMixError: LoRA folder not found (lora_dir={tmp_path / 'nowhere'})"
    assert failure["log"] == str(out / "logs" / "eval__dif__can__shard-0-of-2.log") and "Traceback" in Path(failure["log"]).read_text()
    records = _lines(out / "jobs.jsonl")
    assert [(r["job"], r["status"], r["attempt"]) for r in records] == [("manifest", "ok", 1), (shard.name, "failed", 1), (shard.name, "failed", 2)]
    assert all(r["end"] >= r["start"] and r["command"].startswith("python src/") for r in records)
    assert lines[1].startswith("[1/3] done manifest in ") and "| elapsed " in lines[1] and ", ETA " in lines[1]
    assert lines[2] == f"retrying {shard.name} (attempt 2 of 2): {failure['reason']}"
    assert lines[3].startswith(f"[2/3] FAILED {shard.name} in ")
    assert lines[4] == f"  job {shard.name} failed: {failure['reason']} (log: {failure['log']})"
    assert len(lines) == 5
    # the rerun: the manifest is done, so only the failed job is attempted again
    again = execute([manifest, shard, merge], LocalExecutor(), retries=0, out=out, conf_dir=None, echo=lambda line: None)
    assert again.skipped == ["manifest"] and list(again.failed) == [shard.name] and len(_lines(out / "jobs.jsonl")) == 4


def test_tables_mark_missing_cells_instead_of_averaging_fewer_cases():
    from dreammix.benchmark.report import table1_markdown, table3_markdown
    from dreammix.benchmark.run import mark_missing

    def record(case, task, value):
        return {"case_id": case, "task": task, "subject": "can", **{k: value for k in ("clip_t", "clip_i", "dino")}}

    rows = {"dif": {"records": [record("a", "identity", 0.5), record("b", "identity", 0.7), record("c", "attribute", 0.2)],
                    "tasks": {"identity": {"n": 2, "mean": {"clip_t": 0.6, "clip_i": 0.6, "dino": 0.6}},
                              "attribute": {"n": 1, "mean": {"clip_t": 0.2, "clip_i": 0.2, "dino": 0.2}}}},
            "baseline": {"records": [], "tasks": {}}}  # fmt: skip
    expected = {"dif": {"identity": {"a", "b"}, "attribute": {"c", "d"}}, "baseline": {"identity": {"a", "b"}, "attribute": {"c", "d"}}}
    assert mark_missing(rows, expected) == {"dif": {"attribute": "1 of 2"}, "baseline": {"identity": "0 of 2", "attribute": "0 of 2"}}
    t3 = table3_markdown(rows, {}, ["baseline", "dif"])
    assert "| +DIF | 0.600 | n/a | 0.600 | n/a | 0.600 | n/a | 2 |" in t3  # identity complete
    assert "| +DIF | missing | n/a | missing | n/a | missing | n/a | 1 of 2 |" in t3  # attribute: not the mean of 1 case
    assert "| Baseline | missing | n/a | missing | n/a | missing | n/a | 0 of 2 |" in t3
    t1 = table1_markdown(rows["dif"], None, {}, fid={"identity": 12.0, "attribute": None})
    assert "| DreamMix (ours) | missing | missing | missing | missing | 1 of 2 |" in t1


def test_make_benchmark_passes_executor_and_workers():
    proc = subprocess.run(["make", "-n", "benchmark", "BENCH=tiny", "EXECUTOR=ray", "WORKERS=2", "ARGS=bench.shards=2"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    command = proc.stdout.replace("\\\n", " ")
    assert "src/benchmark.py bench=tiny" in command and "bench.executor=ray bench.ray.num_workers=2 bench.shards=2" in " ".join(command.split())


# ------------------------------------------------------------------------------------------------
# the engines, end to end (slow: real Ray / submitit processes on the tiny benchmark)
# ------------------------------------------------------------------------------------------------


def _numbers(out: Path) -> dict:
    """What the tables say: per row the task means and case counts, FID, the real-images row."""
    results = json.loads((out / "results.json").read_text())
    return {"rows": {row: {"tasks": entry["tasks"], "fid": entry["fid"]} for row, entry in results["rows"].items()},
            "real": results["real_images"], "real_fid": results["real_images_fid"], "incomplete": results["incomplete"]}  # fmt: skip


def _tables(out: Path) -> tuple[str, str]:
    return tuple((out / name).read_text().replace(str(out.parent), "<root>") for name in ("table1.md", "table3.md"))


def _benchmark_cli(out: Path, shared: Path, *extra: str, **popen) -> subprocess.Popen:
    """`make benchmark BENCH=tiny ...`'s command with its results in ``out`` (= <bench.root>/paper)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    cmd = [sys.executable, str(REPO / "src" / "benchmark.py"), "bench=tiny", "preset=paper", f"bench.shared_data={shared}",
           f"bench.root={out.parent}", f"hydra.run.dir={out.parent / 'run'}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def _finish(proc: subprocess.Popen, timeout: int = 1500) -> str:
    import os
    import signal

    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind in its own session (Ray's processes)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, shared_data):
    """The tiny benchmark run one job after another in one process (bench.executor=local)."""
    out = tmp_path_factory.mktemp("sequential") / "b" / "paper"
    _finish(_benchmark_cli(out, shared_data))
    return out


def _overlapping(records: list[dict]) -> list[tuple[str, str]]:
    ran = [r for r in records if r["status"] == "ok"]
    return [(a["job"], b["job"]) for i, a in enumerate(ran) for b in ran[i + 1 :]
            if a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]]  # fmt: skip


@pytest.mark.slow
def test_tiny_benchmark_on_ray_two_workers_equals_sequential_and_jobs_overlap(sequential, shared_data, tmp_path):
    out = tmp_path / "b" / "paper"
    output = _finish(_benchmark_cli(out, shared_data, "bench.executor=ray", "bench.ray.num_workers=2"))
    assert "[15/15] done " in output and "benchmark: 15 job(s) to run on ray, 0 already done" in output
    assert _numbers(out) == _numbers(sequential) and _tables(out) == _tables(sequential)
    records = _lines(out / "jobs.jsonl")
    assert len(records) == 15 and all(r["status"] == "ok" and r["executor"] == "ray" for r in records)
    assert _overlapping(records), "no two jobs ran at the same time"
    assert len({r["pid"] for r in records}) == 2  # two workers (Ray reuses them across jobs)


@pytest.mark.slow
def test_tiny_benchmark_through_submitit_local_equals_sequential(sequential, shared_data, tmp_path):
    out = tmp_path / "b" / "paper"
    output = _finish(_benchmark_cli(out, shared_data, "bench.executor=submitit_local"))
    assert "[15/15] done " in output
    assert _numbers(out) == _numbers(sequential) and _tables(out) == _tables(sequential)
    records = _lines(out / "jobs.jsonl")
    assert len(records) == 15 and len({r["pid"] for r in records}) == 15 and _overlapping(records)  # a process per job
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 15


@pytest.mark.slow
def test_driver_killed_mid_ray_benchmark_rerun_redoes_only_unfinished_work(sequential, shared_data, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "b" / "paper"
    proc = _benchmark_cli(out, shared_data, "bench.executor=ray", "bench.ray.num_workers=2")
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        records = _lines(out / "jobs.jsonl") if (out / "jobs.jsonl").is_file() else []
        if sum(r["status"] == "ok" and r["job"].startswith("train/") for r in records) >= 2:
            break
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only; its Ray processes are on their own
    proc.communicate()
    time.sleep(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # then whatever is left of that run (test hygiene)
    except ProcessLookupError:
        pass
    first = _lines(out / "jobs.jsonl")
    finished = {r["job"] for r in first if r["status"] == "ok"}
    assert 3 <= len(finished) < 15 and not (out / "table3.md").exists()

    output = _finish(_benchmark_cli(out, shared_data, "bench.executor=ray", "bench.ray.num_workers=2"))
    second = _lines(out / "jobs.jsonl")[len(first) :]
    import re

    todo, already = map(int, re.search(r"benchmark: (\d+) job\(s\) to run on ray, (\d+) already done", output).groups())
    # nothing that had finished is run again (a job finished but not yet reported at the kill counts as done too)
    assert already >= len(finished) and todo + already == 15 and len(second) == todo
    assert not ({r["job"] for r in second} & finished) and {r["job"] for r in second} <= set(_all_jobs())
    assert all(r["status"] == "ok" for r in second)
    for records in out.glob("eval/*/*/records.jsonl"):
        ids = [r["case_id"] for r in _lines(records)]
        assert len(ids) == len(set(ids)) == 4  # no record twice
    assert _numbers(out) == _numbers(sequential) and _tables(out) == _tables(sequential)


def _all_jobs() -> list[str]:
    variants = {"baseline": "tau1-1_beta0", "dif": "tau1-1_beta0", "dif_tas": "tau1-1_beta0", "dif_tas_adm": "tau1.5-0.7_beta0.4"}
    subjects = ("can", "dog")
    return ["manifest", *(f"adm/{s}" for s in subjects), *(f"train/{v}/{s}" for v in set(variants.values()) for s in subjects),
            *(f"eval/{row}/{s}" for row in variants for s in subjects)]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Hydra sweeps on the engines
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["train", "adm", "eval"])
def test_launcher_configs_compose_for_every_entry_point(entry):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    launchers = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in ("ray", "submitit_slurm", "submitit_local"):
            cfg = compose(entry, [f"hydra/launcher={name}", "hydra.launcher.timeout_min=30" if name != "ray" else "hydra.launcher.ray.remote.num_gpus=1"],
                          return_hydra_config=True)  # fmt: skip
            launchers[name] = cfg.hydra.launcher
    assert launchers["ray"]._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launchers["ray"].ray.remote.num_gpus == 1 and launchers["ray"].ray.init.address is None
    slurm = launchers["submitit_slurm"]
    assert slurm._target_.endswith("SlurmLauncher") and launchers["submitit_local"]._target_.endswith("LocalLauncher")
    assert (slurm.timeout_min, slurm.gpus_per_node, slurm.cpus_per_task, slurm.mem_gb, slurm.partition) == (30, 1, 8, 64, None)
    # every key the plugin's own schema has (the plugin reads them all), so ours can replace it
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from omegaconf import OmegaConf

    assert set(OmegaConf.structured(SlurmQueueConf)) == set(slurm)
    assert set(OmegaConf.structured(LocalQueueConf)) == set(launchers["submitit_local"])


@pytest.mark.slow
def test_sweeps_run_on_ray_and_submitit_each_job_in_its_own_run_dir(tmp_path, shared_data, bench):
    """`src/train.py -m subject=can,dog hydra/launcher=ray`, `src/adm.py -m ... hydra/launcher=submitit_local`,
    `src/eval.py -m dif.lambda_=0,1 hydra/launcher=ray`: one run dir (and W&B run) per job."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    common = ["model=tiny", f"paths.dreambooth_dir={shared_data / 'dreambooth'}"]
    runs = {
        "train": ["subject=can,dog", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2", "logger=wandb", "trainer.accelerator=cpu",
                  "trainer.precision=32-true", "trainer.max_steps=1", "validation.every_n_steps=0", "data.mask_variants=1"],
        "adm": ["subject=can,dog", "hydra/launcher=submitit_local", "logger=none", "vlm=offline", "adm.num_prompts=1", "adm.batch_size=1",
                "adm.num_inference_steps=1", "adm.resolution=64", "adm.device=cpu", f"paths.adm_dir={tmp_path / 'adm'}"],
        "eval": ["dif.lambda_=0,1", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2", "logger=wandb", "metrics=tiny", "device=cpu",
                 "metrics.device=cpu", "steps=1", "limit=1", "fid=false", f"manifest={bench.manifest}", "lora_dir=null", "subject=custom",
                 "subject.name=thing", "subject.class_noun=thing", f"subject.image_dir={bench.refs}"],
    }  # fmt: skip
    for entry, args in runs.items():
        sweep = tmp_path / f"sweep_{entry}"
        proc = subprocess.run([sys.executable, str(REPO / "src" / f"{entry}.py"), "-m", *common, *args, f"hydra.sweep.dir={sweep}"],
                              capture_output=True, text=True, cwd=REPO, timeout=900, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert len(jobs) == 2 and jobs[0].startswith("0_") and jobs[1].startswith("1_"), jobs
        for job in jobs:
            if entry == "train":
                assert (sweep / job / "lora" / "pytorch_lora_weights.safetensors").is_file()
                assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1
            elif entry == "eval":
                assert json.loads((sweep / job / "summary.json").read_text())["cases"] == 2
                assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1
        if entry == "adm":
            assert sorted(p.name for p in (tmp_path / "adm").iterdir()) == ["can", "dog"]
            assert len(list((sweep / ".submitit").iterdir())) >= 2  # submitit's job folders
        if entry == "eval":
            assert sorted(r["lambda"] for r in json.loads((sweep / "results.json").read_text())) == [0.0, 1.0]


def test_manifest_is_built_for_every_subject_so_later_subsets_share_it(compose, shared_data, tmp_path, capsys):
    """`bench.subjects=[can]` then `bench.subjects=[dog]` on one out_dir: the first run's manifest job
    builds every subject's cases, so the second run plans on it instead of stopping."""
    from dreammix.benchmark.executors import LocalExecutor, execute
    from dreammix.benchmark.jobs import plan_jobs
    from dreammix.benchmark.manifest import read_manifest
    from dreammix.benchmark.run import run_benchmark

    out = tmp_path / "b"
    cfg = _bench_cfg(compose, shared_data, out, "bench.subjects=[can]", "bench.experiments=[dif]")
    manifest_job = plan_jobs(cfg, ["can"], None).jobs[0]
    assert manifest_job.name == "manifest" and not any("benchmark.subjects" in o for o in manifest_job.overrides)
    assert execute([manifest_job], LocalExecutor(), retries=0, out=out, conf_dir=None, echo=lambda line: None).done == ["manifest"]
    subjects = {c.subject for c in read_manifest(out / "benchmark" / "manifest.jsonl")}
    assert len(subjects) == 30 and {"can", "dog"} <= subjects
    capsys.readouterr()
    dog = run_benchmark(_bench_cfg(compose, shared_data, out, "bench.subjects=[dog]", "bench.experiments=[dif]", "bench.dry_run=true"))
    assert dog.jobs == ["manifest", "train/tau1-1_beta0/dog", "eval/dif/dog"]
    assert "[done] manifest" in capsys.readouterr().out
    with pytest.raises(DreamMixError, match=r"subjects \['nobody'\] are not in the benchmark"):
        run_benchmark(_bench_cfg(compose, shared_data, out, "bench.subjects=[nobody]", "bench.dry_run=true"))
