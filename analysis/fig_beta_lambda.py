"""F7: scores and metrics against beta (DPO) and lambda (DPOP), as in Smaug Fig. 3.

Drawn only when the sweep varies a method's beta or lambda_ (e.g. ``smaug_beta_lambda``:
DPO beta in {0.1, 0.3, 1.0}, DPOP lambda in {5, 50, 500}). One row per (method,
hyper-parameter) that varies, one column per metric available; one line per training
bucket filter; points are means over seeds with one-std error bars; a single-seed point of the eval
average carries lm-eval's standard error instead (``leaderboard.average_stderr_by_job``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.collect import REFERENCE
from analysis.leaderboard import average_stderr_by_job
from analysis.plotting import colors, nonempty, plt, save, seed_stats

NAME = "f7_beta_lambda"
PARAMETERS = ("beta", "lambda_")
METRICS = {
    "eval/average": "eval average",
    "pairs/reward_accuracy": "held-out reward accuracy",
    "pairs/rho_chosen_mean": "held-out mean rho(chosen)",
    "probes/final/chosen_shift": "final chosen log-prob shift",
}


def varied(tables: dict[str, pd.DataFrame]) -> list[tuple[str, str]]:
    """(method, parameter) pairs whose parameter takes two or more values among successful jobs."""
    jobs = tables["jobs"]
    jobs = jobs[(jobs["status"] != "failed") & (jobs["method"] != REFERENCE)]
    out = []
    for method, group in jobs.groupby("method", sort=False):
        for parameter in PARAMETERS:
            if parameter in group and group[parameter].dropna().nunique() > 1:
                out.append((method, parameter))
    return out


def make(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    if not nonempty(tables, "results", "metric") or not nonempty(tables, "jobs", "method"):
        return []
    panels = varied(tables)
    results = tables["results"].dropna(subset=["value"])
    metrics = [m for m in METRICS if m in set(results["metric"])]
    if not panels or not metrics:
        return []
    average_se = average_stderr_by_job(tables)
    fig, axes = plt.subplots(len(panels), len(metrics), figsize=(3.8 * len(metrics), 3.0 * len(panels)), squeeze=False)
    for row, (method, parameter) in enumerate(panels):
        subset = results[(results["method"] == method) & results[parameter].notna()]
        lines = list(dict.fromkeys(subset["bucket_filter"].fillna("all")))
        palette = colors(lines)
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for line in lines:
                points = subset[(subset["metric"] == metric) & (subset["bucket_filter"].fillna("all") == line)]
                if points.empty:
                    continue
                stats = seed_stats(points, [parameter]).sort_values(parameter)
                errors = stats["std"].where(stats["count"] > 1)
                if metric == "eval/average":  # one seed: lm-eval's standard error of that job's average
                    single = points.groupby(parameter)["job"].agg(lambda jobs: average_se.get(jobs.iloc[0]) if len(jobs) == 1 else None)
                    errors = errors.fillna(stats[parameter].map(single))
                ax.errorbar(stats[parameter], stats["mean"], yerr=errors,
                            marker="o", capsize=3, color=palette[line],
                            label=f"bucket filter {line}" if len(lines) > 1 else method)
            values = subset[parameter].dropna()
            if len(values) and values.min() > 0 and values.max() / values.min() >= 10:
                ax.set_xscale("log")
            ax.set_xlabel(f"{method} {parameter.rstrip('_')}")
            ax.set_title(METRICS[metric], fontsize=9)
            if col == 0:
                ax.legend(fontsize=7)
    return save(fig, out_dir, NAME)
