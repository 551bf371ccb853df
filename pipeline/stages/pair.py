"""Stage "pair": preference pairs with edit distances, buckets and a train/test split.

Reads ``data.*`` (where pairs come from, see pipeline/data/adapters.py and pipeline/data/synthetic.py),
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

Memory: the source is read twice, ``BATCH_ROWS`` rows at a time, and never held whole (JSONL and Parquet
files are read as they go, see ``pipeline.data.readers.Source``). Pass one adapts and hashes every pair and
computes its distances, keeping a few dozen bytes per pair (``Scan``); duplicates and quantile edges are
then decided over all pairs. Pass two renders the kept pairs' prompts and writes pairs.parquet row group
by row group (``ParquetRows``). The artifact does not depend on the batch sizes.

``pairing.bucket_filter`` is applied by the train stage, not here: the pairs (and so the
reference log-probs and the base model's evaluation) are shared by runs that train on different
buckets, and every run is evaluated on the test pairs of every bucket.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.data.adapt_source import AdaptedStream
from pipeline.data.readers import Source, open_hub, open_local
from pipeline.store.artifacts import Artifact, build
from pipeline.store.artifact_reads import read_artifact_file
from pipeline.data.distance import (bucket_columns, distances_and_buckets, edit_distances, fallback_tokenize, hf_tokenize)
from pipeline.data.pair_ids import id_number, prompt_digest, short_hash, split_from_digest, split_of
from pipeline.data.parquet_rows import ParquetRows, frame_schema
from pipeline.errors import UserError
from pipeline.store.input_guard import require_content
from pipeline.store.hub_revision import resolve_revision

STAGE = "pair"
SOURCES = ("synthetic", "local", "hub")
SYNTHETIC_KEYS = ("name", "source", "seed", "num_problems", "num_eval_items", "eval_choices", "eval_max_operand", "kind_mix")
HUB_KEYS = ("hub_id", "subset", "split", "revision")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
DISTANCES = ("char_distance", "char_ned", "token_distance", "token_ned")
# Memory: the stage reads its source twice, BATCH_ROWS rows at a time, and never holds all its text.
BATCH_ROWS = 4096           # source rows read, adapted, hashed and measured (pass one) or written (pass two) at once
DISTANCE_CHUNK = 1024       # pairs per tokenizer call










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
    from pipeline.store.artifacts import sha256_file
    candidate = Path(path).expanduser()
    if not candidate.is_file():
        raise UserError(f"data.path={path}: file not found")
    return sha256_file(candidate)


def load_tokenizer_of(upstream: dict[str, Artifact]):
    model = upstream.get("model")
    if model is None:
        return None
    from pipeline.modeling.models import load_tokenizer
    return load_tokenizer(model)


def render_prompts(raw: list[str], messages: list[list[dict] | None], tokenizer, apply_template: bool) -> list[str]:
    if tokenizer is None or not apply_template:
        return list(raw)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("pairing.apply_chat_template=true but the model's tokenizer has no chat template; "
                        "set pairing.apply_chat_template=false")
    return [tokenizer.apply_chat_template(m or [{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
            for r, m in zip(raw, messages)]


class GeneratedStream:
    """Generated pairs (already in the adapters' item shape), handed out in batches like an ``AdaptedStream``."""

    schema = "synthetic_math"
    origin = "synthetic data"

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def batches(self, check_all: bool = True) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, len(self.items), BATCH_ROWS):
            yield self.items[start:start + BATCH_ROWS]


def open_records(data: DictConfig, revision: str | None = None) -> tuple[AdaptedStream | GeneratedStream, dict[str, Any]]:
    """(the configured source's pairs or unpaired rows, batch by batch; synthetic extras) for a hub dataset
    at commit ``revision``. A file is only checked here; it is read when the stream is iterated."""
    if data.source == "synthetic":
        from pipeline.data.synthetic import generate
        generated = generate(int(data.seed), int(data.num_problems), int(data.num_eval_items),
                             OmegaConf.to_container(data.kind_mix, resolve=True),
                             eval_choices=int(data.eval_choices), eval_max_operand=int(data.eval_max_operand))
        pairs = [{**p, "messages": None, "row": i + 1} for i, p in enumerate(generated.pop("pairs"))]
        return GeneratedStream(pairs), generated
    limit = int(data.limit) if data.get("limit") else None
    source: Source = (open_local(data.path, limit) if data.source == "local"
                      else open_hub(data.hub_id, data.split, limit, revision=revision, subset=data.get("subset")))
    opts = {"strategy": data.multi_completion_strategy, "min_score_gap": data.min_score_gap,
            "assistant_marker": data.transcript.assistant_marker, "human_marker": data.transcript.human_marker}
    stream = AdaptedStream(source, str(data.schema), OmegaConf.to_container(data.columns, resolve=True), opts, BATCH_ROWS)
    return stream, {}


