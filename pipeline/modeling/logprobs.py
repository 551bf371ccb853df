"""Per-token log-probabilities of responses: the math every loss and analysis shares.

docs/losses.md, Log-probabilities: log-probs are ``log_softmax(logits[:, :-1])`` gathered at ``input_ids[:, 1:]``,
masked to response tokens, computed in fp32 even under bf16 autocast. Position ``t`` of every
``[N, T-1]`` tensor below scores token ``input_ids[:, t+1]`` from the logits at position ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class TokenScores:
    """Per-token scores of N sequences; every tensor is ``[N, T-1]`` and 0 outside ``mask``."""

    token_logps: Tensor  # log p(input_ids[:, 1:]) from logits[:, :-1] (with grad)
    mask: Tensor  # 1.0 on response tokens (response_mask[:, 1:])
    observed_logits: Tensor  # detached logit of the observed token minus its position's mean logit (logit shift)
    others: Tensor | None  # BNF's O_t = sum_{j != y_t} sg(p_j) * log p_j (grad through log p_j)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least fp32 (bf16/fp16 logits are upcast); float64 stays float64 so gradcheck can run.
    return torch.float64 if dtype == torch.float64 else torch.float32


def score_tokens(logits: Tensor, input_ids: Tensor, response_mask: Tensor, with_others: bool = False) -> TokenScores:
    """Score the observed next tokens of N sequences.

    Args:
        logits: ``[N, T, V]`` model outputs, any float dtype (the math runs in fp32; float64 is kept).
        input_ids: ``[N, T]`` token ids.
        response_mask: ``[N, T]`` 1 on response tokens (the response's EOS included), 0 on prompt/padding.
        with_others: also return BNF's ``O_t`` (costs one extra ``[N, T-1, V]`` tensor).

    Memory: one fp32 ``[N, T-1, V]`` log-softmax kept for backward (like SFT cross-entropy); ``O_t``
    adds one detached ``[N, T-1, V]`` weight tensor.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"score_tokens: expected logits [N,T,V], input_ids [N,T], response_mask [N,T]; got "
            f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(response_mask.shape)}"
        )
    keep = response_mask[:, 1:].bool()
    n, width, vocab = logits[:, :-1].shape
    logp, observed, others = token_terms(logits[:, :-1].reshape(n * width, vocab), input_ids[:, 1:].reshape(-1),
                                         with_others)
    zero = torch.zeros((), dtype=logp.dtype, device=logits.device)
    # where() rather than * mask: padding positions may hold inf/nan that 0 * x would keep.
    return TokenScores(
        token_logps=torch.where(keep, logp.view(n, width), zero),
        mask=keep.to(logp.dtype),
        observed_logits=torch.where(keep, observed.view(n, width), zero),
        others=None if others is None else torch.where(keep, others.view(n, width), zero),
    )


def token_terms(logits: Tensor, labels: Tensor, with_others: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The per-position math every path shares: ``logits [Q, V]`` (any float dtype) and the observed
    ``labels [Q]`` -> fp32 ``(log p(label), centred observed logit (detached), O_t or None)``, each ``[Q]``.

    ``score_tokens`` applies it to a model's ``[N, T, V]`` logits; the chunked head
    (``pipeline.modeling.logprob_head``) to each chunk of positions it projects.
    """
    dtype = _compute_dtype(logits.dtype)
    labels = labels.long().unsqueeze(-1)  # [Q, 1]
    # The upcast below is what keeps the math fp32 under bf16 autocast: autocast leaves log_softmax,
    # gather, exp and elementwise ops alone for fp32 inputs (it only lowers matmul-like ops), so no
    # autocast guard is needed; tests/test_logprobs.py fails if the upcast goes.
    shifted = logits.to(dtype)
    # The observed token's logit relative to the mean logit of its position: raw logits are free up to a
    # per-position constant (softmax ignores it), so a uniform drift would otherwise read as a "shift".
    detached = shifted.detach()
    observed = detached.gather(-1, labels).squeeze(-1) - detached.mean(-1)
    # log_softmax saves only its output for backward (the upcast logits are freed), and its CPU
    # backward is faster than logsumexp's; measured at 8 x 128 x 49152.
    log_p = torch.log_softmax(shifted, dim=-1)
    token_logps = log_p.gather(-1, labels).squeeze(-1)
    others = None
    if with_others:
        # O_t = sum_{j != y} sg(p_j) log p_j: the observed token's weight zeroed, weights detached.
        weights = log_p.detach().exp().scatter_(-1, labels, 0.0)
        # clamp: a -inf logit has weight 0, and 0 * -inf would be nan.
        others = (weights * log_p.clamp_min(torch.finfo(dtype).min)).sum(-1)
    return token_logps, observed, others


def first_difference_index(a: Sequence[int], b: Sequence[int]) -> int:
    """First index where token lists ``a`` and ``b`` differ; ``min(len(a), len(b))`` if one is a prefix.

    Smaug Fig. 4 averages the chosen log-probs after this index (the tokens after the differing one).
    """
    a, b = list(a), list(b)
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def mean_logp_after(token_logps: Tensor, start: int) -> float:
    """Mean of a 1-D per-response-token log-prob vector from index ``start`` on; nan if nothing is left."""
    if token_logps.dim() != 1:
        raise ValueError(f"mean_logp_after: expected a 1-D tensor, got shape {tuple(token_logps.shape)}")
    tail = token_logps[max(int(start), 0):]
    if tail.numel() == 0:
        return math.nan
    return float(tail.double().mean())
