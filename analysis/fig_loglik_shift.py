"""F4: log-likelihood shift on held-out pairs (BNF paper): distributions of rho(y_w) and rho(y_l).

``rho(y) = log p_theta(y) - log p_ref(y)`` (sequence sums), one pair of violins per
method (label): chosen left, rejected right (hatched); seeds pooled. A method that
lowers the chosen response (DPO on low-edit-distance pairs) shows a chosen violin
below zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import REFERENCE
from analysis.plotting import colors, nonempty, ordered_labels, plt, save, violins

NAME = "f4_loglik_shift"


def paired_violins(tables: dict[str, pd.DataFrame], chosen: str, rejected: str, ylabel: str, name: str,
                   out_dir: Path) -> list[Path]:
    """Chosen vs rejected distributions per trained method from preference_pairs (shared by F4 and F5)."""
    if not nonempty(tables, "pairs", chosen, rejected):
        return []
    pairs = tables["pairs"]
    pairs = pairs[(pairs["method"] != REFERENCE) & (pairs[chosen].notna() | pairs[rejected].notna())]
    if pairs.empty:
        return []
    labels = ordered_labels(tables, pairs["label"])
    palette = colors(labels)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels) + 2), 3.8))
    for i, label in enumerate(labels):
        subset = pairs[pairs["label"] == label]
        data = [subset[chosen].to_numpy(dtype=float), subset[rejected].to_numpy(dtype=float)]
        violins(ax, data[:1], [i - 0.2], palette[label])
        violins(ax, data[1:], [i + 0.2], palette[label], hatch="//")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title("left: chosen, right (hatched): rejected", fontsize=9)
    return save(fig, out_dir, name)


def make(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    return paired_violins(tables, "rho_chosen", "rho_rejected", "log p(y) − log p_ref(y)", NAME, out_dir)