def read_stats(data: DictConfig, stream: AdaptedStream | GeneratedStream, rows: int, revision: str | None) -> dict[str, Any]:
    """Stats of reading and adapting (after a full pass), and the data.max_bad_fraction check."""
    if isinstance(stream, GeneratedStream):
        return {"source": "synthetic", "schema": "synthetic_math", "rows_read": rows, "skipped": {}, "bad_rows": []}
    counts = stream.counts
    skipped = sum(counts.skipped.values())
    if skipped > float(data.max_bad_fraction) * counts.rows_read:
        first = ", ".join(f"row {r} ({why})" for r, why in counts.bad_rows[:5])
        raise UserError(f"{stream.origin}: {skipped} of {counts.rows_read} rows skipped, more than "
                        f"data.max_bad_fraction={data.max_bad_fraction}; first: {first}")
    return {"source": data.source, "origin": stream.origin, **({"revision": revision} if revision else {}),
            "schema": counts.schema, "rows_read": counts.rows_read,
            "skipped": dict(counts.skipped), "bad_rows": counts.bad_rows[:20]}




@dataclass
class Scan:
    """The first pass over the pairs: a few dozen bytes per pair, never the texts.

    ``ids`` (pair_id as a number), ``kinds`` (index into ``kind_names``), ``messages`` (has a chat
    context), ``test`` (split), ``prompts`` (16 bytes of a hash of raw_prompt, for prompts per split) and
    ``columns`` (the four distances) hold one entry per pair in source order, duplicates included;
    ``unpaired`` the row_id numbers of unpaired rows.
    """
    ids: np.ndarray
    kinds: np.ndarray
    kind_names: list[str]
    messages: np.ndarray
    test: np.ndarray
    prompts: np.ndarray
    columns: dict[str, np.ndarray]
    unpaired: np.ndarray

    @staticmethod
    def first_occurrences(ids: np.ndarray) -> np.ndarray:
        """True for the first pair (or row) of each id, in order: what ``drop_duplicates(keep="first")`` keeps."""
        keep = np.zeros(len(ids), dtype=bool)
        keep[np.unique(ids, return_index=True)[1]] = True
        return keep


def scan_pairs(stream: AdaptedStream | GeneratedStream, tokenize, test_fraction: float) -> Scan:
    """Pass one: read and adapt every row, hash every pair and compute its distances, one batch at a time
    (what a batch builds, its tokenizer output above all, is dropped before the next one)."""
    parts: dict[str, list[Any]] = {name: [] for name in ("ids", "kinds", "messages", "test", "prompts", "unpaired", *DISTANCES)}
    kind_codes: dict[str, int] = {}
    for items in stream.batches():
        count = len(items)
        if stream.schema == "unpaired":
            parts["unpaired"].append(np.fromiter(
                (id_number(short_hash(r["raw_prompt"], r["completion"], str(r["label"]))) for r in items), np.uint64, count))
            continue
        parts["ids"].append(np.fromiter((id_number(short_hash(p["raw_prompt"], p["chosen"], p["rejected"])) for p in items),
                                        np.uint64, count))
        parts["kinds"].append(np.fromiter((kind_codes.setdefault(p["kind"], len(kind_codes)) for p in items), np.int32, count))
        parts["messages"].append(np.fromiter((bool(p.get("messages")) for p in items), bool, count))
        digests = [prompt_digest(p["raw_prompt"]) for p in items]
        parts["test"].append(np.fromiter((split_from_digest(d, test_fraction) == "test" for d in digests), bool, count))
        parts["prompts"].append(np.frombuffer(b"".join(d[:16] for d in digests), dtype=np.uint64).reshape(count, 2))
        columns = edit_distances([p["chosen"] for p in items], [p["rejected"] for p in items], tokenize, chunk=DISTANCE_CHUNK)
        for name in DISTANCES:
            parts[name].append(columns[name])
    empty = {"ids": np.uint64, "kinds": np.int32, "messages": bool, "test": bool, "unpaired": np.uint64,
             "char_distance": np.int64, "char_ned": np.float64, "token_distance": np.int64, "token_ned": np.float64}
    joined = {name: np.concatenate(chunks) if chunks else np.zeros(0, dtype=empty[name])
              for name, chunks in parts.items() if name != "prompts"}
    prompts = np.concatenate(parts["prompts"]) if parts["prompts"] else np.zeros((0, 2), dtype=np.uint64)
    return Scan(ids=joined["ids"], kinds=joined["kinds"], kind_names=list(kind_codes), messages=joined["messages"],
                test=joined["test"], prompts=prompts, columns={name: joined[name] for name in DISTANCES},
                unpaired=joined["unpaired"])


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


