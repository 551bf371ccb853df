"""Stage "pair": preference pairs with edit distances, buckets and a train/test split.

Reads ``data.*`` (where pairs come from, see pipeline/adapters.py and pipeline/synthetic.py),
``pairing.*`` (distance unit, buckets, split, prompt rendering) and the model artifact's
tokenizer (token distances and the chat template). Without a model upstream it falls back
to regex tokens and plain-text prompts.

Artifact files:
- ``pairs.parquet``: pair_id, prompt (what the model conditions on), raw_prompt, chosen,
  rejected, source, kind, split, char_distance, char_ned, token_distance, token_ned, bucket
  (+ row: the source row, prompt_messages: JSON of the chat context or null).
- ``unpaired.parquet`` (schema ``unpaired`` only): row_id, prompt, raw_prompt, completion, label, split.
- ``stats.json``: rows read/kept/skipped by reason, duplicates, pairs per kind/bucket/split, prompts per split, quantiles.
- ``histogram.png``: char_ned and token_ned histograms with the bucket edges.
- synthetic data only: ``eval_mc.jsonl`` and ``eval_gen.jsonl``, held-out problems.

``pairing.bucket_filter`` is applied by the train stage, not here: the pairs (and so the
reference log-probs and the base model's evaluation) are shared by runs that train on different
buckets, and every run is evaluated on the test pairs of every bucket.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.adapters import Loaded, adapt, load_hub, load_local
from pipeline.artifacts import Artifact, build
from pipeline.distance import distances_and_buckets, fallback_tokenize, hf_tokenize
from pipeline.errors import UserError
from pipeline.hub_revision import resolve_revision

STAGE = "pair"
SOURCES = ("synthetic", "local", "hub")
SYNTHETIC_KEYS = ("name", "source", "seed", "num_problems", "num_eval_items", "kind_mix")
HUB_KEYS = ("hub_id", "split", "revision")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
DISTANCES = ("char_distance", "char_ned", "token_distance", "token_ned")


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def split_of(prompt: str, test_fraction: float) -> str:
    """"train" or "test" for every pair (and unpaired row) of this prompt.

    Drawn per PROMPT, not per pair: a question with several pairs (multiple-choice distractors,
    best-vs-each completions) must not have pairs on both sides, or held-out pairs would share
    their prompt and chosen answer with training pairs. A stable hash of the prompt text alone, so
    adding rows never moves existing prompts.
    """
    draw = int(hashlib.sha256(f"split:{prompt}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if draw < test_fraction else "train"


def config_subset(cfg: DictConfig) -> dict[str, Any]:
    """data.* keys that change the output (generator keys or adapter keys, never a path) + pairing.*.

    ``data.name`` is a label, but the artifact carries it (the ``source`` column of pairs.parquet, which
    figure F1 titles its panels with), so it stays in the key: an artifact never holds a label its key
    does not name. Renaming a dataset recomputes the pairs (seconds); the reference, keyed by the
    scored text, is reused. The hub revision enters as given here; ``resolved_subset`` makes it a commit.
    """
    data = OmegaConf.to_container(cfg.data, resolve=True)
    source = data.get("source")
    if source not in SOURCES:
        raise UserError(f"data.source={source!r}: expected one of {list(SOURCES)}")
    if source == "synthetic":
        data = {k: data.get(k) for k in SYNTHETIC_KEYS}
    else:
        unused = HUB_KEYS if source == "local" else ("path",)  # the other source's location keys
        data = {k: v for k, v in data.items()
                if (k not in SYNTHETIC_KEYS or k in ("name", "source")) and k not in unused}
        if source == "local":
            if not data.get("path"):
                raise UserError("data.path: required for data.source=local (a JSONL, JSON, Parquet or CSV file)")
            # The file's content, not its location, decides the output: moving a file keeps the key.
            data["path"] = "sha256:" + load_local_fingerprint(data["path"])
        elif not data.get("hub_id"):
            raise UserError("data.hub_id: required for data.source=hub (a hub dataset id, e.g. Anthropic/hh-rlhf)")
    pairing = OmegaConf.to_container(cfg.pairing, resolve=True)
    pairing.pop("bucket_filter", None)  # a train-stage setting: runs on different buckets share these pairs
    return {"data": data, "pairing": pairing}


def resolved_subset(cfg: DictConfig) -> dict[str, Any]:
    """``config_subset`` with a hub dataset's revision (null = "main") resolved to its commit sha: a
    re-uploaded dataset gets a new key, and the artifact records the commit it was read at."""
    subset = config_subset(cfg)
    data = subset["data"]
    if data["source"] == "hub":
        data["revision"] = resolve_revision(str(data["hub_id"]), data.get("revision"), "dataset", "data.revision")
    return subset


def load_local_fingerprint(path: str) -> str:
    from pipeline.artifacts import sha256_file
    candidate = Path(path).expanduser()
    if not candidate.is_file():
        raise UserError(f"data.path={path}: file not found")
    return sha256_file(candidate)


def load_tokenizer_of(upstream: dict[str, Artifact]):
    model = upstream.get("model")
    if model is None:
        return None
    from pipeline.models import load_tokenizer
    return load_tokenizer(model)


def render_prompts(raw: list[str], messages: list[list[dict] | None], tokenizer, apply_template: bool) -> list[str]:
    if tokenizer is None or not apply_template:
        return list(raw)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("pairing.apply_chat_template=true but the model's tokenizer has no chat template; "
                        "set pairing.apply_chat_template=false")
    return [tokenizer.apply_chat_template(m or [{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
            for r, m in zip(raw, messages)]


def load_records(data: DictConfig, revision: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(pairs, unpaired rows, stats so far, synthetic extras) from the configured source (a hub dataset at
    commit ``revision``)."""
    if data.source == "synthetic":
        from pipeline.synthetic import generate
        generated = generate(int(data.seed), int(data.num_problems), int(data.num_eval_items),
                             OmegaConf.to_container(data.kind_mix, resolve=True))
        pairs = [{**p, "messages": None, "row": i + 1} for i, p in enumerate(generated["pairs"])]
        stats = {"source": "synthetic", "schema": "synthetic_math", "rows_read": len(pairs), "skipped": {}, "bad_rows": []}
        return pairs, [], stats, generated
    limit = int(data.limit) if data.get("limit") else None
    loaded: Loaded = (load_local(data.path, limit) if data.source == "local"
                      else load_hub(data.hub_id, data.split, limit, revision=revision))
    opts = {"strategy": data.multi_completion_strategy, "min_score_gap": data.min_score_gap,
            "assistant_marker": data.transcript.assistant_marker, "human_marker": data.transcript.human_marker}
    adapted = adapt(loaded, str(data.schema), OmegaConf.to_container(data.columns, resolve=True), opts)
    skipped = sum(adapted.skipped.values())
    if skipped > float(data.max_bad_fraction) * adapted.rows_read:
        first = ", ".join(f"row {r} ({why})" for r, why in adapted.bad_rows[:5])
        raise UserError(f"{loaded.origin}: {skipped} of {adapted.rows_read} rows skipped, more than "
                        f"data.max_bad_fraction={data.max_bad_fraction}; first: {first}")
    stats = {"source": data.source, "origin": loaded.origin, **({"revision": revision} if revision else {}),
             "schema": adapted.schema, "rows_read": adapted.rows_read,
             "skipped": dict(adapted.skipped), "bad_rows": adapted.bad_rows[:20]}
    return adapted.pairs, adapted.unpaired, stats, {}


