"""F6: the leaderboard per method (tasks plus average, reference row first, like Smaug's table).

Each cell is the task's headline metric (``scores.json`` "headline") of the evaluate
artifact; with several seeds per setting, "mean ± std" over seeds. Written as
Markdown and LaTeX tables and a grouped bar chart. ``preference_table`` gives the
held-out preference metrics per method in the same shape, for the report. Each row also states what
was compared: the loss and every hyper-parameter of the method as the run record resolved it
(``loss``, ``settings`` columns), not only the ones that vary in the sweep.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import REFERENCE, format_value
from analysis.plotting import colors, mean_pm_std, nonempty, ordered_labels, plt, save, seed_stats

NAME = "f6_leaderboard"
# Columns before the scores: the row's label, the loss and the method's hyper-parameters.
TEXT_COLUMNS = ("method", "loss", "settings")
# Method-file keys that are not hyper-parameters (the label, and flags fixed per loss).
NOT_SETTINGS = ("name", "loss", "needs_reference", "needs_vocab_term", "accepts_unpaired")
PREFERENCE_METRICS = {
    "pairs/reward_accuracy": "reward accuracy",
    "pairs/rho_chosen_mean": "mean rho(chosen)",
    "pairs/rho_rejected_mean": "mean rho(rejected)",
    "pairs/chosen_after_diff_mean_logp": "chosen logp after diff",
}


def headline_metrics(tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """task -> results metric name of its headline score, in the order the eval stage lists them."""
    results = tables["results"]
    known = set(results["metric"].dropna())
    out: dict[str, str] = {}
    headlines = tables.get("headlines", pd.DataFrame())
    for row in headlines.itertuples() if len(headlines) else []:
        for candidate in (f"eval/{row.task}/{row.metric}", f"eval/{row.task}/{row.metric},none"):
            if candidate in known and row.task not in out:
                out[row.task] = candidate
    if not out:  # no headline recorded: the first non-stderr metric of each task
        for metric in sorted(known):
            parts = metric.split("/")
            if len(parts) == 3 and parts[0] == "eval" and "stderr" not in parts[2]:
                out.setdefault(parts[1], metric)
    return out


def _stats_table(tables: dict[str, pd.DataFrame], columns: dict[str, str]) -> pd.DataFrame:
    """Long table label, column, mean, std, count for the given results metrics (name -> column title)."""
    results = tables["results"]
    rows = results[results["metric"].isin(columns.keys())].dropna(subset=["value"])
    if rows.empty:
        return pd.DataFrame(columns=["label", "column", "mean", "std", "count"])
    stats = seed_stats(rows, ["label", "metric"])
    return stats.assign(column=stats["metric"].map(columns)).drop(columns="metric")


def stderr_of(metric: str, values: dict[str, float]) -> float | None:
    """lm-eval's standard error of a score among a job's metrics: the metric with "_stderr" after the score's
    name (eval/t/acc -> eval/t/acc_stderr, exact_match_strict-match -> exact_match_stderr_strict-match)."""
    for name, value in values.items():
        if "_stderr" in name and name.replace("_stderr", "", 1) == metric:
            return value
    return None


def job_stderrs(job: pd.DataFrame, headlines: dict[str, str]) -> dict[str, float]:
    """column (task, "average") -> lm-eval's standard error of one job's score. The average's is
    sqrt(sum se^2) / n over its tasks (tasks scored on disjoint items); absent where a task's is."""
    values = dict(zip(job["metric"], job["value"]))
    per_task = {task: stderr_of(metric, values) for task, metric in headlines.items() if metric in values}
    out = {task: float(se) for task, se in per_task.items() if se is not None and np.isfinite(se)}
    if per_task and len(out) == len(per_task):
        out["average"] = float(np.sqrt(np.sum(np.square(list(out.values())))) / len(out))
    return out


