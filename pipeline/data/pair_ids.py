"""What identifies a pair, and which split it falls in: hashes of its text, the split by a hash of the prompt.

A prompt's split is a pure function of its text, so one prompt is never on both sides (all its pairs go
where it goes) and the split does not depend on the order or the number of rows.
"""

from __future__ import annotations

import hashlib


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def split_of(prompt: str, test_fraction: float) -> str:
    """"train" or "test" for every pair (and unpaired row) of this prompt.

    Drawn per PROMPT, not per pair: a question with several pairs (multiple-choice distractors,
    best-vs-each completions) must not have pairs on both sides, or held-out pairs would share
    their prompt and chosen answer with training pairs. A stable hash of the prompt text alone, so
    adding rows never moves existing prompts.
    """
    return split_from_digest(prompt_digest(prompt), test_fraction)


def prompt_digest(prompt: str) -> bytes:
    """The hash a prompt's split is drawn from (its first 16 bytes also identify the prompt in stats)."""
    return hashlib.sha256(f"split:{prompt}".encode()).digest()


def split_from_digest(digest: bytes, test_fraction: float) -> str:
    draw = int.from_bytes(digest[:4], "big") / 2**32  # = int(hexdigest[:8], 16) / 2**32
    return "test" if draw < test_fraction else "train"


def id_number(pair_id: str) -> int:
    """A 16-hex-digit id as an integer (equal ids <=> equal numbers): 8 bytes a pair instead of a string."""
    return int(pair_id, 16)
