"""F3: mean per-token log-prob of chosen tokens after the first differing token (Smaug Fig. 4).

Grouped bars per edit-distance bucket: the reference model, then each method (label),
from the held-out pairs of preference_pairs.parquet. Smaug reports on MetaMath:
reference -0.37, DPOP -0.26, DPO -1.82. Each job's value is the mean over its pairs;
with several seeds the bar is the mean over seeds and the error bar one std. Pairs with fewer than
``Settings.after_diff_min_tokens`` chosen tokens after the first difference are left out (as in S1), where
the artifacts record that count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import REFERENCE
from analysis.inference import Settings
from analysis.plotting import REFERENCE_COLOR, buckets_in_order, colors, nonempty, ordered_labels, plt, save, seed_stats

NAME = "f3_after_diff_logp"
POLICY, REF = "chosen_after_diff_mean_logp", "ref_chosen_after_diff_mean_logp"


def after_diff_table(tables: dict[str, pd.DataFrame], settings: Settings = Settings()) -> pd.DataFrame:
    """Columns label, bucket, mean, std, count (label "reference" = the reference model)."""
    pairs = tables["pairs"].assign(bucket=lambda d: d["bucket"].astype(str))
    if "chosen_after_diff_tokens" in pairs:  # too little text after the edit to measure: no value
        short = pairs["chosen_after_diff_tokens"].astype(float) < settings.after_diff_min_tokens
        pairs = pairs.assign(**{column: pairs[column].where(~short) for column in (POLICY, REF) if column in pairs})
    trained = pairs[pairs["method"] != REFERENCE]
    per_job = trained.groupby(["job", "label", "bucket"], sort=False)[POLICY].mean().reset_index(name="value")
    rows = [seed_stats(per_job, ["label", "bucket"])]
    if REF in pairs and pairs[REF].notna().any():  # the reference's value per pair, counted once per pair
        ref = pairs[pairs[REF].notna()]
        ref = ref.drop_duplicates(["bucket", "pair_id"]) if "pair_id" in ref else ref
        ref_stats = ref.groupby("bucket")[REF].mean().reset_index(name="mean")
    else:
        base = pairs[pairs["method"] == REFERENCE]
        ref_stats = base.groupby("bucket")[POLICY].mean().reset_index(name="mean")
    ref_stats = ref_stats.assign(label=REFERENCE, std=0.0, count=1)
    rows.insert(0, ref_stats[["label", "bucket", "mean", "std", "count"]])
    return pd.concat(rows, ignore_index=True)


def make(tables: dict[str, pd.DataFrame], out_dir: Path, settings: Settings = Settings()) -> list[Path]:
    if not nonempty(tables, "pairs", "bucket", POLICY):
        return []
    table = after_diff_table(tables, settings).dropna(subset=["mean"])
    if table.empty:
        return []
    buckets = buckets_in_order(table["bucket"])
    labels = [REFERENCE] + [label for label in ordered_labels(tables, table["label"]) if label != REFERENCE]
    labels = [label for label in labels if label in set(table["label"])]
    palette = colors(labels)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(buckets) * len(labels) * 0.6 + 2), 3.8))
    x = np.arange(len(buckets))
    for i, label in enumerate(labels):
        rows = table[table["label"] == label].set_index("bucket").reindex(buckets)
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, rows["mean"], width, yerr=rows["std"].where(rows["count"] > 1),
               color=REFERENCE_COLOR if label == REFERENCE else palette[label], label=label, capsize=3)
    ax.set_xticks(x, [f"bucket {b}" for b in buckets])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("mean log p of chosen tokens\nafter first difference")
    ax.legend(fontsize=7)
    return save(fig, out_dir, NAME)
