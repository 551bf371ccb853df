"""Tokenisation and batching of preference pairs, shared by reference scoring, training and evaluation.

Truncation rules (documented once, used everywhere):
- The prompt is the rendered text the model conditions on (chat markers included). It is encoded
  WITHOUT the tokenizer's automatic special tokens, because a rendered chat prompt already carries
  them. Tokenizers that add a BOS by default (Llama, Mistral) get exactly one BOS in front when the
  text does not already start with it, as in their pretraining; ChatML models (SmolLM2, Qwen, tiny)
  add nothing.
- A prompt longer than ``max_prompt_length`` tokens loses its START (the end, next to the response,
  is kept); a kept BOS stays at position 0.
- The response is encoded separately (no special tokens) and ends with ``eos_token_id``; it is cut
  at its END so that prompt + response <= ``max_length`` (a cut response loses its EOS).
- How a pair goes through the model (one packed row, or two padded rows) is pipeline/modeling/packing.py.
- A one-sided row (unpaired data: only a chosen or only a rejected response) is one sequence,
  ``OneSidedEncoding``, forwarded alone (one row, no padding); ``encode_row`` picks the form from which
  sides a row has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipeline.errors import UserError


def check_token_budget(max_length: int, max_prompt_length: int, prefix: str = "train") -> None:
    """Leave room for at least one response token; named after the config keys."""
    if int(max_prompt_length) < 1:
        raise UserError(f"{prefix}.max_prompt_length={max_prompt_length}: expected an integer >= 1")
    if int(max_length) <= int(max_prompt_length):
        raise UserError(f"{prefix}.max_length={max_length}: must be greater than "
                        f"{prefix}.max_prompt_length={max_prompt_length} (tokens left for the response)")


def _bos_to_prepend(tokenizer) -> int | None:
    """The BOS id when this tokenizer adds one by default (Llama/Mistral), else None (ChatML models)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True).input_ids
    return bos if probe[:1] == [bos] else None


def encode_response(tokenizer, prompt: str, response: str, max_length: int, max_prompt_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS and the index of the first response token."""
    check_token_budget(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: has no eos token")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bos = _bos_to_prepend(tokenizer)
    if bos is not None and prompt_ids[:1] == [bos]:
        prompt_ids = prompt_ids[1:]
    budget = max_prompt_length - (1 if bos is not None else 0)
    prompt_ids = prompt_ids[len(prompt_ids) - budget:] if len(prompt_ids) > budget else prompt_ids
    if bos is not None:
        prompt_ids = [bos] + prompt_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return list(prompt_ids) + list(response_ids), len(prompt_ids)


@dataclass(frozen=True)
class PairEncoding:
    """One preference pair as token ids; ``*_start`` is the index of the first response token."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_start: int
    rejected_start: int


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int, max_prompt_length: int) -> PairEncoding:
    chosen_ids, chosen_start = encode_response(tokenizer, prompt, chosen, max_length, max_prompt_length)
    rejected_ids, rejected_start = encode_response(tokenizer, prompt, rejected, max_length, max_prompt_length)
    return PairEncoding(chosen_ids, rejected_ids, chosen_start, rejected_start)


@dataclass(frozen=True)
class OneSidedEncoding:
    """A row with one response: ``side`` is "chosen" (label true) or "rejected"; the other side is absent."""

    ids: list[int]
    start: int
    side: str


@dataclass(frozen=True)
class DroppedEncoding:
    """A pair of which the train view keeps only ``kept`` (``train.drop_one_side``); the pair is still
    forwarded whole, in its pair layout, so the kept side scores exactly as the reference stage scored it."""

    pair: PairEncoding
    kept: str


def present(text) -> bool:
    """A response is there: a string (an absent side is None, or NaN after a round trip through pandas)."""
    return isinstance(text, str)


def encode_row(tokenizer, prompt: str, chosen, rejected, max_length: int, max_prompt_length: int
               ) -> PairEncoding | OneSidedEncoding:
    """A pair when both sides are present, else the one present side as a ``OneSidedEncoding``."""
    if present(chosen) and present(rejected):
        return encode_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length)
    if not (present(chosen) or present(rejected)):
        raise ValueError("a row needs a chosen or a rejected response")
    side, text = ("chosen", chosen) if present(chosen) else ("rejected", rejected)
    ids, start = encode_response(tokenizer, prompt, text, max_length, max_prompt_length)
    return OneSidedEncoding(ids, start, side)


def encode_pairs(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                 max_length: int, max_prompt_length: int) -> list[PairEncoding | OneSidedEncoding]:
    """Every row encoded by ``encode_row`` (pairs, and one-sided rows where a side is None)."""
    return [encode_row(tokenizer, p, c, r, max_length, max_prompt_length) for p, c, r in zip(prompts, chosen, rejected)]
