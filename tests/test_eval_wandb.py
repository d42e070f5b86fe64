"""The eval W&B run is there while the job works: opened before the model loads, progress per
generated image, running means per scoring batch, then the table and the final means."""

from __future__ import annotations

import numpy as np
import pytest

from dreammix.evaluate import evaluate
from test_eval import StubPipe, StubSuite, bench, eval_cfg  # noqa: F401 - bench is a fixture
from wandb_files import offline_runs


@pytest.mark.slow  # W&B start-up: ~20 s on a busy 2-core machine
def test_eval_run_opens_before_generation_and_logs_progress_and_partial_scores(compose, tmp_path, bench):  # noqa: F811
    import wandb

    cfg = eval_cfg(compose, tmp_path, bench, "run", "logger=wandb", "fid=false", "score_batch_size=1")
    opened_at_load = []

    def factory(_cfg):
        opened_at_load.append(wandb.run is not None)
        return StubPipe()

    result = evaluate(cfg, pipe_factory=factory, metric_suite=StubSuite())
    assert opened_at_load == [True]
    assert wandb.run is None  # closed at the end
    (run,) = offline_runs(tmp_path / "run" / "wandb")
    assert run.job_type == "eval" and run.group == "eval-dif_tas_adm"

    generated = [row["eval/generated"] for row in run.history if "eval/generated" in row]
    assert generated == [1, 2, 3, 4, 5, 6]  # 3 backgrounds x 2 tasks of subject "thing"
    assert [row["eval/generate_fraction"] for row in run.history if "eval/generated" in row] == pytest.approx(
        [k / 6 for k in range(1, 7)])
    partial = [row for row in run.history if "eval/scored" in row]
    assert [row["eval/scored"] for row in partial] == [1, 2, 3, 4, 5, 6]
    records = result.records  # manifest order = scoring order
    for k, row in enumerate(partial, start=1):
        for task in ("identity", "attribute"):
            done = [r["clip_i"] for r in records[:k] if r["task"] == task]
            if done:
                assert row[f"partial/{task}/clip_i"] == pytest.approx(np.mean(done))
                assert row[f"partial/{task}/n"] == len(done)
            else:
                assert f"partial/{task}/clip_i" not in row
    # the progress rows come before the final table; the summary holds the final means
    steps = [i for i, row in enumerate(run.history) if any(k.startswith("eval/cases") for k in row)]
    assert len(steps) == 1 and steps[0] == len(run.history) - 1
    assert run.summary["attribute/clip_i"] == pytest.approx(result.summary["tasks"]["attribute"]["mean"]["clip_i"])
