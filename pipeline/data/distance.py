"""Edit distances between chosen and rejected responses, and edit-distance buckets.

Smaug (docs/losses.md, Edit distances) does not pin the unit, so every pair gets four numbers:
character Levenshtein and token Levenshtein (token ids of the training tokenizer, or
a regex tokenizer when no model is configured), each raw and normalised by the
longer of the two responses. All pairwise work runs in rapidfuzz's C++ ``cpdist``
on all cores; Python only maps tokens to ids and does numpy arithmetic. A pair too long for an exact
distance in bounded time (``len x len`` above ``distance_bounds.EXACT_CELLS``, e.g. two 50,000-character
responses) gets a banded exact distance, or beyond the band an upper bound, with one line
(pipeline/data/distance_bounds.py).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from pipeline.data.distance_bounds import EXACT_CELLS, bounded_levenshtein, is_long
from pipeline.errors import UserError

UNITS = ("char_ned", "token_ned", "char_distance", "token_distance")
# Words, numbers and single punctuation marks; whitespace separates but is not a token.
FALLBACK_TOKEN = re.compile(r"\d+|[^\W\d_]+|[^\w\s]|_")

Tokenize = Callable[[list[str]], list[list[int]]]


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance of two strings or two sequences of hashables (token ids)."""
    return int(Levenshtein.distance(a, b))


