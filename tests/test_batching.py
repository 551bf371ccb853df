"""Tokenisation and batching: truncation rules, masks, chosen-then-rejected row order."""

from __future__ import annotations

import pytest
import torch

from pipeline.modeling import models
from pipeline.modeling.batching import check_token_budget, encode_pair, encode_response
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_artifact):
    return models.load_tokenizer(tiny_model_artifact)


def render(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def test_encode_response_layout(tokenizer):
    prompt = render(tokenizer, "Ava has 3 apples.")
    ids, start = encode_response(tokenizer, prompt, "3 + 1 = 4", max_length=256, max_prompt_length=128)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer("3 + 1 = 4", add_special_tokens=False).input_ids
    assert ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert start == len(prompt_ids)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2  # no extra BOS added


def test_prompt_is_cut_at_its_start_and_response_at_its_end(tokenizer):
    prompt = render(tokenizer, "Ava has 12 apples and 7 pears and 9 plums.")
    full_prompt = tokenizer(prompt, add_special_tokens=False).input_ids
    response = "Ava has 12 + 7 + 9 = 28 fruits.\n#### 28"
    full_response = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids, start = encode_response(tokenizer, prompt, response, max_length=20, max_prompt_length=8)
    assert start == 8 and ids[:8] == full_prompt[-8:]  # the end of the prompt, next to the response, survives
    assert len(ids) == 20 and ids[8:] == full_response[:12]  # response cut at its end: EOS lost
    assert ids[-1] != tokenizer.eos_token_id
    short, short_start = encode_response(tokenizer, prompt, "4", max_length=64, max_prompt_length=8)
    assert short[short_start:] == tokenizer("4", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_bos_adding_tokenizer_gets_exactly_one_bos(tokenizer):
    class BosTokenizer:  # wraps the real tokenizer, adding BOS on encode like Llama/Mistral do
        bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            return type("Encoding", (), {"input_ids": ([self.bos_token_id] + ids) if add_special_tokens else ids})

    bos_tok = BosTokenizer()
    ids, start = encode_response(bos_tok, "hello there friend", "ok", max_length=64, max_prompt_length=3)
    assert ids[0] == bos_tok.bos_token_id and ids.count(bos_tok.bos_token_id) == 1 and start == 3
    rendered = "<|endoftext|>hello"  # a template that renders the BOS itself: not doubled
    ids, _ = encode_response(bos_tok, rendered, "ok", max_length=64, max_prompt_length=16)
    assert ids.count(bos_tok.bos_token_id) == 1


def test_unshared_layout_rows_and_masks():
    from pipeline.modeling.packing import pair_layout
    layout = pair_layout([5, 6, 7, 8], [5, 6, 9], 2, 2, "none", pad_id=99)
    assert layout.input_ids.tolist() == [[5, 6, 7, 8], [5, 6, 9, 99]]  # chosen row, then rejected, right-padded
    assert layout.attention.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert (layout.cell_query >= 0).long().tolist() == [[0, 1, 1], [0, 1, 0]]  # response tokens 7, 8 and 9
    assert layout.input_ids.dtype == torch.long and layout.shared == 0


def test_encode_pair_shares_the_prompt(tokenizer):
    prompt = render(tokenizer, "Ben has 5 coins.")
    pair = encode_pair(tokenizer, prompt, "5 - 2 = 3", "5 - 2 = 4", 128, 64)
    assert pair.chosen_start == pair.rejected_start
    assert pair.chosen_ids[: pair.chosen_start] == pair.rejected_ids[: pair.rejected_start]


@pytest.mark.parametrize("max_length,max_prompt_length", [(128, 128), (64, 128), (128, 0)])
def test_token_budget_is_checked(max_length, max_prompt_length, tokenizer):
    with pytest.raises(UserError, match="train.max_"):
        check_token_budget(max_length, max_prompt_length)
    with pytest.raises(UserError, match="train.max_"):
        encode_response(tokenizer, "p", "r", max_length, max_prompt_length)
