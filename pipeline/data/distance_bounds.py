"""Edit distance of very long responses in bounded time: exact where affordable, an upper bound beyond.

Exact Levenshtein costs about ``len(a) * len(b)`` cell updates (rapidfuzz packs 64 a word): two 50,000
character responses take a fraction of a second, two 20 MB ones would take hours. A pair whose
``len(a) * len(b)`` exceeds ``EXACT_CELLS`` is therefore handled in two steps, both linear in the length:

1. a banded exact computation (rapidfuzz with ``score_cutoff``): when the two differ by at most
   ``band = EXACT_CELLS // max(len)`` edits (at least ``MIN_BAND``), that is the exact distance;
2. otherwise an upper bound: after the common prefix and suffix are removed, the rest is cut into
   blocks of ``BLOCK`` units aligned by position and the blocks' distances are summed (editing each
   block into its counterpart is one edit script, so the sum is never below the true distance). It is
   clipped to ``[band + 1, max(len)]``, the range the true distance is known to lie in.

The pair stage says in one line how many pairs got the upper bound.
"""

from __future__ import annotations

from typing import Sequence

from rapidfuzz.distance import Levenshtein, Postfix, Prefix

EXACT_CELLS = 1 << 31  # len(a) * len(b) above this: banded, then bounded
MIN_BAND = 64
BLOCK = 2048


def is_long(a: Sequence, b: Sequence) -> bool:
    return len(a) * len(b) > EXACT_CELLS


def bounded_levenshtein(a: Sequence, b: Sequence) -> tuple[int, bool]:
    """(distance, exact): the exact distance when affordable or within the band, else an upper bound."""
    longer = max(len(a), len(b))
    if not is_long(a, b):
        return int(Levenshtein.distance(a, b)), True
    band = max(MIN_BAND, EXACT_CELLS // max(longer, 1))
    banded = int(Levenshtein.distance(a, b, score_cutoff=band))
    if banded <= band:
        return banded, True
    start = int(Prefix.similarity(a, b))
    end = int(Postfix.similarity(a[start:], b[start:]))
    a, b = a[start:len(a) - end], b[start:len(b) - end]
    total = 0
    for offset in range(0, max(len(a), len(b)), BLOCK):
        total += int(Levenshtein.distance(a[offset:offset + BLOCK], b[offset:offset + BLOCK]))
    return min(max(total, band + 1), longer), False
