"""Per-token log-probabilities of responses: the math every loss and analysis shares.

SPEC.md section 5, rule 1: log-probs are ``log_softmax(logits[:, :-1])`` gathered at ``input_ids[:, 1:]``,
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
    observed_logits: Tensor  # detached raw logit of the observed token (logit-shift analysis)
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

    Without ``with_others`` the log-prob is ``logit[y] - logsumexp(logits)``, which keeps only the
    upcast logits for backward (no second ``[N, T-1, V]`` log-softmax tensor).
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"score_tokens: expected logits [N,T,V], input_ids [N,T], response_mask [N,T]; got "
            f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(response_mask.shape)}"
        )
    dtype = _compute_dtype(logits.dtype)
    labels = input_ids[:, 1:].long().unsqueeze(-1)  # [N, T-1, 1]
    keep = response_mask[:, 1:].bool()
    mask = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    # Autocast off: under bf16 autocast logsumexp/log_softmax could otherwise run in low precision.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        shifted = logits[:, :-1].to(dtype)  # [N, T-1, V]
        observed = shifted.gather(-1, labels).squeeze(-1)  # [N, T-1]
        others = None
        if with_others:
            log_p = torch.log_softmax(shifted, dim=-1)
            token_logps = log_p.gather(-1, labels).squeeze(-1)
            # Weights sg(p_j) with the observed token's weight zeroed: O_t = sum_{j != y_t} sg(p_j) log p_j.
            weights = log_p.detach().exp().scatter(-1, labels, 0.0)
            # where(): a -inf logit gives p_j = 0 and 0 * -inf = nan; such a token contributes 0.
            terms = torch.where(weights > 0, weights * log_p, zero)
            others = torch.where(keep, terms.sum(-1), zero)
        else:
            token_logps = observed - torch.logsumexp(shifted, dim=-1)
    # where() rather than * mask: padding positions may hold inf/nan that 0 * x would keep.
    return TokenScores(
        token_logps=torch.where(keep, token_logps, zero),
        mask=mask,
        observed_logits=torch.where(keep, observed.detach(), zero),
        others=others,
    )


def first_difference_index(a: Sequence[int], b: Sequence[int]) -> int:
    """First index where token lists ``a`` and ``b`` differ; ``min(len(a), len(b))`` if one is a prefix.

    Smaug Fig. 4 averages the chosen log-probs from this index on (the tokens after the shared prefix).
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
