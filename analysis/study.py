"""S1: the Smaug study. On pairs of one edit-distance bucket, does DPO lower the chosen likelihood while
DPOP keeps it at or above the reference?

Applies to a sweep that trains DPO and DPOP on one bucket at a time (``pairing.bucket_filter``) over several
seeds (``sweeps/reproduce_smaug.yaml``: 5). Each job is measured on the held-out pairs of the bucket it trained
on (the train stage's probe set, ``trajectories.jsonl``); the table reads each job's last probe step.

Statistics (analysis/inference.py). A claim about a training method is a claim about training runs, so the
unit is the run: each seed's mean over the held-out pairs, and the 95% interval is Student's t over those
per-seed means (``run_low``/``run_high``, n = seeds); its t-test p-value is Holm-adjusted across every row of
the table (``run_p_holm``) and ``run_mde`` is the smallest effect those runs detect (power 0.8, alpha 0.05).
The verdicts use only these. Two narrower views are printed beside them, labelled: over held-out pairs
(``pair_low``/``pair_high``: each pair averaged over seeds, t over pairs; blind to seed variance) and over
prompts (``prompt_low``/``prompt_high``: pairs of one prompt averaged first, the cluster-robust view).
Rows are per data draw (``data_seed``, read from each job's recorded config) x bucket x pair kind ("all",
then each kind of the generated data when a bucket has several) x method x quantity:

- ``after_diff_shift``: mean per-token log-prob of the chosen tokens after the first token where chosen
  and rejected differ (that token excluded), policy minus reference (Smaug Fig. 4, as a shift); only pairs
  with at least ``Settings.after_diff_min_tokens`` such tokens (``short_excluded`` counts the others);
- ``chosen_shift`` / ``rejected_shift``: summed log-prob of the response, policy minus reference (nats);
- ``dpop - dpo``: per seed, DPOP's run minus DPO's run with the same seed (pair level: per pair).

Verdict words (``inference.describe``): "lowered"/"raised" when the Holm-adjusted run-level test rejects;
otherwise "no change shown", with non-inferiority at an explicit margin and the minimum detectable effect.
"Smaug's failure mode appears here" when DPO lowered the after-difference quantity, DPOP is non-inferior to
the reference at the margin, and DPOP minus DPO was raised. The bucket confound (training pairs, epochs,
answer length) is printed beside the verdicts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import inference
from analysis.inference import Settings
from analysis.plotting import buckets_in_order, colors, plt, save
from analysis.study_data import QUANTITIES, confound, confound_sentence, with_values

NAME = "s1_smaug_study"
METHODS = ("dpo", "dpop")
GAP = "dpop - dpo"


def applies(tables: dict[str, pd.DataFrame]) -> bool:
    jobs = tables.get("jobs", pd.DataFrame())
    if jobs.empty or "bucket_filter" not in jobs:
        return False
    bucketed = jobs[(jobs["status"] == "ok") & jobs["bucket_filter"].notna() & (jobs["bucket_filter"] != "all")]
    # One setting per method: a sweep over beta or lambda_ (sweeps/smaug_fig3.yaml) is F7's, and pooling its
    # points as one method's runs would mix different losses in one interval.
    settings = [p for p in ("beta", "lambda_") if p in bucketed]
    mixed = any(bucketed[bucketed["method"] == m][p].dropna().nunique() > 1 for m in METHODS for p in settings)
    return (set(METHODS) <= set(bucketed["method"]) and not mixed
            and not in_trained_bucket(tables.get("probes", pd.DataFrame())).empty)


def in_trained_bucket(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of DPO/DPOP jobs trained on one bucket, on held-out pairs of that same bucket."""
    if frame.empty or "bucket_filter" not in frame:
        return frame
    frame = frame[frame["method"].isin(METHODS) & frame["bucket_filter"].notna() & (frame["bucket_filter"] != "all")]
    return frame[frame["bucket"].astype(str) == frame["bucket_filter"].astype(str)]


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval; the bounds are NaN for fewer than two values."""
    return inference.t_interval(values)


def final_values(tables: dict[str, pd.DataFrame], settings: Settings = Settings()) -> pd.DataFrame:
    probes = in_trained_bucket(tables["probes"])
    finals = probes[probes["step"] == probes.groupby("job")["step"].transform("max")]  # each job's final model
    return with_values(finals, tables, settings)


def _stats(per_seed: pd.Series, per_pair: pd.Series, prompts: pd.Series) -> dict:
    """Run-level (over seeds), pair-level and prompt-level statistics of one row."""
    per_seed, per_pair = per_seed.dropna(), per_pair.dropna()
    per_prompt = per_pair.groupby(prompts.reindex(per_pair.index)).mean()
    mean, run_low, run_high = inference.t_interval(per_seed.to_numpy())
    _, pair_low, pair_high = inference.t_interval(per_pair.to_numpy())
    _, prompt_low, prompt_high = inference.t_interval(per_prompt.to_numpy())
    return {"mean": mean, "run_low": run_low, "run_high": run_high, "run_p": inference.t_test(per_seed.to_numpy()),
            "run_mde": inference.sample_mde(per_seed.to_numpy()), "seeds": len(per_seed),
            "seed_min": float(per_seed.min()) if len(per_seed) else np.nan,
            "seed_max": float(per_seed.max()) if len(per_seed) else np.nan,
            "pair_mean": float(per_pair.mean()) if len(per_pair) else np.nan, "pair_low": pair_low,
            "pair_high": pair_high, "pairs": len(per_pair), "prompt_low": prompt_low, "prompt_high": prompt_high,
            "prompts": len(per_prompt)}


def _rows_for(frame: pd.DataFrame, keys: dict) -> list[dict]:
    rows, runs = [], {}
    prompts = frame.drop_duplicates("pair_id").set_index("pair_id")["prompt"]
    for method, group in frame.groupby("method"):
        for name in QUANTITIES:
            per_seed = group.groupby("seed")[name].mean()
            per_pair = group.groupby("pair_id")[name].mean()
            runs[(method, name)] = (per_seed, per_pair)
            short = group.drop_duplicates("pair_id")["short"]
            excluded = (int(short.fillna(False).astype(bool).sum()) if short.notna().all() else np.nan) \
                if name == "after_diff_shift" else 0
            rows.append({**keys, "method": method, "quantity": name, **_stats(per_seed, per_pair, prompts),
                         "short_excluded": excluded,
                         "artifact_keys": " ".join(sorted(set(group["artifact_key"].astype(str))))})
    if ("dpo", "after_diff_shift") in runs and ("dpop", "after_diff_shift") in runs:
        (dpo_seed, dpo_pair), (dpop_seed, dpop_pair) = runs[("dpo", "after_diff_shift")], runs[("dpop", "after_diff_shift")]
        rows.append({**keys, "method": GAP, "quantity": "after_diff_shift",
                     **_stats(dpop_seed - dpo_seed, dpop_pair - dpo_pair, prompts)})  # aligned on seed / pair_id
    return rows


def study_table(tables: dict[str, pd.DataFrame], settings: Settings = Settings()) -> pd.DataFrame:
    """One row per data draw x bucket x kind x method x quantity (plus DPOP - DPO), run-level first."""
    finals = final_values(tables, settings)
    rows = []
    for (data_seed, bucket), in_bucket in finals.groupby(["data_seed", finals["bucket"].astype(str)], sort=False):
        keys = {"data_seed": data_seed, "bucket": bucket}
        rows += _rows_for(in_bucket, {**keys, "kind": "all"})
        dpo = in_bucket[in_bucket["method"] == "dpo"].drop_duplicates("pair_id")
        rows.append({**keys, "kind": "all", "method": "reference", "quantity": "after_diff_logp",
                     "mean": float(dpo["ref_chosen_after_diff_mean_logp"].astype(float)[dpo["after_diff_shift"].notna()].mean()),
                     "pairs": int(dpo["after_diff_shift"].notna().sum()), "seeds": 0})
        kinds = in_bucket["kind"].dropna().astype(str).unique() if "kind" in in_bucket else []
        if len(kinds) > 1:
            for kind in sorted(kinds):
                rows += _rows_for(in_bucket[in_bucket["kind"].astype(str) == kind], {**keys, "kind": kind})
        for name, value in confound(tables, sorted(in_bucket["job"].unique()), bucket, in_bucket).items():
            for row in rows:
                if row["data_seed"] == data_seed and row["bucket"] == bucket:
                    row[f"confound_{name}"] = value
    table = pd.DataFrame(rows)
    table["run_p_holm"] = inference.holm(table["run_p"].to_numpy()) if "run_p" in table else np.nan
    return table


def margin(quantity: str, settings: Settings) -> tuple[float, str]:
    return (settings.margin_after_diff, " per token") if quantity == "after_diff_shift" else (settings.margin_nats, " nats")


def direction(row: pd.Series, settings: Settings = Settings()) -> str:
    size, unit = margin(row["quantity"], settings)
    return inference.describe(row["run_low"], row["run_high"], row.get("run_p_holm", np.nan), size,
                              row.get("run_mde", np.nan), unit)


def noninferior(row: pd.Series, settings: Settings = Settings()) -> bool:
    return bool(row["run_low"] > -margin(row["quantity"], settings)[0])


def fmt(row: pd.Series, digits: int = 3) -> str:
    """Run-level mean [interval over seeds]; then, labelled, the pair-level and prompt-level intervals."""
    text = f"{row['mean']:+.{digits}f}"
    if not pd.isna(row.get("run_low", np.nan)):
        text += f" [{row['run_low']:+.{digits}f}, {row['run_high']:+.{digits}f}] over {int(row['seeds'])} runs"
    if not pd.isna(row.get("pair_low", np.nan)):
        text += (f"; over {int(row['pairs'])} pairs [{row['pair_low']:+.{digits}f}, {row['pair_high']:+.{digits}f}]")
    if not pd.isna(row.get("prompt_low", np.nan)):
        text += (f", over {int(row['prompts'])} prompts [{row['prompt_low']:+.{digits}f}, "
                 f"{row['prompt_high']:+.{digits}f}]")
    return text


def draw_name(data_seed) -> str:
    return (f"data draw data.seed={data_seed}" + (" (the pilot's draw, on which the study's settings were chosen)"
                                                 if data_seed == 0 else " (a confirmatory draw)"))


def verdict(table: pd.DataFrame, settings: Settings = Settings()) -> list[str]:
    """One sentence per data draw x bucket (kind "all"), generated from the run-level tests, then the confound."""
    sentences, confounds = [], {}
    table = table[table["kind"] == "all"] if "kind" in table else table
    for (data_seed, bucket), rows in table.groupby(["data_seed", "bucket"], sort=False):
        get = {(r.method, r.quantity): r for _, r in rows.iterrows()}
        dpo, dpop = get.get(("dpo", "after_diff_shift")), get.get(("dpop", "after_diff_shift"))
        gap = get.get((GAP, "after_diff_shift"))
        if dpo is None or dpop is None:
            continue
        reproduced = direction(dpo, settings) == "lowered" and noninferior(dpop, settings) and gap is not None \
            and direction(gap, settings) == "raised"
        chosen = get[("dpo", "chosen_shift")]
        excluded = dpo.get("short_excluded", np.nan)
        guard = (f"after-diff on the {int(dpo['pairs'])} pairs with >= {settings.after_diff_min_tokens} chosen tokens "
                 f"after the difference ({int(excluded)} excluded)" if not pd.isna(excluded)
                 else "after-diff not filtered by tokens after the difference: these artifacts do not record them")
        sentences.append(
            f"Bucket {bucket}, {draw_name(data_seed)} ({int(dpo['seeds'])} runs per method; {guard}). "
            f"DPO, chosen tokens after the first difference: {direction(dpo, settings)} (shift {fmt(dpo)} per token); "
            f"DPO, chosen log-prob: {direction(chosen, settings)} ({fmt(chosen, 2)} nats); DPOP, chosen tokens after "
            f"the first difference: {direction(dpop, settings)} ({fmt(dpop)}); DPOP minus DPO: "
            f"{direction(gap, settings) if gap is not None else '-'} ({fmt(gap) if gap is not None else '-'}). "
            "Verdicts from the intervals over runs, Holm-adjusted across the table. "
            + ("Smaug's failure mode appears here (DPO lowers the chosen tokens after the difference, DPOP keeps "
               "them)." if reproduced else "Smaug's failure mode is not shown here."))
        confounds.setdefault(data_seed, {})[bucket] = {name: dpo.get(f"confound_{name}", np.nan) for name in
                                                       ("train_pairs", "steps", "pairs_per_step", "epochs", "chosen_tokens")}
    for by_bucket in confounds.values():
        if len(by_bucket) > 1:
            sentences.append(confound_sentence(by_bucket))
    return sentences


def trajectories(tables: dict[str, pd.DataFrame], settings: Settings = Settings()) -> pd.DataFrame:
    """Per bucket, method, seed and probe step: the mean of each quantity over the probe pairs of the trained
    bucket (the after-difference guard applied as in the table)."""
    probes = in_trained_bucket(tables.get("probes", pd.DataFrame()))
    if probes.empty:
        return pd.DataFrame()
    frame = with_values(probes, tables, settings)
    return (frame.groupby([frame["bucket"].astype(str).rename("bucket"), "method", "seed", "step"])[list(QUANTITIES)]
            .mean().reset_index())


def make(tables: dict[str, pd.DataFrame], out_dir: Path, settings: Settings = Settings()) -> list[Path]:
    """The study's figure: chosen shift and after-difference shift over training, per trained bucket."""
    if not applies(tables):
        return []
    curves = trajectories(tables, settings)
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
    header = ["data.seed", "bucket", "kind", "method", "quantity", "mean [95% over runs]", "Holm p", "MDE",
              "seed min..max", "[95% over pairs] (pairs)", "[95% over prompts] (prompts)", "runs"]

    def bounds(r, low, high, count) -> str:
        return "" if pd.isna(r.get(low)) else f"[{r[low]:+.3f}, {r[high]:+.3f}] ({int(r[count])})"

    body = []
    for _, r in table.iterrows():
        mean = ("–" if pd.isna(r["mean"]) else f"{r['mean']:+.3f}") + ("" if pd.isna(r.get("run_low")) else f" [{r['run_low']:+.3f}, {r['run_high']:+.3f}]")
        spread = "" if pd.isna(r.get("seed_min")) else f"{r['seed_min']:+.3f}..{r['seed_max']:+.3f}"
        seeds = "" if pd.isna(r.get("seeds")) or r["seeds"] == 0 else str(int(r["seeds"]))
        body.append([str(r["data_seed"]), str(r["bucket"]), str(r["kind"]), str(r["method"]), str(r["quantity"]), mean,
                     "" if pd.isna(r.get("run_p_holm")) else f"{r['run_p_holm']:.3g}",
                     "" if pd.isna(r.get("run_mde")) else f"{r['run_mde']:.3f}", spread,
                     bounds(r, "pair_low", "pair_high", "pairs") or (str(int(r["pairs"])) if not pd.isna(r.get("pairs")) else ""),
                     bounds(r, "prompt_low", "prompt_high", "prompts"), seeds])
    return header, body
