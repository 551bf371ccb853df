"""Artifacts -> tables: every number of the report, each with the artifact key it came from.

Reads run records (``run.json``) and the artifact directories they name; never W&B,
never a model. ``collect(dir)`` accepts a single run dir (``run.json`` inside) or a
sweep dir (``<job>/run.json`` below it) and returns a dict of DataFrames:

- ``jobs``: one row per job (status, method, label, hyper-parameters, overrides, artifact keys);
- ``results``: the tidy long table, one row per job x metric (failed jobs: one row, no metric);
- ``steps``: per-step training metrics (metrics.jsonl), long;
- ``probes``: per probe pair and record step (trajectories.jsonl);
- ``pairs``: per held-out pair preference metrics (preference_pairs.parquet), baseline included;
- ``items``: per lm-eval test item and metric (``samples/<task>.jsonl``: task, doc_id, metric, value), baseline
  included; metric names as in ``scores.json`` (``exact_match_strict-match``);
- ``pair_data``: the pairing artifacts' pairs (edit distances, buckets, sources);
- ``pairings``: one row per pairing artifact with its bucket edges;
- ``headlines``: the headline metric per eval task;
- ``manifests``: every manifest used (job, stage, key, path).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pipeline.errors import UserError

RUN_RECORD = "run.json"
MANIFEST = "manifest.json"
REFERENCE = "reference"
IDENTITY = ["job", "status", "method", "label", "beta", "lambda_", "bucket_filter", "seed"]
RESULT_COLUMNS = IDENTITY + ["stage", "metric", "value", "artifact_key", "artifact_path"]
TABLES = ("jobs", "results", "steps", "probes", "pairs", "items", "pair_data", "pairings", "headlines", "manifests")
# Run-level keys that say where/how a run was logged, not what it computed: never part of a label.
RUN_LEVEL_KEYS = {"sweep_name", "artifacts_dir", "stages", "logger", "seed"}
LABEL_KEY_ORDER = ("beta", "lambda_", "bucket_filter")


# ----------------------------------------------------------------------------- finding runs

def _natural_key(path: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def find_run_records(source: Path | str) -> list[tuple[str, Path]]:
    """(job name, run.json path) for a run dir or every job of a sweep dir."""
    source = Path(source)
    expected = "expected a run dir with run.json or a sweep dir with <job>/run.json"
    if not source.is_dir():
        raise UserError(f"{source}: not a directory ({expected})")
    if (source / RUN_RECORD).is_file():
        return [(source.name, source / RUN_RECORD)]
    found = [p for p in source.rglob(RUN_RECORD) if "report" not in p.relative_to(source).parts[:-1]]
    if not found:
        raise UserError(f"{source}: no run.json found ({expected})")
    found.sort(key=lambda p: _natural_key(p.relative_to(source)))
    return [(str(p.parent.relative_to(source)), p) for p in found]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}: line {number} is not valid JSON") from None
    return rows


def _overrides(run_dir: Path) -> list[str] | None:
    """Hydra's record of the command-line overrides of this job, when present."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    import yaml
    return [str(item) for item in (yaml.safe_load(path.read_text()) or [])]


# ----------------------------------------------------------------------------- small helpers

def flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Dotted-free flattening: ``{"a": {"b": 1}} -> ("a/b", 1)``; keeps every leaf."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}/{key}" if prefix else str(key))
    else:
        yield prefix, value


def numeric_leaves(value: Any, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for name, leaf in flatten(value, prefix):
        if isinstance(leaf, (int, float)) and not isinstance(leaf, str):
            out.append((name, float(leaf)))
    return out


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _bucket_filter(value: Any) -> str:
    if value is None:
        return "all"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) or "all"
    return str(value)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


def _find_key(value: Any, wanted: str) -> Any:
    """First value stored under ``wanted`` anywhere in a nested dict."""
    if isinstance(value, dict):
        if value.get(wanted) is not None:
            return value[wanted]
        for item in value.values():
            found = _find_key(item, wanted)
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------- jobs and labels

def _job_row(job: str, record: dict, run_dir: Path | None) -> dict:
    config = record.get("config") or {}
    method_cfg = config.get("method") or {}
    pairing_cfg = config.get("pairing") or {}
    seed = config.get("seed")
    row = {
        "job": job,
        "status": record.get("status", "unknown"),
        "method": record.get("method") or method_cfg.get("name") or "unknown",
        "beta": _as_float(method_cfg.get("beta")),
        "lambda_": _as_float(method_cfg.get("lambda_")),
        "bucket_filter": _bucket_filter(pairing_cfg.get("bucket_filter")),
        "seed": int(seed) if isinstance(seed, (int, float)) else None,
        "error": record.get("error"),
        "run_dir": str(run_dir) if run_dir else None,
        "config": json.dumps(config, sort_keys=True, default=str),
    }
    overrides = _overrides(run_dir) if run_dir else None
    row["overrides"] = " ".join(overrides) if overrides is not None else None
    for stage, info in (record.get("artifacts") or {}).items():
        row[f"key/{stage}"] = info.get("key")
    return row