def average_stderr_by_job(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """job -> lm-eval's standard error of its ``eval/average`` (for the figures' single-seed error bars)."""
    if not nonempty(tables, "results", "metric"):
        return {}
    headlines = headline_metrics(tables)
    results = tables["results"].dropna(subset=["value"])
    ses = {job: job_stderrs(group, headlines).get("average") for job, group in results.groupby("job", sort=False)}
    return {job: se for job, se in ses.items() if se is not None}


def lm_eval_stderrs(tables: dict[str, pd.DataFrame], headlines: dict[str, str]) -> pd.DataFrame:
    """label, column, se: lm-eval's standard error of each single-job cell (several seeds show the seeds' std
    instead); see ``job_stderrs``."""
    results = tables["results"]
    rows = []
    for label, group in results.groupby("label", sort=False):
        scored = group[group["metric"].isin(headlines.values())].dropna(subset=["value"])["job"].unique()
        if len(scored) != 1:  # several seeds (or nothing scored)
            continue
        for column, se in job_stderrs(group[group["job"] == scored[0]], headlines).items():
            rows.append({"label": label, "column": column, "se": se})
    return pd.DataFrame(rows, columns=["label", "column", "se"])


def leaderboard_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table: label, column (task or "average"), mean, std, count, se (lm-eval's, single-job cells)."""
    if not nonempty(tables, "results", "metric"):
        return pd.DataFrame()
    headlines = headline_metrics(tables)
    columns = {metric: task for task, metric in headlines.items()}
    columns["eval/average"] = "average"
    long = _stats_table(tables, columns)
    ses = lm_eval_stderrs(tables, headlines)
    long = long.merge(ses, on=["label", "column"], how="left")
    long.loc[long["count"] > 1, "se"] = np.nan  # several seeds: the seeds' spread is shown
    return long


def preference_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    if not nonempty(tables, "results", "metric"):
        return pd.DataFrame()
    return _stats_table(tables, PREFERENCE_METRICS)


def method_settings(tables: dict[str, pd.DataFrame]) -> dict[str, tuple[str, str]]:
    """label -> (loss, "beta=0.3, lambda_=50"): every hyper-parameter of the jobs' method config.

    Jobs pooled under one label differ only by seeds, so they share one setting; should they not, every
    distinct one is listed (joined by " / ")."""
    out: dict[str, tuple[str, str]] = {}
    jobs = tables.get("jobs", pd.DataFrame())
    for label, group in jobs.groupby("label", sort=False) if "config" in jobs else []:
        found = []
        for config in group["config"].dropna():
            method = json.loads(config).get("method") or {}
            settings = ", ".join(f"{key}={format_value(value)}" for key, value in method.items()
                                 if key not in NOT_SETTINGS and value is not None)
            found.append((str(method.get("loss", method.get("name", "?"))), settings or "none"))
        found = list(dict.fromkeys(found))
        if found:
            out[label] = (" / ".join(dict.fromkeys(f[0] for f in found)), " / ".join(dict.fromkeys(f[1] for f in found)))
    return out


def _titles(long: pd.DataFrame) -> list[str]:
    titles = list(dict.fromkeys(long["column"]))
    if "average" in titles:  # average last, as in Smaug's table
        titles = [t for t in titles if t != "average"] + ["average"]
    return titles


def _wide(tables: dict[str, pd.DataFrame], long: pd.DataFrame, digits: int) -> tuple[list[str], list[list[str]]]:
    titles = _titles(long)
    labels = ordered_labels(tables, long["label"])
    labels = sorted(labels, key=lambda label: not label.startswith(REFERENCE))
    settings = method_settings(tables)
    body = []
    for label in labels:
        base = label.startswith(REFERENCE)
        cells = [label, *settings.get(label, ("–", "base model, untrained" if base else "–"))]
        for title in titles:
            match = long[(long["label"] == label) & (long["column"] == title)]
            cells.append(cell(match.iloc[0], digits) if len(match) else "–")
        body.append(cells)
    return list(TEXT_COLUMNS) + titles, body


def cell(row: pd.Series, digits: int) -> str:
    """"mean ± std" over seeds, or "mean (se x)" with lm-eval's standard error for one job."""
    text = mean_pm_std(row["mean"], row["std"], row["count"], digits=digits)
    se = row.get("se", np.nan)
    return f"{text} (se {se:.{digits}f})" if row["count"] == 1 and pd.notna(se) else text


def markdown(header: list[str], body: list[list[str]], numeric: bool = True) -> str:
    """A Markdown table; ``numeric`` right-aligns every column after the first but the text columns."""
    align = ["---"] + ["---:" if numeric and title not in TEXT_COLUMNS else "---" for title in header[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def latex(header: list[str], body: list[list[str]], caption: str) -> str:
    def esc(text: str) -> str:
        text = text.replace("\\", r"\textbackslash{}")
        for char in "_&%#$":
            text = text.replace(char, "\\" + char)
        return text.replace("±", r"$\pm$").replace("–", "--")
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "".join("l" if h in TEXT_COLUMNS else "r" for h in header) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def report_tables(tables: dict[str, pd.DataFrame]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """(header, rows) of the leaderboard and the preference table, for the report; absent ones left out."""
    out = {}
    for name, long in (("leaderboard", leaderboard_table(tables)), ("preference", preference_table(tables))):
        if len(long):
            out[name] = _wide(tables, long, 4)
    return out


def _bar_chart(tables: dict[str, pd.DataFrame], long: pd.DataFrame, out_dir: Path) -> list[Path]:
    titles = _titles(long)
    labels = sorted(ordered_labels(tables, long["label"]), key=lambda label: not label.startswith(REFERENCE))
    palette = colors(labels)
    width = 0.8 / len(labels)
    x = np.arange(len(titles))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(titles) * len(labels) + 2), 3.8))
    for i, label in enumerate(labels):
        rows = long[long["label"] == label].set_index("column").reindex(titles)
        errors = rows["std"].where(rows["count"] > 1, rows["se"])  # seeds' std, or lm-eval's stderr for one job
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, rows["mean"], width,
               yerr=errors, color=palette[label], label=label, capsize=3)
    ax.set_xticks(x, titles, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    return save(fig, out_dir, NAME)


def make(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    long = leaderboard_table(tables)
    if long.empty:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, body = _wide(tables, long, 4)
    md, tex = out_dir / f"{NAME}.md", out_dir / f"{NAME}.tex"
    md.write_text(markdown(header, body))
    tex.write_text(latex(header, body, "Evaluation scores per method (headline metric per task; "
                                       "mean ± std over seeds where there are several, else lm-eval's standard error as (se x))."))
    return _bar_chart(tables, long, out_dir) + [md, tex]