def unpaired_frame(rows: list[dict[str, Any]], tokenizer, pairing: DictConfig) -> pd.DataFrame:
    raw = [r["raw_prompt"] for r in rows]
    ids = [short_hash(r["raw_prompt"], r["completion"], str(r["label"])) for r in rows]
    return pd.DataFrame({
        "row_id": ids,
        "prompt": render_prompts(raw, [r["messages"] for r in rows], tokenizer, bool(pairing.apply_chat_template)),
        "raw_prompt": raw, "completion": [r["completion"] for r in rows], "label": [bool(r["label"]) for r in rows],
        "split": [split_of(p, float(pairing.test_fraction)) for p in raw],
    }).drop_duplicates("row_id")








def changed(origin: str) -> UserError:
    return UserError(f"{origin}: the data changed while the pair stage was reading it (the rows differ between its "
                     f"two passes); run again once it is complete")


def second_pass(stream: AdaptedStream | GeneratedStream, keep: np.ndarray, kept_ids: np.ndarray, path: Path,
                make_frame, id_column: str, schema=frame_schema) -> int:
    """Pass two, shared by pairs and unpaired rows: the kept items of each batch -> ``make_frame(selected,
    written)`` -> appended to ``path``. The frame's ids must be the next ``kept_ids`` (else the source changed
    between the passes); returns the rows written."""
    writer: ParquetRows | None = None
    index = written = 0
    for items in stream.batches(check_all=False):
        selected = [p for p, kept in zip(items, keep[index:index + len(items)]) if kept]
        index += len(items)
        if not selected:
            continue
        frame = make_frame(selected, written)
        stop = written + len(frame)
        ids = np.fromiter(map(id_number, frame[id_column]), np.uint64, len(frame))
        if stop > len(kept_ids) or not np.array_equal(ids, kept_ids[written:stop]):
            raise changed(stream.origin)
        written = stop
        writer = writer or ParquetRows(path, schema(frame))
        writer.write(frame)
    if index != len(keep) or written != len(kept_ids) or writer is None:
        raise changed(stream.origin)
    writer.close()
    return written


def write_unpaired_stream(stream: AdaptedStream, keep: np.ndarray, ids: np.ndarray, tokenizer, pairing: DictConfig,
                          path: Path) -> int:
    """Pass two for unpaired rows: the first row of each row_id, written batch by batch."""
    return second_pass(stream, keep, ids[keep], path, lambda selected, _: unpaired_frame(selected, tokenizer, pairing),
                       "row_id")


def write_pairs(stream: AdaptedStream | GeneratedStream, scan: Scan, keep: np.ndarray, columns: dict[str, np.ndarray],
                tokenizer, pairing: DictConfig, source: str, path: Path) -> None:
    """Pass two: the kept pairs with their prompts, split, distances and bucket, written batch by batch."""
    any_messages, kept_total = bool(scan.messages[keep].any()), int(keep.sum())

    def make_frame(selected: list[dict], written: int) -> pd.DataFrame:
        prompts = render_prompts([p["raw_prompt"] for p in selected], [p["messages"] for p in selected], tokenizer,
                                 bool(pairing.apply_chat_template))
        frame, dropped = build_pairs_frame(selected, prompts, source, float(pairing.test_fraction))
        if dropped or written + len(frame) > kept_total:  # not the pairs pass one kept
            raise changed(stream.origin)
        for name, values in columns.items():  # pass one's distances of exactly these pairs (ids checked after)
            frame[name] = values[written:written + len(frame)]
        return frame

    second_pass(stream, keep, scan.ids[keep], path, make_frame, "pair_id",
                lambda frame: frame_schema(frame, ("prompt_messages",) if any_messages else ()))


def pair_summary(scan: Scan, keep: np.ndarray, bucket: np.ndarray) -> pd.DataFrame:
    """The kept pairs' kind, split, bucket and distances: the columns of pairs.parquet that stats.json and
    the histogram are computed from (the same values and dtypes)."""
    return pd.DataFrame({
        "kind": np.asarray(scan.kind_names, dtype=object)[scan.kinds[keep]],
        "split": np.where(scan.test[keep], "test", "train").astype(object),
        **{name: scan.columns[name][keep] for name in DISTANCES},
        "bucket": bucket,
    })