def _labels(jobs: list[dict], configs: list[dict]) -> list[str]:
    """Method name plus the config values that vary between jobs of that method (seed excluded)."""
    flat = [
        {k: json.dumps(v, sort_keys=True, default=str) for k, v in flatten(
            {k: v for k, v in cfg.items() if k not in RUN_LEVEL_KEYS})}
        for cfg in configs
    ]
    labels = []
    for job, values in zip(jobs, flat):
        peers = [f for j, f in zip(jobs, flat) if j["method"] == job["method"]]
        keys = sorted({k for f in peers for k in f} - {"method/name"})
        # Any seed (the run seed, and data.seed which follows it by default) is what a seed sweep
        # varies: jobs that differ only by seeds share a label and are pooled into mean +- std.
        varying = [k for k in keys if len({f.get(k) for f in peers}) > 1 and k.split("/")[-1] != "seed"]
        short = sorted(varying, key=lambda k: (LABEL_KEY_ORDER.index(k.split("/")[-1])
                                               if k.split("/")[-1] in LABEL_KEY_ORDER else 99, k))
        parts = []
        for key in short:
            raw = values.get(key)
            parts.append(f"{key.split('/')[-1]}={format_value(json.loads(raw)) if raw else 'unset'}")
        labels.append(f"{job['method']} ({', '.join(parts)})" if parts else job["method"])
    return labels


# ----------------------------------------------------------------------------- artifact readers

class _Collector:
    def __init__(self) -> None:
        self.rows: dict[str, list] = {name: [] for name in TABLES}
        self.seen: set[tuple[str, str]] = set()

    def result(self, ident: dict, stage: str, metric: str | None, value: float | None, key: str | None, path: str | None):
        self.rows["results"].append({**ident, "stage": stage, "metric": metric, "value": value,
                                     "artifact_key": key, "artifact_path": path})

    def frame(self, name: str, ident: dict, df: pd.DataFrame, key: str) -> None:
        df = df.copy()
        for column, value in ident.items():
            df[column] = value
        df["artifact_key"] = key
        self.rows[name].append(df)

    def manifest(self, job: str, stage: str, key: str, path: Path) -> dict | None:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            print(f"warning: {path}: artifact missing (no {MANIFEST}); job {job} skips its {stage} data",
                  file=sys.stderr)
            return None
        self.rows["manifests"].append({"job": job, "stage": stage, "artifact_key": key,
                                       "manifest_path": str(manifest_path)})
        return _read_json(manifest_path)

    # -- stages

    def pair(self, key: str, path: Path, manifest: dict) -> None:
        if ("pair", key) in self.seen:
            return
        self.seen.add(("pair", key))
        pairs_file = path / "pairs.parquet"
        if pairs_file.is_file():
            df = pd.read_parquet(pairs_file)
            df["artifact_key"] = key
            self.rows["pair_data"].append(df)
        stats = _read_json(path / "stats.json") if (path / "stats.json").is_file() else {}
        config = manifest.get("config") or {}
        pairing = config.get("pairing") or config
        # stats.json holds the edges actually used (quantile edges too); the config is the fallback
        edges = _find_key(stats, "bucket_edges")
        if edges is None:
            edges = pairing.get("bucket_edges")
        self.rows["pairings"].append({
            "artifact_key": key, "artifact_path": str(path),
            "unit": _find_key(stats, "bucket_unit") or pairing.get("unit"),
            "bucket_edges": json.dumps(edges),
            "bucket_labels": json.dumps(_find_key(stats, "bucket_labels") or pairing.get("bucket_labels")),
        })

    def train(self, ident: dict, key: str, path: Path) -> None:
        if (path / "metrics.jsonl").is_file():
            long = [{"step": r.get("step"), "metric": name, "value": value}
                    for r in _read_jsonl(path / "metrics.jsonl")
                    for name, value in numeric_leaves({k: v for k, v in r.items() if k != "step"})]
            if long:
                self.frame("steps", ident, pd.DataFrame(long), key)
        if (path / "trajectories.jsonl").is_file():
            probes = pd.DataFrame(_read_jsonl(path / "trajectories.jsonl"))
            if len(probes):
                self.frame("probes", ident, probes, key)
                last = probes[probes["step"] == probes["step"].max()]
                for column in ("chosen_shift", "rejected_shift", "chosen_logit_shift", "rejected_logit_shift"):
                    if column in last:
                        self.result(ident, "train", f"probes/final/{column}", float(last[column].mean()), key, str(path))
                        if "bucket" in last:
                            for bucket, group in last.groupby("bucket"):
                                self.result(ident, "train", f"probes/final/{bucket}/{column}",
                                            float(group[column].mean()), key, str(path))
        if (path / "summary.json").is_file():
            for name, value in numeric_leaves(_read_json(path / "summary.json")):
                self.result(ident, "train", name, value, key, str(path))

    def evaluate(self, ident: dict, key: str, path: Path) -> None:
        if (path / "scores.json").is_file():
            scores = _read_json(path / "scores.json")
            for name, value in numeric_leaves(scores.get("tasks") or {}, "eval"):
                self.result(ident, "evaluate", name, value, key, str(path))
            if isinstance(scores.get("average"), (int, float)):
                self.result(ident, "evaluate", "eval/average", float(scores["average"]), key, str(path))
            for task, metric in (scores.get("headline") or {}).items():
                self.rows["headlines"].append({"artifact_key": key, "task": task, "metric": metric})
        items = item_scores(path / "samples")
        if len(items):
            self.frame("items", ident, items, key)
        if (path / "preference.json").is_file():
            for name, value in numeric_leaves(_read_json(path / "preference.json"), "pref"):
                self.result(ident, "evaluate", name, value, key, str(path))
        if (path / "preference_pairs.parquet").is_file():
            pairs = pd.read_parquet(path / "preference_pairs.parquet")
            self.frame("pairs", ident, pairs, key)
            for name, value in pair_summaries(pairs):
                self.result(ident, "evaluate", name, value, key, str(path))


