"""pipeline.modeling.logprobs: per-token log-probs, BNF's O_t and the Smaug Fig. 4 helpers (pure torch)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.modeling.logprobs import first_difference_index, mean_logp_after, score_tokens

SPEC_LOGITS = [2.0, 1.0, 0.5, -1.0]  # docs/losses.md, Worked values: BNF one token, observed index 0


def one_token(logits: list[float], observed: int, dtype=torch.float32):
    """A 2-token sequence whose only response token is ``observed``, predicted from ``logits``."""
    full = torch.tensor([[logits, [0.0] * len(logits)]], dtype=dtype)
    return full, torch.tensor([[1, observed]]), torch.tensor([[0, 1]])


def test_spec_single_token_values():
    scores = score_tokens(*one_token(SPEC_LOGITS, 0), with_others=True)
    assert scores.token_logps.dtype == torch.float32 and scores.token_logps.shape == (1, 1)
    assert scores.token_logps.item() == pytest.approx(-0.495182, abs=1e-6)
    assert scores.others.item() == pytest.approx(-0.712609, abs=1e-6)
    # centred: the observed logit 2.0 minus the position's mean logit (2 + 1 + 0.5 - 1) / 4 = 0.625
    assert scores.observed_logits.item() == pytest.approx(1.375, abs=1e-6) and not scores.observed_logits.requires_grad
    assert scores.mask.tolist() == [[1.0]]


def test_matches_log_softmax_gather_and_masks_prompt_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    ids = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    scores = score_tokens(logits, ids, mask, with_others=True)
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    torch.testing.assert_close(scores.token_logps, expected, atol=1e-6, rtol=0)
    plain = score_tokens(logits, ids, mask)  # logsumexp path gives the same numbers
    torch.testing.assert_close(plain.token_logps, expected, atol=1e-6, rtol=0)
    assert plain.others is None
    assert torch.equal(scores.mask, mask[:, 1:].float())
    outside = scores.mask == 0
    for tensor in (scores.token_logps, scores.observed_logits, scores.others):
        assert torch.all(tensor[outside] == 0)
    # O_t by brute force: sum over the other tokens of p_j log p_j.
    log_p = torch.log_softmax(logits[:, :-1], -1)
    full = (log_p.exp() * log_p).sum(-1) - log_p.exp().gather(-1, ids[:, 1:, None]).squeeze(-1) * expected
    torch.testing.assert_close(scores.others, full * mask[:, 1:], atol=1e-6, rtol=0)


def test_bf16_logits_are_scored_in_fp32_even_under_autocast():
    """bf16 logits under bf16 autocast: every score is fp32 and equals the fp32 computation (log_softmax of
    bf16 input would stay bf16 and be off by ~1e-2 at these magnitudes)."""
    torch.manual_seed(1)
    logits = (8 * torch.randn(2, 5, 7)).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = score_tokens(logits, ids, mask, with_others=True)
    assert scores.token_logps.dtype == scores.others.dtype == scores.mask.dtype == torch.float32
    exact = torch.log_softmax(logits.double()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(scores.token_logps.double(), exact, atol=1e-5, rtol=0)
    p = torch.softmax(logits.double()[:, :-1], -1)
    log_p = torch.log_softmax(logits.double()[:, :-1], -1)
    others = (p * log_p).sum(-1) - p.gather(-1, ids[:, 1:, None]).squeeze(-1) * exact
    torch.testing.assert_close(scores.others.double(), others, atol=1e-5, rtol=0)


def test_gradient_of_observed_logp_is_onehot_minus_p():
    logits, ids, mask = one_token(SPEC_LOGITS, 0)
    logits.requires_grad_(True)
    score_tokens(logits, ids, mask).token_logps.sum().backward()
    p = torch.softmax(torch.tensor(SPEC_LOGITS), -1)
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([1.0, 0, 0, 0]) - p, atol=1e-6, rtol=0)
    assert torch.all(logits.grad[0, 1] == 0)  # the last position predicts nothing


def test_others_gradient_flows_through_log_p_only():
    """dO/dz_k = p_k [k != y] - p_k (1 - p_y): the weights sg(p_j) carry no gradient."""
    logits, ids, mask = one_token(SPEC_LOGITS, 0, dtype=torch.float64)
    logits.requires_grad_(True)
    score_tokens(logits, ids, mask, with_others=True).others.sum().backward()
    p = torch.softmax(torch.tensor(SPEC_LOGITS, dtype=torch.float64), -1)
    expected = p * (torch.arange(4) != 0) - p * (1 - p[0])
    torch.testing.assert_close(logits.grad[0, 0], expected, atol=1e-12, rtol=0)


def test_gradcheck_float64():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    # token_logps only: O_t's stop-gradient weights make finite differences disagree by design
    # (its analytic gradient is checked in test_others_gradient_flows_through_log_p_only).
    for with_others in (False, True):
        assert torch.autograd.gradcheck(lambda x: score_tokens(x, ids, mask, with_others).token_logps, (logits,))


def test_minus_inf_logit_gives_finite_others():
    logits, ids, mask = one_token([1.0, 0.0, -math.inf], 0)
    logits.requires_grad_(True)
    scores = score_tokens(logits, ids, mask, with_others=True)
    assert torch.isfinite(scores.others).all()
    scores.others.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected logits"):
        score_tokens(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


def test_first_difference_index():
    assert first_difference_index([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert first_difference_index([5], [6]) == 0
    assert first_difference_index([1, 2], [1, 2, 3]) == 2  # prefix: length of the shorter
    assert first_difference_index([1, 2, 3], [1, 2, 3]) == 3
    assert first_difference_index([], [1]) == 0


def test_mean_logp_after():
    logps = torch.tensor([-1.0, -2.0, -3.0, -6.0])
    assert mean_logp_after(logps, 0) == pytest.approx(-3.0)
    assert mean_logp_after(logps, 2) == pytest.approx(-4.5)
    assert math.isnan(mean_logp_after(logps, 4))
    with pytest.raises(ValueError):
        mean_logp_after(logps[None], 0)
