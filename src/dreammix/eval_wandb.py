"""The W&B run of one evaluation job (``src/eval.py``), watchable while it works.

The run opens before any model loads, so the dashboard shows the job from its first minute:
``eval/generated`` (cases done, with ``eval/generate_fraction``) as each image is written,
``eval/scored`` and the running means of the scores so far per task (``partial/<task>/<metric>``)
as each scoring batch finishes, then at the end the table of cases (thumbnails of the result and
of the inpainted crop, prompt, TAS words, scores) and the final means and FID as summary values.
A no-op when the config has no W&B logger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dreammix.tracking import wandb_enabled, wandb_init_kwargs


class EvalTracker:
    """Progress and scores of one evaluation job to W&B (see the module docstring)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run: Any = None):
        self.cfg, self.run_dir, self.run = cfg, Path(run_dir), run
        self._step = 0

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path) -> "EvalTracker":
        if not wandb_enabled(cfg):
            return cls(cfg, run_dir)
        import wandb

        run = wandb.init(**wandb_init_kwargs(cfg, f"eval-{cfg.run_name}-{Path(run_dir).name}", run_dir, "eval"))
        return cls(cfg, run_dir, run)

    def _log(self, values: Mapping[str, Any]) -> None:
        self._step += 1
        self.run.log(dict(values), step=self._step)

    def generated(self, done: int, total: int, case_id: str) -> None:
        """One image written (``done`` of the ``total`` pending this process)."""
        if self.run is not None:
            self._log({"eval/generated": done, "eval/generate_total": total, "eval/generate_fraction": done / max(total, 1)})

    def scored(self, done: int, total: int, partial: Mapping[str, Any]) -> None:
        """A scoring batch finished: ``done`` of ``total`` pending scored; ``partial`` is
        ``evaluate.summarize`` of every record of this job so far."""
        if self.run is None:
            return
        values: dict[str, Any] = {"eval/scored": done, "eval/score_total": total}
        for task, entry in partial.items():
            values[f"partial/{task}/n"] = entry["n"]
            for key, value in entry["mean"].items():
                values[f"partial/{task}/{key}"] = value
        self._log(values)

    def finish(self, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], score_keys: Sequence[str]) -> None:
        """The table of cases and the final means; closes the run (one per Hydra job)."""
        if self.run is None:
            return
        import wandb

        from dreammix.data.images import load_image
        from dreammix.metrics.common import crop_region

        cfg, run = self.cfg, self.run
        try:
            size = int(cfg.get("thumbnail_size", 256))
            table = wandb.Table(columns=["case_id", "subject", "task", "prompt", "eliminate", "result", "crop", *score_keys])
            for record in list(records)[: int(cfg.get("wandb_rows", 200))]:
                image = load_image(self.run_dir / record["image"])
                crop = crop_region(image, record["box"], float(cfg.metrics.get("crop_scale", 1.0)))
                image.thumbnail((size, size))
                crop.thumbnail((size, size))
                table.add_data(
                    record["case_id"], record["subject"], record["task"], record["prompt"],
                    ", ".join(record.get("eliminate", [])), wandb.Image(image), wandb.Image(crop),
                    *[record[k] for k in score_keys],
                )
            self._log({"eval/cases": table})
            for task, entry in summary.get("tasks", {}).items():
                for key, value in entry["mean"].items():
                    run.summary[f"{task}/{key}"] = value
                run.summary[f"{task}/n"] = entry["n"]
            for task, value in (summary.get("fid") or {}).items():
                if value is not None:
                    run.summary[f"{task}/fid"] = value
        finally:
            self.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