def item_scores(samples_dir: Path) -> pd.DataFrame:
    """task, doc_id, metric, value: lm-eval's per-item scores from its logged samples. A sample lists its metrics
    (``"metrics": ["acc", "acc_norm"]``) and holds each value under that name, once per filter; a filter other
    than "none" is appended as ``scores.json`` names it (``exact_match`` + ``strict-match``)."""
    rows = []
    for file in sorted(samples_dir.glob("*.jsonl")) if samples_dir.is_dir() else []:
        for sample in _read_jsonl(file):
            suffix = "" if sample.get("filter", "none") == "none" else f"_{sample['filter']}"
            for metric in sample.get("metrics") or []:
                value = sample.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append({"task": file.stem, "doc_id": int(sample["doc_id"]), "metric": metric + suffix,
                                 "value": float(value)})
    return pd.DataFrame(rows, columns=["task", "doc_id", "metric", "value"])


PAIR_SUMMARY_COLUMNS = {
    "reward_correct": "reward_accuracy", "rho_chosen": "rho_chosen_mean", "rho_rejected": "rho_rejected_mean",
    "margin": "margin_mean", "chosen_after_diff_mean_logp": "chosen_after_diff_mean_logp",
    "ref_chosen_after_diff_mean_logp": "ref_chosen_after_diff_mean_logp",
    "chosen_logit_shift": "chosen_logit_shift_mean", "rejected_logit_shift": "rejected_logit_shift_mean",
}


def pair_summaries(pairs: pd.DataFrame) -> list[tuple[str, float]]:
    """Means over held-out pairs, overall and per bucket: ``pairs/<name>``, ``pairs/<bucket>/<name>``."""
    out = []
    groups = [("", pairs)] + ([(f"{b}/", g) for b, g in pairs.groupby("bucket")] if "bucket" in pairs else [])
    for prefix, group in groups:
        for column, name in PAIR_SUMMARY_COLUMNS.items():
            if column in group and group[column].notna().any():
                out.append((f"pairs/{prefix}{name}", float(group[column].astype(float).mean())))
    return out


# ----------------------------------------------------------------------------- entry points

def artifact_location(stage: str, info: dict, run_dir: Path | None, store: Path | None) -> Path:
    """Where a run record's artifact is now. A store and its run folders may have moved together (the record's
    ``relpath`` is relative to its run folder) or apart (``store``: the store's new root, ``<stage>/<key>`` below
    it); the absolute ``path`` it was written under is the last resort."""
    candidates = []
    if store is not None and info.get("key"):
        candidates.append(Path(store) / stage / str(info["key"]))
    if run_dir is not None and info.get("relpath"):
        candidates.append(Path(run_dir) / info["relpath"])
    if info.get("path"):
        candidates.append(Path(info["path"]))
    found = next((c for c in candidates if (c / MANIFEST).is_file()), None)
    return found or (candidates[-1] if candidates else Path(""))


