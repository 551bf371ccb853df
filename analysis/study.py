"""S1: the Smaug study. On pairs of one edit-distance bucket, does DPO lower the chosen likelihood while
DPOP keeps it at or above the reference?

Applies to a sweep that trains DPO and DPOP on one bucket at a time (``pairing.bucket_filter``), ideally
over several seeds (``sweeps/reproduce_smaug.yaml``). Each job is measured on the held-out pairs of the
bucket it trained on: the train stage's probe set is those pairs when ``pairing.bucket_filter`` is set,
and its ``trajectories.jsonl`` has them at every probe step; the table reads the last step.

Statistics. The unit is the held-out pair: each pair's value is averaged over the seeds, and the 95%
interval is Student's t over those pair means (the question is whether the effect holds across pairs
of this kind; the seeds' spread, min to max of the per-seed means, is shown beside it). Quantities:

- ``after_diff_shift``: mean per-token log-prob of the chosen tokens after the first token where chosen
  and rejected differ (that token excluded), policy minus reference (Smaug Fig. 4, as a shift);
- ``chosen_shift`` / ``rejected_shift``: summed log-prob of the response, policy minus reference (nats);
- ``dpop_minus_dpo``: the per-pair difference of ``after_diff_shift`` between DPOP and DPO.

A pair with no chosen token after the first difference (the chosen answer ends there, or is cut by
``train.max_length``) has no after-difference value and is left out of that quantity's count.

The verdict sentences are generated from the intervals and the seeds: "lowered" when the interval lies below 0
and every seed's mean is below 0, "raised" likewise above 0, "did not clearly change" when the interval
covers 0, and "did not change consistently across seeds" when the interval over pairs is one-sided but a
seed's mean lies on the other side (the interval is over pairs, so it does not see the seed variance).
"Smaug's failure mode appears here" when DPO lowered the after-difference quantity, DPOP did not, and DPOP
minus DPO lies above 0; Smaug expects it on low-edit-distance pairs and not on high ones, so "does not
appear" is the expected outcome there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.plotting import buckets_in_order, colors, plt, save

NAME = "s1_smaug_study"
METHODS = ("dpo", "dpop")
QUANTITIES = {  # name -> (policy column, reference column or None when it is already a shift) of trajectories.jsonl
    "after_diff_shift": ("chosen_after_diff_mean_logp", "ref_chosen_after_diff_mean_logp"),
    "chosen_shift": ("chosen_shift", None),
    "rejected_shift": ("rejected_shift", None),
}


def applies(tables: dict[str, pd.DataFrame]) -> bool:
    jobs = tables.get("jobs", pd.DataFrame())
    if jobs.empty or "bucket_filter" not in jobs:
        return False
    bucketed = jobs[(jobs["status"] == "ok") & jobs["bucket_filter"].notna() & (jobs["bucket_filter"] != "all")]
    return set(METHODS) <= set(bucketed["method"]) and not in_trained_bucket(tables.get("probes", pd.DataFrame())).empty


def in_trained_bucket(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of DPO/DPOP jobs trained on one bucket, on held-out pairs of that same bucket."""
    if frame.empty or "bucket_filter" not in frame:
        return frame
    frame = frame[frame["method"].isin(METHODS) & frame["bucket_filter"].notna() & (frame["bucket_filter"] != "all")]
    return frame[frame["bucket"].astype(str) == frame["bucket_filter"].astype(str)]


