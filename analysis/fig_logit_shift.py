"""F5: observed-token logit shift per method (BNF paper), chosen vs rejected.

Per held-out pair, the mean over response tokens of the observed token's logit minus the reference's, each
logit centred (minus the mean logit of its position: raw logits are free up to a per-position constant, so a
uniform drift is not a shift), as the evaluate stage stores it (``chosen_logit_shift``, ``rejected_logit_shift`` in
preference_pairs.parquet); violins per method (label), chosen left, rejected right.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.fig_loglik_shift import paired_violins

NAME = "f5_logit_shift"


def make(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    return paired_violins(tables, "chosen_logit_shift", "rejected_logit_shift",
                          "centred observed-token logit − reference's", NAME, out_dir)