def collect_records(records: list[tuple[str, dict, Path | None]], store: Path | str | None = None) -> dict[str, pd.DataFrame]:
    """Tables from in-memory run records: ``(job name, run.json content, run dir or None)``; ``store``: the
    artifact store's root when it is no longer where the records say (see ``artifact_location``)."""
    store = Path(store) if store is not None else None
    jobs = [_job_row(job, record, run_dir) for job, record, run_dir in records]
    for row, label in zip(jobs, _labels(jobs, [r.get("config") or {} for _, r, _ in records])):
        row["label"] = label
    collector = _Collector()
    baselines: list[tuple[str, str]] = []
    for row, (_, record, run_dir) in zip(jobs, records):
        ident = {column: row[column] for column in IDENTITY}
        if row["status"] == "failed":
            collector.result(ident, None, None, None, None, None)
            continue
        for stage, info in (record.get("artifacts") or {}).items():
            key, path = info.get("key"), artifact_location(stage, info, run_dir, store)
            manifest = collector.manifest(row["job"], stage, key, path)
            if manifest is None:
                continue
            if stage == "pair":
                collector.pair(key, path, manifest)
            elif stage == "train":
                collector.train(ident, key, path)
            elif stage == "evaluate":
                collector.evaluate(ident, key, path)
                baseline = manifest.get("baseline") or {}
                row["key/baseline"] = baseline.get("key")  # the base model's evaluation this one compares with
                if baseline.get("key") and baseline["key"] not in {k for k, _ in baselines}:
                    # the base model's artifact sits beside the trained one's in the same store
                    beside = {"key": baseline["key"], "path": baseline.get("path"),
                              "relpath": str(Path("..") / baseline["key"])}
                    baselines.append((baseline["key"], artifact_location("evaluate", beside, path, store)))
    for key, path in baselines:  # the base model's row, once per distinct baseline artifact
        job = REFERENCE if len(baselines) == 1 else f"{REFERENCE}:{key}"
        ident = {"job": job, "status": "ok", "method": REFERENCE, "label": job, "beta": None,
                 "lambda_": None, "bucket_filter": None, "seed": None}
        if collector.manifest(job, "evaluate", key, path) is not None:
            collector.evaluate(ident, key, path)
            jobs.insert(0, {**ident, "error": None, "run_dir": None, "config": None, "overrides": None,
                            "key/evaluate": key})
    return _frames(jobs, collector.rows)


def _frames(jobs: list[dict], rows: dict[str, list]) -> dict[str, pd.DataFrame]:
    jobs_df = pd.DataFrame(jobs)
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(jobs_df["method"]))}
    ranked = jobs_df.assign(_m=jobs_df["method"].map(method_rank).where(jobs_df["method"] != REFERENCE, -1))
    ranked = ranked.sort_values(["_m", "beta", "lambda_", "bucket_filter", "seed"], na_position="first", kind="stable")
    label_rank = {label: i for i, label in enumerate(dict.fromkeys(ranked["label"]))}
    jobs_df["label_rank"] = jobs_df["label"].map(label_rank)
    tables = {"jobs": jobs_df}
    for name in TABLES[1:]:
        items = rows[name]
        if name in ("steps", "probes", "pairs", "items", "pair_data"):
            tables[name] = pd.concat(items, ignore_index=True) if items else pd.DataFrame()
        else:
            tables[name] = pd.DataFrame(items)
    if tables["results"].empty:
        tables["results"] = pd.DataFrame(columns=RESULT_COLUMNS)
    tables["results"] = tables["results"][RESULT_COLUMNS]
    return tables


def collect(source: Path | str, store: Path | str | None = None) -> dict[str, pd.DataFrame]:
    """Tables for a run dir or a sweep dir (see the module docstring); ``store``: the store's root if it moved."""
    records = [(job, _read_json(path), path.parent) for job, path in find_run_records(source)]
    return collect_records(records, store)


def save_tables(tables: dict[str, pd.DataFrame], out_dir: Path | str) -> list[Path]:
    """``results.parquet`` + ``results.csv`` and one Parquet file per other table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in tables.items():
        df = df.copy()
        for column in df.columns:  # Parquet wants one type per column; mixed objects become text
            if df[column].dtype == object and df[column].map(type).nunique() > 1:
                df[column] = df[column].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        df.to_parquet(out_dir / f"{name}.parquet", index=False)
        written.append(out_dir / f"{name}.parquet")
    tables["results"].to_csv(out_dir / "results.csv", index=False)
    written.append(out_dir / "results.csv")
    return written


def write_tables(source: Path | str, out_dir: Path | str) -> dict[str, pd.DataFrame]:
    """Collect ``source`` and save its tables into ``out_dir``; returns the tables."""
    tables = collect(source)
    save_tables(tables, out_dir)
    return tables

