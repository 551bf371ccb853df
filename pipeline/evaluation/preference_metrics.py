"""Per-pair preference metrics of a policy against its reference, shared by trainer probes and evaluation.

Definitions (docs/losses.md, Smaug Fig. 4; Smaug = Pal et al. 2024):
- ``*_logp``: summed log-prob of the response tokens (EOS included) under policy or reference.
- ``rho_chosen = policy_chosen_logp - ref_chosen_logp`` (the log-ratio; DPO's implicit reward is
  ``beta * rho``; beta is left out so the table is method-free), likewise ``rho_rejected``.
- ``margin = rho_chosen - rho_rejected``; ``reward_correct = margin > 0`` (mean: reward accuracy).
- ``chosen_after_diff_mean_logp``: mean per-token log-prob of the chosen tokens AFTER the first
  token where the chosen and rejected token ids differ (Smaug Fig. 4: the differing token itself is
  excluded, so for a pair whose responses differ from their first token it is the chosen response
  without that token); ``ref_...`` the same under the reference. NaN when no chosen token follows the
  first difference (the chosen response is a prefix of the rejected one, or differs only at its end).
- ``chosen_logit_shift``: mean over chosen response tokens of (policy observed-token logit -
  reference observed-token logit), each logit taken relative to the mean logit of its position (raw
  logits are free up to a per-position constant); likewise ``rejected_logit_shift``.

One-sided rows (unpaired data, pipeline/data/unpaired.py: a side with 0 scored tokens is absent) get the
quantities of the side they have (its log-probs, rho and logit shift); the absent side's and the
pair-only ones (margin, reward_correct, first_diff_index, the after-diff means) are NaN (None for
reward_correct), so every mean is over the rows that have the quantity: reward accuracy and margins
over pairs only, ``rho_chosen`` over every row with a chosen response. ``summarise`` counts pairs
(``pairs``) and, where there are any, one-sided rows (``one_sided_rows``).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from pipeline.modeling.logprobs import first_difference_index, mean_logp_after
from pipeline.modeling.scoring import SIDES, ScoredPairs

PASS_THROUGH = ("bucket", "kind", "split", "source", "char_ned", "token_ned", "label")
MEAN_COLUMNS = (
    "policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp", "ref_rejected_logp",
    "rho_chosen", "rho_rejected", "margin", "chosen_after_diff_mean_logp", "ref_chosen_after_diff_mean_logp",
    "chosen_logit_shift", "rejected_logit_shift",
)


def pair_table(policy: ScoredPairs, reference: ScoredPairs, pairs_df: pd.DataFrame) -> pd.DataFrame:
    """One row per pair (or one-sided row) scored by ``policy``, matched to ``reference`` and ``pairs_df`` by pair_id."""
    info = pairs_df.set_index("pair_id", drop=False)
    policy_seq = {side: policy.seq_logps(side) for side in SIDES}
    ref_seq = {side: reference.seq_logps(side) for side in SIDES}
    has_logits = policy.logits is not None and reference.logits is not None
    rows = []
    for i, pair_id in enumerate(policy.pair_ids):
        r = reference.row(pair_id)
        for side in SIDES:
            if not torch.equal(policy.token_ids(side, i), reference.token_ids(side, r)):
                raise ValueError(f"pair {pair_id!r}: {side} tokens differ between policy and reference scores "
                                 "(different tokenizer or train.max_length / train.max_prompt_length?)")
        has = {side: int(policy.lengths(side)[i]) > 0 for side in SIDES}
        row: dict[str, Any] = {"pair_id": pair_id}
        meta = info.loc[pair_id]
        for column in PASS_THROUGH:
            if column in info.columns:
                row[column] = meta[column]
        for side in SIDES:
            row[f"policy_{side}_logp"] = float(policy_seq[side][i]) if has[side] else math.nan
            row[f"ref_{side}_logp"] = float(ref_seq[side][r]) if has[side] else math.nan
            row[f"{side}_tokens"] = int(policy.lengths(side)[i])
        row["rho_chosen"] = row["policy_chosen_logp"] - row["ref_chosen_logp"]
        row["rho_rejected"] = row["policy_rejected_logp"] - row["ref_rejected_logp"]
        for side in SIDES:
            row[f"{side}_logit_shift"] = (_mean(policy.observed_logits(side, i) - reference.observed_logits(side, r))
                                          if has_logits and has[side] else math.nan)
        if not all(has.values()):  # one-sided: the side it has, nothing that compares two sides
            row.update(margin=math.nan, reward_correct=None, first_diff_index=None, chosen_after_diff_tokens=None,
                       chosen_after_diff_mean_logp=math.nan, ref_chosen_after_diff_mean_logp=math.nan)
            rows.append(row)
            continue
        start = first_difference_index(policy.token_ids("chosen", i).tolist(), policy.token_ids("rejected", i).tolist())
        row["margin"] = row["rho_chosen"] - row["rho_rejected"]
        row["reward_correct"] = bool(row["margin"] > 0)
        row["first_diff_index"] = start
        after = start + 1  # the tokens after the differing one
        row["chosen_after_diff_tokens"] = max(int(policy.lengths("chosen")[i]) - after, 0)
        row["chosen_after_diff_mean_logp"] = mean_logp_after(policy.token_logps("chosen", i), after)
        row["ref_chosen_after_diff_mean_logp"] = mean_logp_after(reference.token_logps("chosen", r), after)
        rows.append(row)
    return pd.DataFrame(rows)


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else math.nan


def _summary(frame: pd.DataFrame) -> dict[str, Any]:
    one_sided = int(frame["reward_correct"].isna().sum()) if len(frame) else 0
    out: dict[str, Any] = {"pairs": int(len(frame)) - one_sided}
    if one_sided:
        out["one_sided_rows"] = one_sided
    out["reward_accuracy"] = _finite(frame["reward_correct"].astype(float).mean()) if len(frame) else None
    for column in MEAN_COLUMNS:
        out[column] = _finite(frame[column].mean()) if len(frame) else None  # pandas mean skips NaN
    return out


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN


def summarise(table: pd.DataFrame) -> dict[str, Any]:
    """Means over all pairs and per edit-distance bucket (NaN-free: missing values become None)."""
    result: dict[str, Any] = {"overall": _summary(table), "by_bucket": {}}
    if "bucket" in table.columns:
        for bucket, group in table.groupby("bucket", sort=True, dropna=False):
            result["by_bucket"][str(bucket)] = _summary(group)
    return result
