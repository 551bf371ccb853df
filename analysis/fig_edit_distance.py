"""F1: edit-distance histograms per data source, with the bucket edges.

One row of panels per pairing artifact and data source (per pair kind when a single source
mixes kinds, as the synthetic MetaMath/ARC-style data does); columns are the character
and token normalised edit distances (Smaug reports ~6.5% for MetaMath-style pairs,
~90% for ARC-style). The bucket edges are drawn on the unit the pairing bucketed by.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.plotting import buckets_in_order, nonempty, plt, save

NAME = "f1_edit_distance"
NORMALISED = ("char_ned", "token_ned")


def _unit(pairing: pd.Series | None) -> str | None:
    """The pairs.parquet column the pairing bucketed by (e.g. char_ned), when recorded."""
    return None if pairing is None or not pairing.get("unit") else str(pairing["unit"])


def make(tables: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    if not nonempty(tables, "pair_data", "source"):
        return []
    data = tables["pair_data"]
    pairings = tables.get("pairings", pd.DataFrame())
    units = {str(u) for u in pairings.get("unit", pd.Series(dtype=object)).dropna()}
    columns = [c for c in NORMALISED if c in data.columns] + sorted(u for u in units - set(NORMALISED) if u in data.columns)
    if not columns:
        return []
    data = data.assign(source=data["source"].astype(str))
    if data["source"].nunique() == 1 and "kind" in data and data["kind"].nunique() > 1:
        data = data.assign(source=data["source"] + ": " + data["kind"].astype(str))
    panels = [(key, source) for key in dict.fromkeys(data["artifact_key"]) for source in
              dict.fromkeys(data.loc[data["artifact_key"] == key, "source"])]
    fig, axes = plt.subplots(len(panels), len(columns), figsize=(4.2 * len(columns), 2.6 * len(panels)),
                             squeeze=False)
    bins = np.linspace(0, 1, 41)
    several_pairings = data["artifact_key"].nunique() > 1
    all_buckets = buckets_in_order(data["bucket"].astype(str)) if "bucket" in data else []
    bucket_colors = {b: f"C{i % 10}" for i, b in enumerate(all_buckets)}  # same colour for a bucket everywhere
    for row, (key, source) in enumerate(panels):
        subset = data[(data["artifact_key"] == key) & (data["source"] == source)]
        match = pairings[pairings["artifact_key"] == key] if len(pairings) else pairings
        pairing = match.iloc[0] if len(match) else None
        edges = json.loads(pairing["bucket_edges"]) if pairing is not None and pairing["bucket_edges"] else None
        edge_column = _unit(pairing)
        for col, column in enumerate(columns):
            ax = axes[row][col]
            if "bucket" in subset and subset["bucket"].notna().any():
                groups = [(b, subset.loc[subset["bucket"].astype(str) == b, column].dropna())
                          for b in buckets_in_order(subset["bucket"])]
                ax.hist([g for _, g in groups], bins=bins if column in NORMALISED else 30, stacked=True,
                        label=[f"bucket {b}" for b, _ in groups], color=[bucket_colors[b] for b, _ in groups])
            else:
                ax.hist(subset[column].dropna(), bins=bins if column in NORMALISED else 30)
            if edges and (edge_column is None or edge_column == column):
                for edge in edges:  # the outer edges bound the open-ended first and last buckets
                    ax.axvline(float(edge), color="black", linestyle="--", linewidth=1)
            title = f"{source} (n={len(subset)})" + (f" [pairs {key}]" if several_pairings else "")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(column + (" (bucket unit)" if column == edge_column else ""))
            ax.set_ylabel("pairs")
            if col == 0 and "bucket" in subset:
                ax.legend(fontsize=7)
    return save(fig, out_dir, NAME)
