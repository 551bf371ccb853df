"""Edit distance of very long responses: exact within the band, a true upper bound beyond it, never n^2."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.data import distance_bounds
from pipeline.data.distance import edit_distances, pairwise_distances


def dp_levenshtein(a, b) -> int:
    """Textbook dynamic programme: the reference the bounded distance is checked against."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def random_text(rng, n, alphabet="abcdefgh "):
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture
def small_cap(monkeypatch):
    """Make 300-character pairs count as "long" so the reference DP can check them."""
    monkeypatch.setattr(distance_bounds, "EXACT_CELLS", 20_000)
    monkeypatch.setattr(distance_bounds, "MIN_BAND", 8)
    monkeypatch.setattr(distance_bounds, "BLOCK", 40)


def edited(rng, text, edits):
    chars = list(text)
    for _ in range(edits):
        position = rng.randrange(len(chars))
        kind = rng.choice("sid")
        if kind == "s":
            chars[position] = rng.choice("xyz")
        elif kind == "i":
            chars.insert(position, rng.choice("xyz"))
        else:
            del chars[position]
    return "".join(chars)


@pytest.mark.parametrize("seed", range(5))
def test_close_long_pairs_get_the_exact_distance(small_cap, seed):
    rng = random.Random(seed)
    a = random_text(rng, 300)
    b = edited(rng, a, 5)  # band = 20000 // 300 = 66 edits: well inside
    distance, exact = distance_bounds.bounded_levenshtein(a, b)
    assert exact and distance == dp_levenshtein(a, b)


@pytest.mark.parametrize("seed", range(5))
def test_far_long_pairs_get_an_upper_bound_in_the_known_range(small_cap, seed):
    rng = random.Random(seed)
    a, b = random_text(rng, 300), random_text(rng, 280)
    true = dp_levenshtein(a, b)
    distance, exact = distance_bounds.bounded_levenshtein(a, b)
    band = max(distance_bounds.MIN_BAND, distance_bounds.EXACT_CELLS // 300)
    assert not exact and true > band
    assert true <= distance <= 300 and distance >= band + 1


def test_token_id_sequences_are_bounded_too(small_cap):
    rng = random.Random(7)
    a = [rng.randrange(50) for _ in range(300)]
    b = a[:100] + [99, 98] + a[100:]
    assert distance_bounds.bounded_levenshtein(a, b) == (2, True)


def test_pairwise_distances_mixes_exact_and_bounded_pairs_and_says_so(small_cap, capsys):
    rng = random.Random(3)
    far_a, far_b = random_text(rng, 300), random_text(rng, 300)
    chosen, rejected = ["kitten", far_a], ["sitting", far_b]
    raw, ned = pairwise_distances(chosen, rejected)
    assert raw[0] == 3 and ned[0] == pytest.approx(3 / 7)  # the short pair: exact, as before
    assert dp_levenshtein(far_a, far_b) <= raw[1] <= 300
    out = capsys.readouterr().out
    assert "[pair] 1 pair(s) too long for an exact edit distance" in out


def test_a_multi_megabyte_pair_finishes_with_its_distances_in_range():
    """Two 1 MB responses, one a copy of the other with edits: exact (in the band); a random pair: bounded.
    Exact Levenshtein on these costs ~1e12 cell updates (minutes); the bounded path is linear."""
    rng = np.random.default_rng(0)
    size = 1_000_000
    a = "".join(rng.choice(list("abcdefgh "), size))
    b = a[:1000] + "XYZ" + a[1000:700_000] + a[700_010:]  # 3 inserted, 10 deleted
    columns = edit_distances([a, a], [b, "".join(rng.choice(list("abcdefgh "), size))])
    assert columns["char_distance"][0] == 13
    assert columns["char_ned"][1] > 0.2 and columns["char_ned"][1] <= 1.0
