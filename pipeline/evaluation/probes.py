"""Probe trajectories of the train stage: per-example log-probs on a fixed set of held-out rows.

Every ``train.probe_every`` steps (and at step 0 and the last one) the policy scores the probe rows
exactly as the reference stage did (pairs with ``scoring.pair_forward``, one-sided rows alone), and
``trajectories.jsonl`` gets one line per row and step (``preference_metrics.pair_table``'s columns under
the names below; a one-sided row has its present side's values and null for the rest).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig

from pipeline.modeling.scoring import forward_settings

TRAJECTORY_COLUMNS = {  # trajectories.jsonl field -> pair_table column
    "pair_id": "pair_id", "bucket": "bucket", "kind": "kind",
    "chosen_logp": "policy_chosen_logp", "rejected_logp": "policy_rejected_logp",
    "ref_chosen_logp": "ref_chosen_logp", "ref_rejected_logp": "ref_rejected_logp",
    "chosen_shift": "rho_chosen", "rejected_shift": "rho_rejected",
    "chosen_after_diff_mean_logp": "chosen_after_diff_mean_logp",
    "ref_chosen_after_diff_mean_logp": "ref_chosen_after_diff_mean_logp",
    "chosen_logit_shift": "chosen_logit_shift", "rejected_logit_shift": "rejected_logit_shift",
    # how many tokens the after-diff mean rests on, and the answer length (the analysis guards and reports both)
    "chosen_after_diff_tokens": "chosen_after_diff_tokens", "chosen_tokens": "chosen_tokens",
}


def json_value(value: Any) -> Any:
    """Plain JSON: numpy scalars become Python values, nan/inf become null."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=float) + "\n")


class ProbeRecorder:
    """Per-example log-prob trajectories on a fixed set of held-out pairs (Smaug Fig. 4, BNF's shifts)."""

    def __init__(self, cfg: DictConfig, pairs: pd.DataFrame, rows: list[int], tokenizer, reference, path: Path, tracker):
        self.pairs = pairs.iloc[rows].reset_index(drop=True)
        self.reference = reference if rows else None  # pair_table matches rows by pair_id
        self.tokenizer, self.path, self.tracker = tokenizer, path, tracker
        self.max_length, self.max_prompt_length = int(cfg.train.max_length), int(cfg.train.max_prompt_length)
        self.settings = forward_settings(cfg)

    def record(self, model, step: int, write: bool = True) -> None:
        """Score the probe pairs at ``step`` and log them; ``write=False`` scores only (the other ranks of an
        FSDP run, whose forward is collective: every rank must run it)."""
        if self.reference is None:
            return
        from pipeline.evaluation.preference_metrics import pair_table
        from pipeline.modeling.scoring import score_pairs

        was_training = model.training
        model.eval()
        with torch.no_grad():
            scored = score_pairs(model, self.tokenizer, self.pairs, self.max_length, self.max_prompt_length,
                                 settings=self.settings, progress=False)
        model.train(was_training)
        if not write:
            return
        table = pair_table(scored, self.reference, self.pairs)
        rows = [{"step": step, **{field: json_value(record[column]) for field, column in TRAJECTORY_COLUMNS.items()}}
                for record in table.to_dict("records")]
        append_jsonl(self.path, rows)
        # Means over the rows that have the quantity (a one-sided row has no margin and one shift).
        means = {"probe/margin": table["margin"].mean(), "probe/chosen_shift": table["rho_chosen"].mean(),
                 "probe/rejected_shift": table["rho_rejected"].mean()}
        self.tracker.log({name: float(value) for name, value in means.items() if math.isfinite(value)}, step=step)