def build_pairs_frame(pairs: list[dict[str, Any]], prompts: list[str], source: str, test_fraction: float) -> tuple[pd.DataFrame, int]:
    frame = pd.DataFrame({
        "pair_id": [short_hash(p["raw_prompt"], p["chosen"], p["rejected"]) for p in pairs],
        "prompt": prompts,
        "raw_prompt": [p["raw_prompt"] for p in pairs],
        "chosen": [p["chosen"] for p in pairs],
        "rejected": [p["rejected"] for p in pairs],
        "source": source,
        "kind": [p["kind"] for p in pairs],
        "row": np.asarray([p["row"] for p in pairs], dtype=np.int64),
        "prompt_messages": [json.dumps(p["messages"]) if p.get("messages") else None for p in pairs],
    })
    before = len(frame)
    frame = frame.drop_duplicates("pair_id", keep="first").reset_index(drop=True)
    frame.insert(7, "split", [split_of(p, test_fraction) for p in frame["raw_prompt"]])
    return frame, before - len(frame)


def write_unpaired(rows: list[dict[str, Any]], tokenizer, pairing: DictConfig, path: Path) -> int:
    raw = [r["raw_prompt"] for r in rows]
    ids = [short_hash(r["raw_prompt"], r["completion"], str(r["label"])) for r in rows]
    frame = pd.DataFrame({
        "row_id": ids,
        "prompt": render_prompts(raw, [r["messages"] for r in rows], tokenizer, bool(pairing.apply_chat_template)),
        "raw_prompt": raw, "completion": [r["completion"] for r in rows], "label": [bool(r["label"]) for r in rows],
        "split": [split_of(p, float(pairing.test_fraction)) for p in raw],
    }).drop_duplicates("row_id")
    frame.to_parquet(path, index=False)
    return len(frame)


def quantiles(values: pd.Series) -> dict[str, float]:
    if values.empty:
        return {}
    return {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(values.to_numpy(), QUANTILES))}


