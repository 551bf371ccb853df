"""Pairs that truncation to ``train.max_length`` makes identical carry no preference: counted before training.

Chosen and rejected often share a long start and differ near their ends (low edit distance is the point
of the low bucket); cut to ``train.max_length`` tokens, both sides can become the same tokens, and the
pair's loss gradient is then zero. The train stage says how many of its pairs this hits, and refuses
when it is all of them.
"""

from __future__ import annotations

from typing import Any, Iterable

from pipeline.modeling.batching import PairEncoding
from pipeline.errors import UserError


def identical_after_truncation(encodings: Iterable[Any]) -> tuple[int, int]:
    """(pairs whose two sides are the same token ids, pairs) among ``encodings`` (one-sided rows are not pairs)."""
    pairs = [e for e in encodings if isinstance(e, PairEncoding)]
    return sum(e.chosen_ids == e.rejected_ids for e in pairs), len(pairs)


def check_truncated_pairs(encodings: Iterable[Any], max_length: int, max_prompt_length: int) -> None:
    same, total = identical_after_truncation(encodings)
    if not same:
        return
    settings = f"train.max_length={max_length} (train.max_prompt_length={max_prompt_length})"
    if same == total:
        raise UserError(f"{settings}: all {total} training pairs are identical after truncation (chosen and rejected "
                        "differ only past the cut), so none carries a preference; raise train.max_length")
    print(f"[train] warning: {same} of {total} training pairs are identical after truncation to {settings}; they "
          "carry no preference (their loss gradient is zero)", flush=True)
