"""Each method against the base model on the SAME test items: the paired difference of lm-eval's per-item scores.

The leaderboard's cells carry lm-eval's standard error of each score alone; two models scored on one set of
items are far more alike than that suggests (most items both get right or both get wrong), so the question "did
training change this benchmark?" is answered by the per-item differences d_i = score_i(method) - score_i(base):
their mean (the score difference itself), a 95% Student-t interval over items, and how many items went up and
down. This is how the local suite's reasoning task (``local_gen``, GSM8K-shaped) shows whether a loss costs
reasoning ability, the BNF paper's claim.

Each trained job is compared with the base-model evaluation its evaluate manifest names (``key/baseline`` in
the jobs table); jobs that share a label (seeds) are averaged per item first. Only the headline metric of each
task is compared, on the items both evaluations scored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.collect import REFERENCE
from analysis.leaderboard import headline_metrics
from analysis.plotting import nonempty, ordered_labels
from analysis.study import interval

NAME = "paired_to_base"
COLUMNS = ["label", "task", "metric", "items", "seeds", "base", "score", "difference", "se", "ci_low", "ci_high",
           "up", "down", "base_key", "artifact_keys"]


def paired_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per trained label x task: base and method score, the paired difference with its 95% interval."""
    jobs = tables.get("jobs", pd.DataFrame())
    if not nonempty(tables, "items", "doc_id") or "key/baseline" not in jobs:
        return pd.DataFrame(columns=COLUMNS)
    items = tables["items"]
    tasks = {task: metric.split("/", 2)[2].removesuffix(",none") for task, metric in headline_metrics(tables).items()}
    bases = jobs[jobs["method"] == REFERENCE].set_index("key/evaluate")["job"]
    trained = jobs[(jobs["method"] != REFERENCE) & (jobs["status"] == "ok") & jobs["key/baseline"].notna()]
    rows = []
    for label in ordered_labels(tables, trained["label"]):
        for base_key, group in trained[trained["label"] == label].groupby("key/baseline", sort=False):
            if base_key not in bases.index:
                continue
            for task, metric in tasks.items():
                chosen = items[(items["task"] == task) & (items["metric"] == metric)]
                base = chosen[chosen["job"] == bases[base_key]].groupby("doc_id")["value"].mean()
                runs = chosen[chosen["job"].isin(group["job"])]
                method = runs.groupby("doc_id")["value"].mean()  # seeds averaged per item
                common = base.index.intersection(method.index)
                if common.empty:
                    continue
                differences = (method[common] - base[common]).to_numpy()
                mean, low, high = interval(differences)
                se = float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else np.nan
                rows.append({"label": label, "task": task, "metric": metric, "items": len(common),
                             "seeds": runs["job"].nunique(), "base": float(base[common].mean()),
                             "score": float(method[common].mean()), "difference": mean, "se": se,
                             "ci_low": low, "ci_high": high, "up": int((differences > 0).sum()),
                             "down": int((differences < 0).sum()), "base_key": base_key,
                             "artifact_keys": " ".join(sorted(set(runs["artifact_key"].astype(str))))})
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["method", "task (metric)", "items", "base", "method score", "difference [95% interval] (se)",
              "items up / down", "seeds"]
    body = []
    for _, r in table.iterrows():
        difference = f"{r['difference']:+.3f}"
        if not np.isnan(r["ci_low"]):
            difference += f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] (se {r['se']:.3f})"
        body.append([str(r["label"]), f"{r['task']} ({r['metric']})", str(int(r["items"])), f"{r['base']:.3f}",
                     f"{r['score']:.3f}", difference, f"{int(r['up'])} / {int(r['down'])}", str(int(r["seeds"]))])
    return header, body