def plot_histogram(frame: pd.DataFrame, unit: str, edges: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = ["char_ned", "token_ned"] + ([unit] if unit not in ("char_ned", "token_ned") else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for axis, column in zip(np.atleast_1d(axes), panels):
        bins = np.linspace(0.0, 1.0, 51) if column.endswith("_ned") else 40  # same bins for every kind
        for kind, group in frame.groupby("kind"):
            axis.hist(group[column], bins=bins, alpha=0.6, label=str(kind))
        if column == unit:
            for edge in edges:
                axis.axvline(edge, color="black", linestyle="--", linewidth=1)
        axis.set_xlabel(column + (" (bucket unit)" if column == unit else ""))
        axis.set_ylabel("pairs")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def run(cfg: DictConfig, upstream: dict[str, Artifact], root: Path) -> Artifact:
    subset = resolved_subset(cfg)
    model_upstream = {"model": upstream["model"]} if "model" in upstream else {}

    def compute(workdir: Path) -> dict[str, Any]:
        data, pairing = cfg.data, cfg.pairing
        pairs, unpaired, stats, extras = load_records(data, subset["data"].get("revision"))
        tokenizer = load_tokenizer_of(model_upstream)
        stats["tokenizer"] = "model" if tokenizer is not None else "regex_fallback"
        stats["prompt_format"] = "chat_template" if tokenizer is not None and pairing.apply_chat_template else "plain"
        if unpaired:
            stats["unpaired_rows"] = write_unpaired(unpaired, tokenizer, pairing, workdir / "unpaired.parquet")
        if not pairs and not unpaired:
            raise UserError(f"data ({stats.get('origin', data.source)}): no usable pairs left after skipping rows {stats['skipped']}")
        prompts = render_prompts([p["raw_prompt"] for p in pairs], [p["messages"] for p in pairs], tokenizer,
                                 bool(pairing.apply_chat_template))
        frame, duplicates = build_pairs_frame(pairs, prompts, str(data.name), float(pairing.test_fraction))
        if duplicates:
            print(f"[pair] {duplicates} duplicate pair(s) dropped (same prompt, chosen and rejected as an earlier row); "
                  f"{len(frame)} pairs kept", flush=True)
        tokenize = hf_tokenize(tokenizer) if tokenizer is not None else fallback_tokenize
        edges_cfg = OmegaConf.to_container(pairing.bucket_edges) if pairing.bucket_edges is not None else None
        labels_cfg = OmegaConf.to_container(pairing.bucket_labels) if pairing.bucket_labels is not None else None
        columns, edges, labels = distances_and_buckets(frame["chosen"].tolist(), frame["rejected"].tolist(), tokenize,
                                                       str(pairing.unit), edges_cfg, pairing.quantiles, labels_cfg)
        for name, values in columns.items():
            frame[name] = values
        frame.to_parquet(workdir / "pairs.parquet", index=False)
        if len(frame):
            plot_histogram(frame, str(pairing.unit), edges, workdir / "histogram.png")
        if extras:
            write_jsonl(workdir / "eval_mc.jsonl", extras["eval_mc"])
            write_jsonl(workdir / "eval_gen.jsonl", extras["eval_gen"])
            stats["eval_items"] = {"mc": len(extras["eval_mc"]), "gen": len(extras["eval_gen"])}
        stats.update({
            "pairs_kept": len(frame), "duplicates_removed": duplicates,
            "rows_skipped": sum(stats["skipped"].values()),
            "pairs_per_kind": dict(Counter(frame["kind"])), "pairs_per_bucket": dict(Counter(frame["bucket"])),
            "pairs_per_split": dict(Counter(frame["split"])),
            "prompts_per_split": {str(k): int(v) for k, v in frame.groupby("split")["raw_prompt"].nunique().items()},
            "pairs_per_kind_bucket": {f"{k}/{b}": int(n) for (k, b), n in frame.groupby(["kind", "bucket"]).size().items()},
            "bucket_unit": str(pairing.unit), "bucket_edges": edges.tolist(), "bucket_labels": labels,
            "quantiles": {name: quantiles(frame[name]) for name in DISTANCES},
            "median_per_kind": {name: {str(k): float(v) for k, v in frame.groupby("kind")[name].median().items()}
                                for name in DISTANCES},
        })
        (workdir / "stats.json").write_text(json.dumps(stats, indent=2, default=int))
        return {"pairs": len(frame), "schema": stats["schema"]}

    return build(root, STAGE, subset, model_upstream, compute)


def load_pairs(artifact: Artifact, split: str | None = None) -> pd.DataFrame:
    """The pairs of a pair artifact, optionally one split ("train" or "test")."""
    frame = pd.read_parquet(artifact.path / "pairs.parquet")
    return frame if split is None else frame[frame["split"] == split].reset_index(drop=True)
