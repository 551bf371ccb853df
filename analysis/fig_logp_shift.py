"""F2: chosen and rejected log-prob shift from the reference over training steps (Smaug's failure mode).

One panel per edit-distance bucket; one colour per method (label); solid = chosen,
dashed = rejected. Each job's curve is the mean over its probe pairs of that bucket
(trajectories.jsonl, step 0 = before training); with several seeds the line is the
mean over seeds and the band one std. Without trajectories, the per-step bucket means
logged in metrics.jsonl (``train/logps_shift/<side>/<bucket>``) are used instead.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.plotting import buckets_in_order, colors, nonempty, ordered_labels, plt, save, seed_stats

NAME = "f2_logp_shift"
SIDES = (("chosen", "-"), ("rejected", "--"))


def shift_curves(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per job, step, bucket and side: mean log-prob shift (columns job, label, step, bucket, side, value)."""
    if nonempty(tables, "probes", "step", "bucket", "chosen_shift", "rejected_shift"):
        probes = tables["probes"]
        per_job = probes.groupby(["job", "label", "step", "bucket"], sort=False)[["chosen_shift", "rejected_shift"]].mean()
        per_job = per_job.reset_index().melt(id_vars=["job", "label", "step", "bucket"],
                                             value_vars=["chosen_shift", "rejected_shift"], var_name="side")
        per_job["side"] = per_job["side"].str.replace("_shift", "", regex=False)
        return per_job
    if nonempty(tables, "steps", "metric"):
        steps = tables["steps"]
        pattern = r"^train/logps_shift/(chosen|rejected)/(.+)$"
        parts = steps["metric"].str.extract(pattern)
        rows = steps[parts[0].notna()].assign(side=parts[0], bucket=parts[1])
        if len(rows):
            return rows[["job", "label", "step", "bucket", "side", "value"]]
    return pd.DataFrame()


def make(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    curves = shift_curves(tables)
    if curves.empty:
        return []
    buckets = buckets_in_order(curves["bucket"].astype(str))
    curves = curves.assign(bucket=curves["bucket"].astype(str))
    labels = ordered_labels(tables, curves["label"])
    palette = colors(labels)
    fig, axes = plt.subplots(1, len(buckets), figsize=(4.6 * len(buckets), 3.6), squeeze=False, sharey=True)
    for ax, bucket in zip(axes[0], buckets):
        for label in labels:
            for side, style in SIDES:
                subset = curves[(curves["bucket"] == bucket) & (curves["label"] == label) & (curves["side"] == side)]
                if subset.empty:
                    continue
                stats = seed_stats(subset, ["step"]).sort_values("step")
                ax.plot(stats["step"], stats["mean"], style, color=palette[label], label=f"{label} {side}")
                if (stats["count"] > 1).any():
                    ax.fill_between(stats["step"], stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                                    color=palette[label], alpha=0.15)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"bucket {bucket}")
        ax.set_xlabel("training step")
    axes[0][0].set_ylabel("log p(y) − log p_ref(y)")
    axes[0][-1].legend(fontsize=7, loc="best")
    return save(fig, out_dir, NAME)
