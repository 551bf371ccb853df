"""Stage "analyse" for one run: its tables, figures and report, as an artifact.

Reads only the upstream artifacts (never W&B, never a model) through the ``analysis``
package, as if the run were a one-job sweep. The key hashes the upstream keys plus
the few config values the analysis prints that no upstream key may carry (method
name, beta, lambda_, bucket filter, seed: e.g. two methods evaluated without training
share the evaluate artifact but not their label), so a rerun reports ``cached``.
A whole sweep is analysed by ``python -m analysis <sweep_dir>`` instead.

Artifact: ``report.md``, ``report.html``, ``figures/`` (PNG + PDF), ``tables/``
(``results.parquet``, ``results.csv`` and the per-step/probe/pair tables).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.store.artifacts import Artifact, build

JOB = "run"


def config_subset(cfg: DictConfig) -> dict[str, Any]:
    def get(key: str) -> Any:
        value = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    return {
        "method": {"name": get("method.name"), "beta": get("method.beta"), "lambda_": get("method.lambda_")},
        "bucket_filter": get("pairing.bucket_filter"),
        "seed": get("seed"),
    }


def run(cfg: DictConfig, upstream: dict[str, Artifact], root: Path) -> Artifact:
    from analysis.collect import collect_records  # matplotlib and pandas only when the stage runs
    from analysis.report import write_report

    subset = config_subset(cfg)

    def compute(workdir: Path) -> dict[str, Any]:
        record = {
            "method": subset["method"]["name"],
            "config": {"method": subset["method"], "pairing": {"bucket_filter": subset["bucket_filter"]},
                       "seed": subset["seed"]},
            "status": "ok",
            "artifacts": {name: {"key": art.key, "path": str(art.path)} for name, art in sorted(upstream.items())},
        }
        tables = collect_records([(JOB, record, None)])
        # relative links survive the rename of <key>.partial to <key> (same depth)
        write_report(tables, workdir, source=f"run of {subset['method']['name']} ({', '.join(sorted(upstream))})")
        figures = sorted(p.name for p in (workdir / "figures").glob("*.png")) if (workdir / "figures").exists() else []
        return {"report": "report.md", "figures": figures, "metrics": int(tables["results"]["metric"].notna().sum())}

    return build(root, "analyse", subset, upstream, compute)