def quantity(frame: pd.DataFrame, columns: tuple[str, str | None]) -> pd.Series:
    policy, reference = columns
    values = frame[policy].astype(float)
    return values - frame[reference].astype(float) if reference else values


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval; the bounds are NaN for fewer than two values."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    mean = float(values.mean()) if len(values) else float("nan")
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def study_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per bucket x method x quantity (plus DPOP - DPO per bucket), with interval and seed spread."""
    probes = in_trained_bucket(tables["probes"])
    pairs = probes[probes["step"] == probes.groupby("job")["step"].transform("max")]  # each job's final model
    rows = []
    for bucket, in_bucket in pairs.groupby(pairs["bucket"].astype(str), sort=False):
        per_pair = {}
        for method, group in in_bucket.groupby("method"):
            for name, columns in QUANTITIES.items():
                values = group.assign(value=quantity(group, columns))
                seeds = values.groupby("seed")["value"].mean()
                # a pair whose value is undefined (no chosen token after the first difference) is left out
                pair_means = values.groupby("pair_id")["value"].mean().dropna()
                per_pair[(method, name)] = pair_means
                mean, low, high = interval(pair_means.to_numpy())
                rows.append({"bucket": bucket, "method": method, "quantity": name, "mean": mean, "ci_low": low,
                             "ci_high": high, "pairs": len(pair_means), "seeds": len(seeds),
                             "seed_min": float(seeds.min()), "seed_max": float(seeds.max()),
                             "artifact_keys": " ".join(sorted(set(group["artifact_key"].astype(str))))})
            if method == "dpo":
                reference = group.drop_duplicates("pair_id")["ref_chosen_after_diff_mean_logp"].astype(float)
                rows.append({"bucket": bucket, "method": "reference", "quantity": "after_diff_logp",
                             "mean": float(reference.mean()), "pairs": len(reference), "seeds": 0,
                             "artifact_keys": " ".join(sorted(set(group["artifact_key"].astype(str))))})
        if ("dpo", "after_diff_shift") in per_pair and ("dpop", "after_diff_shift") in per_pair:
            joined = pd.concat([per_pair[("dpop", "after_diff_shift")], per_pair[("dpo", "after_diff_shift")]],
                               axis=1, keys=["dpop", "dpo"], join="inner")
            mean, low, high = interval((joined["dpop"] - joined["dpo"]).to_numpy())
            rows.append({"bucket": bucket, "method": "dpop - dpo", "quantity": "after_diff_shift", "mean": mean,
                         "ci_low": low, "ci_high": high, "pairs": len(joined), "seeds": np.nan})
    return pd.DataFrame(rows)


def direction(row: pd.Series) -> str:
    if np.isnan(row["ci_low"]):
        return "cannot say (fewer than two pairs)"
    seed_min, seed_max = row.get("seed_min", np.nan), row.get("seed_max", np.nan)
    if row["ci_high"] < 0:
        return "lowered" if not seed_max >= 0 else "did not change consistently across seeds"
    if row["ci_low"] > 0:
        return "raised" if not seed_min <= 0 else "did not change consistently across seeds"
    return "did not clearly change"


def fmt(row: pd.Series, digits: int = 3) -> str:
    text = f"{row['mean']:+.{digits}f}"
    if not np.isnan(row.get("ci_low", np.nan)):
        text += f" [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}]"
    if not np.isnan(row.get("seed_min", np.nan)):
        text += f", seeds {row['seed_min']:+.{digits}f}..{row['seed_max']:+.{digits}f}"
    return text


def verdict(table: pd.DataFrame) -> list[str]:
    """One sentence per bucket, generated from the intervals, then whether Smaug's direction reproduced."""
    sentences = []
    for bucket, rows in table.groupby("bucket", sort=False):
        get = {(r.method, r.quantity): r for _, r in rows.iterrows()}
        dpo, dpop = get.get(("dpo", "after_diff_shift")), get.get(("dpop", "after_diff_shift"))
        gap = get.get(("dpop - dpo", "after_diff_shift"))
        if dpo is None or dpop is None:
            continue
        reproduced = direction(dpo) == "lowered" and direction(dpop) != "lowered" and gap is not None \
            and direction(gap) == "raised"
        chosen = get[("dpo", "chosen_shift")]
        sentences.append(
            f"Bucket {bucket} ({int(dpo['pairs'])} held-out pairs, {int(dpo['seeds'])} seeds): DPO {direction(dpo)} the "
            f"chosen tokens after the first difference (shift {fmt(dpo)} per token, 95% interval over pairs) and "
            f"{direction(chosen)} the chosen log-prob ({fmt(chosen, 2)} nats); DPOP {direction(dpop)} them "
            f"({fmt(dpop)}); DPOP minus DPO {fmt(gap) if gap is not None else '–'}. "
            + ("Smaug's failure mode appears here (DPO lowers the chosen tokens after the difference, DPOP keeps "
               "them)." if reproduced else "Smaug's failure mode does not appear here."))
    return sentences


def trajectories(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per bucket, method, seed and probe step: the mean of each quantity over the probe pairs of the trained bucket."""
    probes = in_trained_bucket(tables.get("probes", pd.DataFrame()))
    if probes.empty:
        return pd.DataFrame()
    frame = probes.assign(**{name: quantity(probes, columns) for name, columns in QUANTITIES.items()})
    return (frame.groupby([frame["bucket"].astype(str).rename("bucket"), "method", "seed", "step"])[list(QUANTITIES)]
            .mean().reset_index())


def make(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """The study's figure: chosen shift and after-difference shift over training, per trained bucket."""
    if not applies(tables):
        return []
    curves = trajectories(tables)
    if curves.empty:
        return []
    buckets = buckets_in_order(curves["bucket"])  # low before high
    palette = colors(list(METHODS))
    fig, axes = plt.subplots(2, len(buckets), figsize=(4.6 * len(buckets), 6.4), sharex=True, squeeze=False)
    for column, bucket in enumerate(buckets):
        for row, (name, label) in enumerate((("chosen_shift", "log p(chosen) - ref (nats)"),
                                             ("after_diff_shift", "after-first-difference\nlog p per token - ref"))):
            ax = axes[row][column]
            for method in METHODS:
                runs = curves[(curves["bucket"] == bucket) & (curves["method"] == method)]
                if runs.empty:
                    continue
                by_step = runs.groupby("step")[name]
                ax.plot(by_step.mean().index, by_step.mean().to_numpy(), color=palette[method], label=method)
                ax.fill_between(by_step.min().index, by_step.min().to_numpy(), by_step.max().to_numpy(),
                                color=palette[method], alpha=0.2, linewidth=0)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"trained and measured on bucket {bucket}" if row == 0 else "")
            if column == 0:
                ax.set_ylabel(label)
            if row == 1:
                ax.set_xlabel("training step")
    axes[0][0].legend(fontsize=8)
    return save(fig, out_dir, NAME)


def markdown_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["bucket", "method", "quantity", "mean [95% interval]", "seed min..max", "pairs", "seeds"]
    body = []
    for _, r in table.iterrows():
        spread = "" if pd.isna(r.get("seed_min")) else f"{r['seed_min']:+.3f}..{r['seed_max']:+.3f}"
        seeds = "" if pd.isna(r.get("seeds")) or r["seeds"] == 0 else str(int(r["seeds"]))
        body.append([str(r["bucket"]), str(r["method"]), str(r["quantity"]), fmt(r), spread, str(int(r["pairs"])), seeds])
    return header, body
