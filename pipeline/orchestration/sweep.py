"""Sweep-level bookkeeping: a Hydra callback that runs after every multirun.

Jobs never raise out of a multirun (see ``pipeline.__main__``): each writes its
``run.json`` with a status. This callback reads them all, prints and writes the
summary table, regenerates the sweep's figures from artifacts, and exits
non-zero naming every failed job, so one failure neither hides nor stops the rest.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError
from pipeline.orchestration.orchestrate import RUN_RECORD

SUMMARY_COLUMNS = ["job", "method", "overrides", "status", "train_loss", "reward_accuracy", "eval_average", "eval_average_se", "error"]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def average_stderr(scores: dict[str, Any]) -> float | None:
    """lm-eval's standard error of ``scores.json``'s headline average: sqrt(sum se^2) / n over its tasks
    (scored on disjoint items); None where a task has none (e.g. a hub task without stderr)."""
    ses = []
    for task, metric in scores.get("headline", {}).items():
        values = scores.get("tasks", {}).get(task, {})
        found = [v for name, v in values.items() if "_stderr" in name and name.replace("_stderr", "", 1) == metric]
        if not found or not isinstance(found[0], (int, float)) or not math.isfinite(found[0]):
            return None
        ses.append(float(found[0]))
    return math.sqrt(sum(se * se for se in ses)) / len(ses) if ses else None


def job_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Key metrics of one job, read from its artifacts (absent stages give None)."""
    artifacts = record.get("artifacts", {})
    metrics: dict[str, Any] = {"train_loss": None, "reward_accuracy": None, "eval_average": None,
                               "eval_average_se": None}
    if "train" in artifacts:
        summary = read_json(Path(artifacts["train"]["path"]) / "summary.json")
        metrics["train_loss"] = summary.get("train/loss", summary.get("final", {}).get("train/loss"))
    if "evaluate" in artifacts:
        eval_dir = Path(artifacts["evaluate"]["path"])
        scores = read_json(eval_dir / "scores.json")
        metrics["eval_average"], metrics["eval_average_se"] = scores.get("average"), average_stderr(scores)
        metrics["reward_accuracy"] = read_json(eval_dir / "preference.json").get("overall", {}).get("reward_accuracy")
    return metrics


def summarise_sweep(sweep_dir: Path) -> pd.DataFrame:
    rows = []
    for record_path in sorted(Path(sweep_dir).glob(f"*/{RUN_RECORD}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        record = read_json(record_path)
        overrides_file = record_path.parent / ".hydra" / "overrides.yaml"
        overrides = " ".join(line.lstrip("- ").strip() for line in overrides_file.read_text().splitlines()) if overrides_file.exists() else ""
        keys = {f"{stage}_key": art["key"] for stage, art in record.get("artifacts", {}).items()}
        rows.append({"job": record_path.parent.name, "method": record.get("method"), "overrides": overrides,
                     "status": record.get("status", "unknown"), **job_metrics(record),
                     "error": record.get("error", ""), **keys})
    return pd.DataFrame(rows)


def write_summary(sweep_dir: Path, table: pd.DataFrame) -> None:
    table.to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "summary.md").write_text(table.to_markdown(index=False) if not table.empty else "no jobs\n")


def mirror_to_tracker(config: DictConfig, report_dir: Path) -> None:
    """Log the sweep's figures and tables to one sweep-level W&B run (artifacts stay the source)."""
    from pipeline.store.tracking import start_run

    job_config = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    with start_run(job_config, job_type="analyse", name=f"{config.sweep_name}-analysis") as tracker:
        if not tracker.enabled:
            return
        for image in sorted((report_dir / "figures").glob("*.png")):
            tracker.log_image(f"figures/{image.stem}", image)
        for table in sorted((report_dir / "tables").glob("*.csv")):
            tracker.log_table(f"tables/{table.stem}", pd.read_csv(table))


def check_names_or_exit(config: DictConfig) -> None:
    from pipeline.orchestration.validate import check_path_names
    try:
        check_path_names(config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


class SweepSummary(Callback):
    """Hydra callback (see conf/config.yaml `hydra.callbacks`)."""

    # Hydra creates the run / sweep folder right after these hooks: names that become paths are checked
    # here, so `sweep_name=../../x` stops with one line before anything is written outside runs/.
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_names_or_exit(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_names_or_exit(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = summarise_sweep(sweep_dir)
        if table.empty:
            print(f"[sweep] no job records under {sweep_dir}", file=sys.stderr)
            sys.exit(1)
        write_summary(sweep_dir, table)
        shown = [c for c in SUMMARY_COLUMNS if c in table.columns and c != "error"]
        print(f"\n[sweep] {sweep_dir}\n" + table[shown].to_string(index=False), flush=True)
        failed = table[table.status != "ok"]
        if "analyse" in config.get("stages", []):
            try:
                self.analyse(config, sweep_dir)
            except UserError as error:  # e.g. an unreadable artifact: the jobs' results stay, the report is missing
                print(f"[analyse] error: {error}", file=sys.stderr)
                sys.exit(1)
        if not failed.empty:
            for _, row in failed.iterrows():
                print(f"[sweep] job {row.job} ({row.overrides}) {row.status}: {row.error}", file=sys.stderr)
            sys.exit(1)

    @staticmethod
    def analyse(config: DictConfig, sweep_dir: Path) -> None:
        from analysis.report import generate  # heavy (matplotlib); only when asked

        report = generate(sweep_dir)
        print(f"[analyse] report {report}", flush=True)
        mirror_to_tracker(config, report.parent)
