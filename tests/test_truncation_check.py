"""Pairs that differ only past train.max_length are counted (warned), and refused when all of them are."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.modeling.models import load_tokenizer
from pipeline.training.training_loop import PairEncodings
from pipeline.training.truncation_check import check_truncated_pairs

SHARED = "The answer is found by adding the two numbers and then checking the sum twice over carefully. "


def frame(endings):
    return pd.DataFrame({"prompt": ["What is 2 + 2?"] * len(endings),
                         "chosen": [SHARED * 3 + c for c, _ in endings],
                         "rejected": [SHARED * 3 + r for _, r in endings]})


def test_pairs_identical_after_truncation_are_counted_and_all_of_them_refused(tiny_model_artifact, capsys):
    tokenizer = load_tokenizer(tiny_model_artifact)
    pairs = frame([("It is 4.", "It is 5."), ("Four.", "Five."), ("4", "22")])
    shared_tokens = len(tokenizer(SHARED * 3, add_special_tokens=False)["input_ids"])
    # Cut inside the shared start: all three pairs become the same tokens.
    short = PairEncodings.build(tokenizer, pairs, range(3), 64, 32)
    assert shared_tokens > 32  # the response budget (64 - prompt) ends inside the shared text
    with pytest.raises(UserError, match="all 3 training pairs are identical after truncation"):
        check_truncated_pairs(short.encodings.values(), 64, 32)
    # Long enough: every pair keeps its difference, nothing said.
    full = PairEncodings.build(tokenizer, pairs, range(3), 512, 64)
    check_truncated_pairs(full.encodings.values(), 512, 64)
    assert "warning" not in capsys.readouterr().out
    # One pair differs early (inside the budget), two only past it: counted and warned.
    mixed = frame([("It is 4.", "It is 5."), ("Four.", "Five.")])
    mixed.loc[2] = ["What is 2 + 2?", "Four. " + SHARED * 3, "Five. " + SHARED * 3]
    encoded = PairEncodings.build(tokenizer, mixed, range(3), 64, 32)
    check_truncated_pairs(encoded.encodings.values(), 64, 32)
    assert "2 of 3 training pairs are identical after truncation" in capsys.readouterr().out
