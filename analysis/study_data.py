"""The study's inputs, prepared once: each job's final probe values with the data draw, the prompt and the
after-difference guard applied, and the bucket confound (what else differs between buckets than edit distance).

- ``data_seed``: the job's ``data.seed`` from its recorded config (which data draw a verdict comes from).
- ``prompt``: joined from the pairing artifact's pairs by ``pair_id`` (pairs of one prompt are not
  independent: the prompt-level interval clusters on it).
- after-difference guard: Smaug's after-first-difference log-prob is meant for completions that share text
  after the edit; a pair whose chosen answer has fewer than ``Settings.after_diff_min_tokens`` tokens after
  the first difference (a multiple-choice answer followed only by the end-of-turn token) gets no value.
  Artifacts written before the probes recorded ``chosen_after_diff_tokens`` cannot be filtered; the study
  then says so (``short_excluded`` is NaN).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.inference import Settings

QUANTITIES = {  # name -> (policy column, reference column or None when it is already a shift) of trajectories.jsonl
    "after_diff_shift": ("chosen_after_diff_mean_logp", "ref_chosen_after_diff_mean_logp"),
    "chosen_shift": ("chosen_shift", None),
    "rejected_shift": ("rejected_shift", None),
}
AFTER_DIFF_TOKENS = "chosen_after_diff_tokens"


def job_config(jobs: pd.DataFrame) -> dict[str, dict]:
    return {row.job: json.loads(row.config) for row in jobs.itertuples() if isinstance(row.config, str)}


def data_seeds(jobs: pd.DataFrame) -> dict[str, object]:
    """job -> data.seed as recorded (the run seed when data.seed followed it; "unknown" if not recorded)."""
    out = {}
    for job, config in job_config(jobs).items():
        seed = (config.get("data") or {}).get("seed")
        out[job] = int(seed) if isinstance(seed, (int, float)) else "unknown"
    return out


def with_values(probes: pd.DataFrame, tables: dict[str, pd.DataFrame], settings: Settings) -> pd.DataFrame:
    """``probes`` plus data_seed, prompt, one column per quantity, and ``short`` (after-diff excluded)."""
    frame = probes.copy()
    frame["data_seed"] = frame["job"].map(data_seeds(tables["jobs"])).fillna("unknown")
    pair_data = tables.get("pair_data", pd.DataFrame())
    if len(pair_data) and "prompt" in pair_data:
        prompts = pair_data.drop_duplicates("pair_id").set_index("pair_id")["prompt"]
        frame["prompt"] = frame["pair_id"].map(prompts)
    if "prompt" not in frame or frame["prompt"].isna().any():  # no pairing artifact: every pair its own cluster
        frame["prompt"] = frame.get("prompt", pd.Series(index=frame.index, dtype=object)).fillna(frame["pair_id"])
    for name, (policy, reference) in QUANTITIES.items():
        values = frame[policy].astype(float)
        frame[name] = values - frame[reference].astype(float) if reference else values
    if AFTER_DIFF_TOKENS in frame and frame[AFTER_DIFF_TOKENS].notna().any():
        short = frame[AFTER_DIFF_TOKENS].astype(float) < settings.after_diff_min_tokens
        frame["short"] = short & frame["after_diff_shift"].notna()
        frame.loc[short, "after_diff_shift"] = np.nan
    else:
        frame["short"] = np.nan  # not recorded: cannot be filtered
    return frame


def confound(tables: dict[str, pd.DataFrame], jobs: list[str], bucket: str, finals: pd.DataFrame) -> dict:
    """Training pairs of the bucket, epochs over them, and the chosen response length (held-out pairs)."""
    configs = job_config(tables["jobs"])
    keys = tables["jobs"].set_index("job").get("key/pair", pd.Series(dtype=object)).reindex(jobs).dropna()
    pair_data = tables.get("pair_data", pd.DataFrame())
    train_pairs = np.nan
    if len(pair_data) and len(keys):
        rows = pair_data[pair_data["artifact_key"].isin(set(keys)) & (pair_data["split"] == "train")
                         & (pair_data["bucket"].astype(str) == bucket)]
        train_pairs = int(rows["pair_id"].nunique())
    steps = set()
    for job in jobs:
        train = (configs.get(job) or {}).get("train") or {}
        if train.get("max_steps") is not None:
            steps.add((int(train["max_steps"]), int(train.get("batch_size", 1)) * int(train.get("grad_accumulation", 1))))
    step_count, batch = next(iter(steps)) if len(steps) == 1 else (np.nan, np.nan)
    epochs = step_count * batch / train_pairs if train_pairs and not np.isnan(step_count) else np.nan
    tokens = finals["chosen_tokens"].astype(float).mean() if "chosen_tokens" in finals else np.nan
    return {"train_pairs": train_pairs, "steps": step_count, "pairs_per_step": batch, "epochs": epochs,
            "chosen_tokens": tokens}


def confound_sentence(by_bucket: dict[str, dict]) -> str:
    parts = []
    for bucket, c in by_bucket.items():
        text = f"{bucket}: {c['train_pairs']} training pairs" if not pd.isna(c["train_pairs"]) else f"{bucket}: ? training pairs"
        if not pd.isna(c["epochs"]):
            text += f", {c['epochs']:.2f} epochs ({int(c['steps'])} steps x {int(c['pairs_per_step'])} pairs)"
        if not pd.isna(c["chosen_tokens"]):
            text += f", held-out chosen answers {c['chosen_tokens']:.0f} tokens on average"
        parts.append(text)
    return ("Buckets differ in more than edit distance (" + "; ".join(parts) + "): a difference between buckets "
            "is not attributable to edit distance alone.")
