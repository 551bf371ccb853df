"""Each method against the base model on the SAME test items: the paired difference of lm-eval's per-item scores.

The leaderboard's cells carry lm-eval's standard error of each score alone; two models scored on one set of
items are far more alike than that suggests (most items both get right or both get wrong), so the question "did
training change this benchmark?" is answered by the per-item differences d_i = score_i(method) - score_i(base).
This is how the local suite's reasoning task (``local_gen``, GSM8K-shaped) shows whether a loss costs
reasoning ability, the BNF paper's claim. Two levels (statistics in analysis/inference.py):

- item level (one run): per-item scores are 0/1, so only the items that changed carry information: exact
  McNemar (binomial test of "up" among up + down at 1/2; the exact sign test when seeds are averaged per item)
  and an exact interval for the difference (Clopper-Pearson on the changed items), never a t-interval on
  sparse 0/1 differences; Holm-adjusted across every row of the table;
- run level (what the verdict uses; a claim about a training method is over training runs): each seed's
  score difference, Student-t over seeds, Holm across the table, and the minimum detectable effect.
  "No loss" is stated only as non-inferiority at ``Settings.margin_score``.

Each trained job is compared with the base-model evaluation its evaluate manifest names (``key/baseline`` in
the jobs table). Only the headline metric of each task is compared, on the items both evaluations scored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import inference
from analysis.collect import REFERENCE
from analysis.inference import Settings
from analysis.leaderboard import headline_metrics
from analysis.plotting import nonempty, ordered_labels

NAME = "paired_to_base"
COLUMNS = ["label", "task", "metric", "items", "seeds", "base", "score", "difference", "se", "up", "down",
           "item_p", "item_p_holm", "exact_low", "exact_high", "item_mde", "run_low", "run_high", "run_p",
           "run_p_holm", "run_mde", "base_key", "artifact_keys"]


def paired_table(tables: dict[str, pd.DataFrame], settings: Settings = Settings()) -> pd.DataFrame:
    """One row per trained label x task: base and method score, item-level and run-level tests."""
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
                per_run = [float((job_items.groupby("doc_id")["value"].mean().reindex(common) - base[common]).mean())
                           for _, job_items in runs.groupby("job")]
                up, down = int((differences > 0).sum()), int((differences < 0).sum())
                binary = bool(np.isin(differences, (-1.0, 0.0, 1.0)).all())
                low, high = inference.discordant_interval(up, down, len(common)) if binary else (np.nan, np.nan)
                _, run_low, run_high = inference.t_interval(per_run)
                se = float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else np.nan
                rows.append({"label": label, "task": task, "metric": metric, "items": len(common),
                             "seeds": runs["job"].nunique(), "base": float(base[common].mean()),
                             "score": float(method[common].mean()), "difference": float(differences.mean()), "se": se,
                             "up": up, "down": down, "item_p": inference.sign_test(up, down),
                             "exact_low": low, "exact_high": high, "item_mde": inference.sample_mde(differences),
                             "run_low": run_low, "run_high": run_high, "run_p": inference.t_test(per_run),
                             "run_mde": inference.sample_mde(per_run), "base_key": base_key,
                             "artifact_keys": " ".join(sorted(set(runs["artifact_key"].astype(str))))})
    table = pd.DataFrame(rows, columns=COLUMNS)
    if len(table):  # Holm across every test this table makes, per level
        table["item_p_holm"] = inference.holm(table["item_p"].to_numpy())
        table["run_p_holm"] = inference.holm(table["run_p"].to_numpy())
    return table


def item_words(r: pd.Series, settings: Settings) -> str:
    """The item-level reading of one run: a change only when Holm-adjusted exact McNemar rejects."""
    if r["item_p_holm"] < inference.ALPHA:
        return "changed the items (" + ("up" if r["up"] > r["down"] else "down") + ")"
    shown = not np.isnan(r["exact_low"]) and r["exact_low"] > -settings.margin_score
    return (f"no change shown, {'non-inferior' if shown else 'non-inferiority not shown'} at -{settings.margin_score:g}; "
            f"smallest difference these items detect (power 0.8, alpha 0.05) {r['item_mde']:.3f}")


def verdict(table: pd.DataFrame, settings: Settings = Settings()) -> list[str]:
    """One sentence per row: run-level words when there are >= 2 seeds, else the item level of the one run."""
    sentences = []
    for _, r in table.iterrows():
        where = f"{r['label']} on {r['task']} ({r['difference']:+.3f}, {int(r['up'])} items up / {int(r['down'])} down)"
        if r["seeds"] >= 2:
            words = inference.describe(r["run_low"], r["run_high"], r["run_p_holm"], settings.margin_score, r["run_mde"])
            sentences.append(f"{where}: {words} (over {int(r['seeds'])} runs, Holm-adjusted).")
        else:
            sentences.append(f"{where}: one run, so no verdict about the method; for this run the items show "
                             f"{item_words(r, settings)} (exact McNemar p {r['item_p']:.3g}, Holm {r['item_p_holm']:.3g}).")
    return sentences


def markdown_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["method", "task (metric)", "items", "base", "method score", "difference [exact 95%]",
              "items up / down", "McNemar p (Holm)", "[95% over runs] (Holm p)", "MDE runs / items", "seeds"]
    body = []
    for _, r in table.iterrows():
        difference = f"{r['difference']:+.3f}"
        if not np.isnan(r["exact_low"]):
            difference += f" [{r['exact_low']:+.3f}, {r['exact_high']:+.3f}]"
        runs = "" if np.isnan(r["run_low"]) else f"[{r['run_low']:+.3f}, {r['run_high']:+.3f}] ({r['run_p_holm']:.3g})"
        mde = ("–" if np.isnan(r["run_mde"]) else f"{r['run_mde']:.3f}") + f" / {r['item_mde']:.3f}"
        body.append([str(r["label"]), f"{r['task']} ({r['metric']})", str(int(r["items"])), f"{r['base']:.3f}",
                     f"{r['score']:.3f}", difference, f"{int(r['up'])} / {int(r['down'])}",
                     f"{r['item_p']:.3g} ({r['item_p_holm']:.3g})", runs, mde, str(int(r["seeds"]))])
    return header, body
