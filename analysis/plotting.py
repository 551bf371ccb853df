"""Shared helpers of the figure modules: saving, label order, colours, seed statistics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REFERENCE_COLOR = "0.45"


# The last figure drawn under each name (closed, artists kept): tests read the plotted values back.
DRAWN: dict = {}


def save(fig, out_dir: Path | str, name: str) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.pdf`` and close the figure."""
    DRAWN[name] = fig
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # reproducible bytes
    plt.close(fig)
    return paths


def ordered_labels(tables: dict[str, pd.DataFrame], present: pd.Series | list | None = None) -> list[str]:
    """Labels in report order (reference first, then methods as the sweep lists them)."""
    jobs = tables["jobs"].sort_values("label_rank", kind="stable")
    labels = list(dict.fromkeys(jobs["label"]))
    if present is not None:
        wanted = set(present)
        labels = [label for label in labels if label in wanted]
    return labels


def colors(labels: list[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10")
    palette, i = {}, 0
    for label in labels:
        if label.startswith("reference"):
            palette[label] = REFERENCE_COLOR
        else:
            palette[label] = cmap(i % 10)
            i += 1
    return palette


def seed_stats(df: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    """Mean, std (0 for one seed) and count of per-job values, grouped by ``by`` (e.g. label)."""
    grouped = df.groupby(by, sort=False, dropna=False)[value]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def mean_pm_std(mean: float, std: float, count: int, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if count > 1 else f"{mean:.{digits}f}"


def nonempty(tables: dict[str, pd.DataFrame], name: str, *columns: str) -> bool:
    """Whether table ``name`` exists, has rows and carries every column given."""
    df = tables.get(name)
    return df is not None and len(df) > 0 and all(c in df.columns for c in columns)


def buckets_in_order(values) -> list[str]:
    """Bucket names sorted naturally (low < mid < high when named so, else as text)."""
    rank = {"low": 0, "mid": 1, "medium": 1, "high": 2}
    names = [str(v) for v in dict.fromkeys(values) if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return sorted(names, key=lambda b: (rank.get(b, 99), b))


def violins(ax, data: list[np.ndarray], positions: list[float], color, width: float = 0.35, hatch: str | None = None):
    """Violins that tolerate tiny or constant samples (a line marks those instead of a KDE)."""
    for values, x in zip(data, positions):
        values = values[~np.isnan(values)]
        if len(values) == 0:
            continue
        if len(values) < 2 or np.ptp(values) == 0:
            ax.hlines(values.mean(), x - width / 2, x + width / 2, color=color, linewidth=2)
            continue
        parts = ax.violinplot([values], positions=[x], widths=width, showmeans=True, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(color)
            body.set_edgecolor("black")
            body.set_alpha(0.6)
            if hatch:
                body.set_hatch(hatch)
        parts["cmeans"].set_color("black")
