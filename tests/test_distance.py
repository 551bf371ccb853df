"""Edit distances (docs/losses.md, Edit distances and Worked values) and bucketing."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.distance import (assign_buckets, bucket_labels, distances_and_buckets, edit_distances, fallback_tokenize, levenshtein, pairwise_distances, resolve_edges)
from pipeline.errors import UserError

SPEC_CHOSEN = "First 3 + 5 = 8 then 8 / 2 = 4"
SPEC_REJECTED = "First 3 + 5 = 7 then 8 / 2 = 4"


def test_spec_levenshtein_kitten_sitting():
    assert levenshtein("kitten", "sitting") == 3
    raw, ned = pairwise_distances(["kitten"], ["sitting"])
    assert raw.tolist() == [3] and ned[0] == pytest.approx(3 / 7)


def test_spec_corrupted_intermediate_result():
    assert len(SPEC_CHOSEN) == 30
    raw, ned = pairwise_distances([SPEC_CHOSEN], [SPEC_REJECTED])
    assert raw.tolist() == [1]
    assert ned[0] == pytest.approx(1 / 30, abs=1e-6) and round(float(ned[0]), 6) == 0.033333


def test_normalised_by_the_longer_response_and_empty_pair():
    raw, ned = pairwise_distances(["ab", "", "abcd"], ["abcd", "", "ab"])
    assert raw.tolist() == [2, 0, 2]
    assert ned.tolist() == [0.5, 0.0, 0.5]


def test_token_distance_on_id_sequences():
    raw, ned = pairwise_distances([[1, 2, 3, 4]], [[1, 9, 3]])
    assert raw.tolist() == [2] and ned[0] == pytest.approx(0.5)


def test_fallback_tokens_split_numbers_words_and_punctuation():
    ids = fallback_tokenize(["Tom has 12 apples.", "Tom has 13 apples."])
    assert len(ids[0]) == 5  # Tom, has, 12, apples, .
    assert [a == b for a, b in zip(*ids)] == [True, True, False, True, True]
    columns = edit_distances([SPEC_CHOSEN], [SPEC_REJECTED])
    assert columns["token_distance"].tolist() == [1]
    assert columns["token_ned"][0] == pytest.approx(1 / 12)  # First 3 + 5 = 8 then 8 / 2 = 4: 12 tokens


def test_hf_style_tokenizer_is_used_for_token_distance():
    calls = []

    def by_characters(texts):  # a stand-in tokenizer: one id per character
        calls.append(len(texts))
        return [[ord(c) for c in t] for t in texts]

    columns = edit_distances(["abc", "xyz"], ["abd", "xyz!"], by_characters)
    assert calls == [4]  # one batch for chosen and rejected together
    assert columns["token_distance"].tolist() == columns["char_distance"].tolist() == [1, 1]


def test_buckets_by_fixed_edges():
    edges = resolve_edges(np.array([]), [0.0, 0.2, 1.0], None)
    labels = bucket_labels(edges, None)
    assert labels == ["low", "high"]
    values = np.array([0.0, 0.05, 0.2, 0.9, 1.0, 1.5, -0.1])
    assert assign_buckets(values, edges, labels).tolist() == ["low", "low", "high", "high", "high", "high", "low"]
    three = resolve_edges(np.array([]), [0, 0.1, 0.5, 1], None)
    assert bucket_labels(three, None) == ["b0", "b1", "b2"]
    assert bucket_labels(three, ["near", "mid", "far"]) == ["near", "mid", "far"]


def test_buckets_by_quantiles_are_equal_count():
    values = np.arange(100, dtype=float)
    edges = resolve_edges(values, None, 4)
    buckets = assign_buckets(values, edges, bucket_labels(edges, None))
    assert sorted(np.unique(buckets, return_counts=True)[1].tolist()) == [25, 25, 25, 25]


@pytest.mark.parametrize("edges,quantiles,labels,message", [
    ([0.5, 0.2], None, None, "strictly increasing"),
    ([0.1], None, None, "at least two"),
    (None, None, None, "pairing.quantiles"),
    ([0.0, 0.2, 1.0], None, ["only_one"], "expected 2 names"),
])
def test_bad_bucket_settings_name_the_key(edges, quantiles, labels, message):
    with pytest.raises(UserError, match=message):
        distances_and_buckets(["a"], ["b"], edges=edges, quantiles=quantiles, labels=labels)


def test_unknown_unit_names_the_key():
    with pytest.raises(UserError, match="pairing.unit"):
        distances_and_buckets(["a"], ["b"], unit="words")


def test_bucket_by_raw_token_distance():
    columns, edges, labels = distances_and_buckets(["a b c", "a b c"], ["a b d", "x y z"], unit="token_distance",
                                                   edges=[0, 2, 100])
    assert columns["bucket"].tolist() == ["low", "high"]