def pairwise_distances(a: Sequence[Sequence], b: Sequence[Sequence]) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise Levenshtein of ``a[i]`` vs ``b[i]``: (raw distance, distance / max length)."""
    if len(a) != len(b):
        raise ValueError(f"pairwise_distances: {len(a)} vs {len(b)} sequences")
    if len(a) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    # Very long pairs would take hours exactly (cost grows as len^2): banded, else bounded (distance_bounds.py).
    long = [i for i in range(len(a)) if is_long(a[i], b[i])]
    if long:
        raw = np.zeros(len(a), dtype=np.int64)
        short = sorted(set(range(len(a))) - set(long))
        if short:
            raw[short] = process.cpdist([a[i] for i in short], [b[i] for i in short], scorer=Levenshtein.distance,
                                        workers=-1).astype(np.int64)
        approximate = 0
        for i in long:
            raw[i], exact = bounded_levenshtein(a[i], b[i])
            approximate += not exact
        if approximate:
            print(f"[pair] {approximate} pair(s) too long for an exact edit distance (len x len > "
                  f"{EXACT_CELLS:.2g}) and further apart than the band: an upper bound is used "
                  "(pipeline/data/distance_bounds.py)", flush=True)
    else:
        raw = process.cpdist(a, b, scorer=Levenshtein.distance, workers=-1).astype(np.int64)
    longer = np.maximum(np.fromiter(map(len, a), np.int64, len(a)), np.fromiter(map(len, b), np.int64, len(b)))
    ned = np.divide(raw, longer, out=np.zeros(len(a), dtype=np.float64), where=longer > 0)
    return raw, ned


def fallback_tokenize(texts: list[str]) -> list[list[int]]:
    """Tokenizer-free token ids: regex word/number/punctuation tokens mapped to ids by first sight.

    Ids are only compared within one call, so a per-call vocabulary is enough.
    """
    vocabulary: dict[str, int] = {}
    lookup = vocabulary.setdefault
    return [[lookup(tok, len(vocabulary)) for tok in FALLBACK_TOKEN.findall(text)] for text in texts]


def hf_tokenize(tokenizer) -> Tokenize:
    """Batch tokenisation of responses with an HF tokenizer, without special tokens (token ids only: no
    attention masks or type ids are built)."""
    def tokenize(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
    return tokenize


def edit_distances(chosen: list[str], rejected: list[str], tokenize: Tokenize = fallback_tokenize,
                   chunk: int | None = None) -> dict[str, np.ndarray]:
    """The four distance columns of every pair (chosen[i] vs rejected[i]).

    ``chunk``: pairs per tokenizer call, so that what a call builds (an HF tokenizer keeps a few KB per
    text until the call returns) stays bounded; the distances do not depend on it (both sides of a pair
    are always tokenised in the same call, so fallback ids agree).
    """
    if chunk and len(chosen) > chunk:
        parts = [edit_distances(chosen[i:i + chunk], rejected[i:i + chunk], tokenize) for i in range(0, len(chosen), chunk)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    char_distance, char_ned = pairwise_distances(chosen, rejected)
    # One tokenizer call for both sides: half the per-call overhead, and shared fallback ids.
    ids = tokenize(list(chosen) + list(rejected))
    token_distance, token_ned = pairwise_distances(ids[: len(chosen)], ids[len(chosen):])
    return {"char_distance": char_distance, "char_ned": char_ned,
            "token_distance": token_distance, "token_ned": token_ned}


def resolve_edges(values: np.ndarray, edges: Sequence[float] | None, quantiles: int | None) -> np.ndarray:
    """Bucket edges: the given ones, or ``quantiles`` equal-count buckets of ``values``."""
    if edges is not None:
        result = np.asarray(list(edges), dtype=np.float64)
        if result.ndim != 1 or len(result) < 2 or np.any(np.diff(result) <= 0):
            raise UserError(f"pairing.bucket_edges={list(edges)}: expected at least two strictly increasing numbers")
        return result
    if not quantiles or int(quantiles) < 1:
        raise UserError(f"pairing.quantiles={quantiles!r}: expected an integer >= 1 when pairing.bucket_edges is null")
    if len(values) == 0:
        return np.array([0.0, 1.0])
    result = np.quantile(values, np.linspace(0.0, 1.0, int(quantiles) + 1))
    unique = np.unique(result)
    if len(unique) < len(result):
        # Many pairs share one value (e.g. distance 1): a value cannot sit in two buckets, so edges merge.
        print(f"[pair] note: {int(quantiles)} quantile buckets merge into {max(1, len(unique) - 1)} "
              f"because of tied distances (edges {unique.round(4).tolist()})", flush=True)
    return unique if len(unique) >= 2 else np.array([unique[0], unique[0] + 1.0])


def bucket_labels(edges: np.ndarray, labels: Sequence[str] | None) -> list[str]:
    """Names of the len(edges)-1 buckets: the given ones, low/high for two, else b0, b1, ..."""
    count = len(edges) - 1
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != count:
            raise UserError(f"pairing.bucket_labels={labels}: expected {count} names for edges "
                            f"{edges.round(4).tolist()} (quantile edges merge when many pairs share a distance)")
        return labels
    return ["low", "high"] if count == 2 else [f"b{i}" for i in range(count)]


def assign_buckets(values: np.ndarray, edges: np.ndarray, labels: list[str]) -> np.ndarray:
    """Bucket i holds edges[i] <= value < edges[i+1]; the last bucket includes its upper edge.

    Values below the first edge or above the last fall into the first or last bucket,
    so every pair gets a bucket (raw distances have no natural upper bound).
    """
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    return np.asarray(labels, dtype=object)[index]


def distances_and_buckets(
    chosen: list[str],
    rejected: list[str],
    tokenize: Tokenize = fallback_tokenize,
    unit: str = "char_ned",
    edges: Sequence[float] | None = (0.0, 0.2, 1.0),
    quantiles: int | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """What the pairing stage computes per pair: distance columns (+ ``bucket``), edges, labels."""
    check_unit(unit)
    columns = edit_distances(chosen, rejected, tokenize)
    columns["bucket"], resolved, names = bucket_columns(columns, unit, edges, quantiles, labels)
    return columns, resolved, names


def check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise UserError(f"pairing.unit={unit!r}: expected one of {list(UNITS)}")


def bucket_columns(
    columns: dict[str, np.ndarray],
    unit: str,
    edges: Sequence[float] | None,
    quantiles: int | None,
    labels: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The bucket of every pair from its distance columns (all pairs at once: quantile edges need them
    all), with the edges and bucket names."""
    check_unit(unit)
    resolved = resolve_edges(columns[unit], edges, quantiles)
    names = bucket_labels(resolved, labels)
    return assign_buckets(columns[unit], resolved, names), resolved, names