def prompts_per_split(scan: Scan, keep: np.ndarray) -> dict[str, int]:
    """Distinct raw prompts per split (the split is drawn per prompt), as ``groupby("split").nunique()``."""
    prompts, test = scan.prompts[keep], scan.test[keep]
    return {name: int(len(np.unique(prompts[mask], axis=0))) for name, mask in (("test", test), ("train", ~test))
            if mask.any()}


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

    fingerprint = subset["data"]["path"] if subset["data"].get("source") == "local" else None

    def compute(workdir: Path) -> dict[str, Any]:
        data, pairing = cfg.data, cfg.pairing
        if fingerprint:  # hashed before the lock: the file may have been rewritten while this run waited
            require_content(data.path, fingerprint, "after the key was computed, before it was read")
        revision = subset["data"].get("revision")
        stream, extras = open_records(data, revision)
        tokenizer = load_tokenizer_of(model_upstream)
        tokenize = hf_tokenize(tokenizer) if tokenizer is not None else fallback_tokenize
        scan = scan_pairs(stream, tokenize, float(pairing.test_fraction))
        stats = read_stats(data, stream, len(scan.ids), revision)
        stats["tokenizer"] = "model" if tokenizer is not None else "regex_fallback"
        stats["prompt_format"] = "chat_template" if tokenizer is not None and pairing.apply_chat_template else "plain"
        if len(scan.unpaired):
            stats["unpaired_rows"] = write_unpaired_stream(stream, scan.first_occurrences(scan.unpaired), scan.unpaired,
                                                           tokenizer, pairing, workdir / "unpaired.parquet")
        if not len(scan.ids) and not len(scan.unpaired):
            raise UserError(f"data ({stats.get('origin', data.source)}): no usable pairs left after skipping rows {stats['skipped']}")
        render_prompts([], [], tokenizer, bool(pairing.apply_chat_template))  # a missing chat template fails here
        keep = scan.first_occurrences(scan.ids)
        kept = int(keep.sum())
        duplicates = len(keep) - kept
        if duplicates:
            print(f"[pair] {duplicates} duplicate pair(s) dropped (same prompt, chosen and rejected as an earlier row); "
                  f"{kept} pairs kept", flush=True)
        edges_cfg = OmegaConf.to_container(pairing.bucket_edges) if pairing.bucket_edges is not None else None
        labels_cfg = OmegaConf.to_container(pairing.bucket_labels) if pairing.bucket_labels is not None else None
        if kept:
            columns = {name: scan.columns[name][keep] for name in DISTANCES}
            columns["bucket"], edges, labels = bucket_columns(columns, str(pairing.unit), edges_cfg, pairing.quantiles,
                                                              labels_cfg)
            write_pairs(stream, scan, keep, columns, tokenizer, pairing, str(data.name), workdir / "pairs.parquet")
            frame = pair_summary(scan, keep, columns.pop("bucket"))
            del columns
            plot_histogram(frame, str(pairing.unit), edges, workdir / "histogram.png")
        else:  # no pairs (unpaired rows only): the empty table, as it always was
            frame, _ = build_pairs_frame([], [], str(data.name), float(pairing.test_fraction))
            columns, edges, labels = distances_and_buckets([], [], tokenize, str(pairing.unit), edges_cfg,
                                                           pairing.quantiles, labels_cfg)
            for name, values in columns.items():
                frame[name] = values
            frame.to_parquet(workdir / "pairs.parquet", index=False)
        if extras:
            write_jsonl(workdir / "eval_mc.jsonl", extras["eval_mc"])
            write_jsonl(workdir / "eval_gen.jsonl", extras["eval_gen"])
            stats["eval_items"] = {"mc": len(extras["eval_mc"]), "gen": len(extras["eval_gen"])}
        stats.update({
            "pairs_kept": len(frame), "duplicates_removed": duplicates,
            "rows_skipped": sum(stats["skipped"].values()),
            "pairs_per_kind": dict(Counter(frame["kind"])), "pairs_per_bucket": dict(Counter(frame["bucket"])),
            "pairs_per_split": dict(Counter(frame["split"])),
            "prompts_per_split": prompts_per_split(scan, keep),
            "pairs_per_kind_bucket": {f"{k}/{b}": int(n) for (k, b), n in frame.groupby(["kind", "bucket"]).size().items()},
            "bucket_unit": str(pairing.unit), "bucket_edges": edges.tolist(), "bucket_labels": labels,
            "quantiles": {name: quantiles(frame[name]) for name in DISTANCES},
            "median_per_kind": {name: {str(k): float(v) for k, v in frame.groupby("kind")[name].median().items()}
                                for name in DISTANCES},
        })
        (workdir / "stats.json").write_text(json.dumps(stats, indent=2, default=int))
        if fingerprint:
            require_content(data.path, fingerprint, "while the pair stage read it")
        return {"pairs": len(frame), "schema": stats["schema"]}

    return build(root, STAGE, subset, model_upstream, compute)


def load_pairs(artifact: Artifact, split: str | None = None) -> pd.DataFrame:
    """The pairs of a pair artifact, optionally one split ("train" or "test")."""
    frame = read_artifact_file(artifact.path / "pairs.parquet", pd.read_parquet)
    return frame if split is None else frame[frame["split"] == split].reset_index(drop=True)
