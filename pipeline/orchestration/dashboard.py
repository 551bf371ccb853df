"""The sweep's W&B workspace as code: ``python -m pipeline.orchestration.dashboard <sweep_dir> [--publish]``.

Sections: training curves under TRL's names, the chosen/rejected log-prob shift per edit-distance
bucket (training batches and held-out probe pairs), and evaluation scores; runs filtered to the
sweep's W&B group and grouped by method, beta, lambda_ and seed (the flat config fields every run
carries, see pipeline/store/tracking.py).

Without ``--publish`` (or offline) the workspace definition is written to
``<sweep_dir>/report/dashboard.json`` and the command that publishes it is printed; with
``--publish`` and ``WANDB_MODE=online`` (after ``wandb login``) it is saved to W&B. Buckets, tasks and
headline metrics come from the sweep's artifacts, so the panels name what the runs logged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

TRAIN_METRICS = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                 "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/lr", "train/grad_norm")
PROBE_METRICS = ("probe/chosen_shift", "probe/rejected_shift", "probe/margin")
PREFERENCE_METRICS = ("reward_accuracy", "margin", "rho_chosen", "rho_rejected", "chosen_after_diff_mean_logp")
GROUP_BY = ("method", "beta", "lambda_", "seed")


def sweep_facts(sweep_dir: Path) -> dict[str, Any]:
    """Sweep name, buckets and eval headlines, read from the run records and their artifacts."""
    records = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob("**/run.json"))]
    if not records:
        raise UserError(f"{sweep_dir}: no run.json below it; expected a sweep or run folder of `python -m pipeline`")
    facts: dict[str, Any] = {"sweep_name": records[0].get("sweep_name"), "buckets": set(), "headlines": {},
                             "project": None, "entity": None}
    for record in records:
        logger = (record.get("config") or {}).get("logger") or {}
        facts["project"] = facts["project"] or logger.get("project")
        facts["entity"] = facts["entity"] or logger.get("entity")
        artifacts = record.get("artifacts", {})
        if "pair" in artifacts:
            stats = Path(artifacts["pair"]["path"]) / "stats.json"
            if stats.is_file():
                facts["buckets"] |= set(json.loads(stats.read_text()).get("pairs_per_bucket", {}))
        if "evaluate" in artifacts:
            scores = Path(artifacts["evaluate"]["path"]) / "scores.json"
            if scores.is_file():
                facts["headlines"].update(json.loads(scores.read_text()).get("headline") or {})
    facts["buckets"] = sorted(facts["buckets"])
    return facts


def panel_metrics(facts: dict[str, Any]) -> dict[str, list[list[str]]]:
    """Section -> panels, each the list of metric names it plots (what the test checks against the logs)."""
    shift = [[f"train/logps_shift/chosen/{b}", f"train/logps_shift/rejected/{b}"] for b in facts["buckets"]]
    evaluation = [[f"eval/{task}/{metric}" for task, metric in sorted(facts["headlines"].items())]]
    if facts["headlines"]:
        evaluation.append(["eval/average"])
    evaluation += [[f"eval/preference/{m}"] for m in PREFERENCE_METRICS]
    return {
        "Training (TRL metric names)": [[m] for m in TRAIN_METRICS],
        "Log-prob shift per edit-distance bucket": shift + [[m] for m in PROBE_METRICS],
        "Evaluation": [panel for panel in evaluation if panel],
    }


def build_workspace(facts: dict[str, Any], entity: str | None, project: str):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = []
    for title, panels in panel_metrics(facts).items():
        plots = [wr.BarPlot(metrics=names, title=", ".join(names)) if title == "Evaluation"
                 else wr.LinePlot(x="Step", y=names, title=", ".join(names)) for names in panels]
        sections.append(ws.Section(name=title, panels=plots, is_open=True))
    return ws.Workspace(
        name=f"prefopt: {facts['sweep_name']}", entity=entity or "", project=project, sections=sections,
        runset_settings=ws.RunsetSettings(filters=ws.And(ws.Metric("Group") == facts["sweep_name"]),
                                          groupby=[ws.Config(key) for key in GROUP_BY]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.orchestration.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep folder runs/<sweep>/<time> (or a single run's folder)")
    parser.add_argument("--publish", action="store_true", help="save the workspace to W&B (needs WANDB_MODE=online)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    facts = sweep_facts(sweep_dir)
    project = facts["project"] or "prefopt"
    workspace = build_workspace(facts, facts["entity"], project)
    online = os.environ.get("WANDB_MODE", "offline") == "online"
    if args.publish and online:
        workspace.save()
        print(f"[dashboard] published: {workspace.url}")
        return 0
    out = sweep_dir / "report" / "dashboard.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(workspace._to_model().model_dump_json(indent=2))
    print(f"[dashboard] workspace definition: {out}")
    print(f"[dashboard] publish it with: WANDB_MODE=online make dashboard SWEEP_DIR={sweep_dir}  (after `wandb login`)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
