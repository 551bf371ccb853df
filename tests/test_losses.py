"""pipeline.training.losses: every number of docs/losses.md, Worked values, gradients, and every conf/method/*.yaml (pure torch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pipeline.errors import UserError
from pipeline.modeling.logprobs import score_tokens
from pipeline.training.losses import LOSSES, LossInput, bnf_loss, bnf_token_terms, get_loss

METHOD_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"
F64 = torch.float64


def pairs(pc, pr, rc=None, rr=None, len_w=5, len_l=4, grad=True) -> LossInput:
    """Sequence-level pairs: lists of summed log-probs, spread evenly over len_w / len_l response tokens."""
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    pc, pr = t(pc).requires_grad_(grad), t(pr).requires_grad_(grad)
    b = pc.shape[0]
    spread = lambda s, n: (s[:, None] / n).expand(b, n)  # noqa: E731
    return LossInput(
        chosen_logps=pc, rejected_logps=pr,
        chosen_token_logps=spread(pc, len_w), rejected_token_logps=spread(pr, len_l),
        chosen_mask=torch.ones(b, len_w, dtype=F64), rejected_mask=torch.ones(b, len_l, dtype=F64),
        ref_chosen_logps=None if rc is None else t(rc), ref_rejected_logps=None if rr is None else t(rr),
    )


def value(name, inp, **cfg) -> float:
    return LOSSES[name](inp, cfg).loss.item()


# ----------------------------------------------------------------------------- DPO / DPOP (docs/losses.md, Worked values)

CASE_A, CASE_B, CASE_C = ([-10.0], [-12.0], [-9.0], [-11.0]), ([-8.0], [-12.0], [-9.0], [-11.0]), \
    ([-10.5], [-14.0], [-10.0], [-11.0])


@pytest.mark.parametrize("case, beta, lam, dpo, dpop", [
    (CASE_A, 0.1, 50, 0.693147, 5.006715),
    (CASE_A, 0.3, 50, 0.693147, 15.000000),
    (CASE_B, 0.1, 50, 0.598139, 0.598139),
    (CASE_B, 0.3, 50, 0.437488, 0.437488),
    (CASE_C, 0.1, 50, 0.575939, 2.350207),
    (CASE_C, 0.3, 50, 0.386871, 6.751170),
    (CASE_C, 0.1, 5, 0.575939, 0.693147),
    (CASE_C, 0.3, 5, 0.386871, 0.693147),
])
def test_dpo_dpop_spec_values(case, beta, lam, dpo, dpop):
    assert value("dpo", pairs(*case), beta=beta) == pytest.approx(dpo, abs=1e-6)
    assert value("dpop", pairs(*case), beta=beta, lambda_=lam) == pytest.approx(dpop, abs=1e-6)


def test_dpop_differs_from_both_wrong_variants():
    beta, lam, h, pen = 0.1, 50.0, torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)  # case A
    wrong_inside = F.softplus(-(beta * h - lam * pen)).item()  # -log sig(beta h - lambda pen)
    wrong_outside = (F.softplus(-beta * h) + lam * pen).item()  # -log sig(beta h) + lambda pen
    assert wrong_inside == pytest.approx(50.000000, abs=1e-6)
    assert wrong_outside == pytest.approx(50.693147, abs=1e-6)
    for b in (0.1, 0.3):
        right = value("dpop", pairs(*CASE_A), beta=b, lambda_=lam)
        assert abs(right - wrong_inside) > 1 and abs(right - wrong_outside) > 1


def grads(name, inp, **cfg):
    LOSSES[name](inp, cfg).loss.backward()
    return inp.chosen_logps.grad.item(), inp.rejected_logps.grad.item()


def test_case_a_gradients():
    assert grads("dpo", pairs(*CASE_A), beta=0.1) == pytest.approx((-0.05, 0.05), abs=1e-7)
    assert grads("dpop", pairs(*CASE_A), beta=0.1, lambda_=50) == pytest.approx((-5.0658665, 0.0993307), abs=1e-7)


def random_pairs(b=6, seed=0, chosen_above_reference=None, grad=True) -> LossInput:
    g = torch.Generator().manual_seed(seed)
    rc, rr = -20 * torch.rand(b, generator=g, dtype=F64) - 1, -20 * torch.rand(b, generator=g, dtype=F64) - 1
    shift = torch.randn(b, generator=g, dtype=F64) * 3
    if chosen_above_reference is not None:
        shift = shift.abs() + 0.1 if chosen_above_reference else -(shift.abs() + 0.1)
    pc, pr = rc + shift, rr + torch.randn(b, generator=g, dtype=F64) * 3
    return pairs(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), grad=grad)


@pytest.mark.parametrize("lam, above", [(0.0, None), (50.0, True), (500.0, True)])
def test_dpop_equals_dpo_when_lambda_zero_or_chosen_above_reference(lam, above):
    for beta in (0.1, 0.3):
        a, b = random_pairs(chosen_above_reference=above), random_pairs(chosen_above_reference=above)
        dpo, dpop = LOSSES["dpo"](a, {"beta": beta}), LOSSES["dpop"](b, {"beta": beta, "lambda_": lam})
        assert dpop.loss.item() == dpo.loss.item()
        dpo.loss.backward(), dpop.loss.backward()
        assert torch.equal(a.chosen_logps.grad, b.chosen_logps.grad)
        assert torch.equal(a.rejected_logps.grad, b.rejected_logps.grad)
    below = random_pairs(chosen_above_reference=False)
    assert value("dpop", below, beta=0.1, lambda_=50) > value("dpo", below, beta=0.1) + 1


# ----------------------------------------------------------------------------- baselines (docs/losses.md, Worked values)

def test_baseline_spec_values():
    h2 = pairs([-8.0], [-12.0], [-10.0], [-12.0])  # h = 2
    assert value("cdpo", h2, beta=0.1, epsilon=0.1) == pytest.approx(0.618139, abs=1e-6)
    assert value("robust_dpo", h2, beta=0.1, epsilon=0.1) == pytest.approx(0.573139, abs=1e-6)
    assert value("hinge", h2, beta=0.1) == pytest.approx(0.800000, abs=1e-6)
    assert value("rpo", pairs(*CASE_A, len_w=5), beta=0.1, alpha=1.0) == pytest.approx(2.693147, abs=1e-6)
    assert value("simpo", pairs([-10.0], [-12.0], len_w=5, len_l=4), beta=2.0, gamma=1.0) == \
        pytest.approx(0.313262, abs=1e-6)
    assert value("orpo", pairs([-0.5 * 6], [-1.0 * 3], len_w=6, len_l=3), lam=0.1) == pytest.approx(0.532030, abs=1e-6)
    assert value("cdpo", h2, beta=0.1, epsilon=0.0) == pytest.approx(value("dpo", h2, beta=0.1), abs=1e-12)


def test_ipo_values_summed_and_averaged():
    h0, h2 = pairs(*CASE_A), pairs([-8.0], [-12.0], [-10.0], [-12.0])
    assert value("ipo", h0, beta=0.1, average_log_ratios=False) == pytest.approx(25.0, abs=1e-6)
    assert value("ipo", h2, beta=0.1, average_log_ratios=False) == pytest.approx(9.0, abs=1e-6)
    # TRL's averaged variant: rho_w = 4 over 2 tokens, rho_l = 0 -> h = 2 -> 9.0; summed h = 4 -> 1.0
    avg = pairs([-6.0], [-12.0], [-10.0], [-12.0], len_w=2, len_l=3)
    assert value("ipo", avg, beta=0.1, average_log_ratios=True) == pytest.approx(9.0, abs=1e-6)
    assert value("ipo", avg, beta=0.1, average_log_ratios=False) == pytest.approx(1.0, abs=1e-6)
    assert value("ipo", avg, beta=0.1) == pytest.approx(9.0, abs=1e-6)  # default: averaged


def test_ipo_rewards_are_trls_tau_times_summed_log_ratio():
    """TRL logs beta * (summed) log-ratio for IPO too. rho_w = 4 over 8 tokens, rho_l = 3 over 2 (hand-derived):
    summed rewards 0.4 > 0.3 (accuracy 1), while the averaged scale (0.05 < 0.15) would give accuracy 0."""
    inp = pairs([-6.0], [-9.0], [-10.0], [-12.0], len_w=8, len_l=2)
    for average in (True, False):
        out = LOSSES["ipo"](inp, {"beta": 0.1, "average_log_ratios": average})
        assert out.metrics["rewards/chosen"].item() == pytest.approx(0.4, abs=1e-9)
        assert out.metrics["rewards/rejected"].item() == pytest.approx(0.3, abs=1e-9)
        assert out.metrics["rewards/margins"].item() == pytest.approx(0.1, abs=1e-9)
        assert out.metrics["rewards/accuracies"].item() == 1.0
    # the loss itself still uses the averaged h: (0.5 - 1.5 - 5)^2 = 36
    assert value("ipo", inp, beta=0.1) == pytest.approx(36.0, abs=1e-9)


GRAD_CONFIGS = {
    "dpo": {"beta": 0.3}, "dpop": {"beta": 0.3, "lambda_": 5.0}, "ipo": {"beta": 0.1},
    "cdpo": {"beta": 0.2, "epsilon": 0.1}, "robust_dpo": {"beta": 0.2, "epsilon": 0.2}, "hinge": {"beta": 0.05},
    "simpo": {"beta": 2.0, "gamma": 1.0}, "orpo": {"lam": 0.1}, "rpo": {"beta": 0.1, "alpha": 1.0},
}


@pytest.mark.parametrize("name", sorted(GRAD_CONFIGS))
def test_gradients_match_finite_differences(name):
    base = random_pairs(b=5, seed=3, grad=False)

    def f(pc, pr):
        inp = LossInput(pc, pr, base.chosen_token_logps, base.rejected_token_logps, base.chosen_mask,
                        base.rejected_mask, base.ref_chosen_logps, base.ref_rejected_logps)
        return LOSSES[name](inp, GRAD_CONFIGS[name]).loss
    args = (base.chosen_logps.clone().requires_grad_(), base.rejected_logps.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, args)


def test_metrics_use_trl_names_and_beta_rho():
    out = LOSSES["dpo"](pairs([-10.0, -8.0], [-12.0, -13.0], [-9.0, -9.0], [-11.0, -11.0]), {"beta": 0.1})
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert out.metrics[key].dim() == 0 and not out.metrics[key].requires_grad
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.1 * (-1 + 1) / 2)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(0.1 * (-1 - 2) / 2)
    assert out.metrics["rewards/accuracies"].item() == 0.5  # pair 1 ties (not counted), pair 2 correct
    assert out.metrics["logps/chosen"].item() == pytest.approx(-9.0)


# ----------------------------------------------------------------------------- BNF (docs/losses.md, Worked values)

def bnf_scores(rows, dtype=torch.float32):
    """rows: list of (logits, observed id) per response token -> (TokenScores of one sequence, vocab logits)."""
    vocab = len(rows[0][0])
    logits = torch.tensor([[r[0] for r in rows] + [[0.0] * vocab]], dtype=dtype, requires_grad=True)
    ids = torch.tensor([[0] + [r[1] for r in rows]])
    mask = torch.tensor([[0] + [1] * len(rows)])
    return score_tokens(logits, ids, mask, with_others=True), logits


def one_token_terms(p_ref, guards, dtype=torch.float32):
    scores, logits = bnf_scores([([2.0, 1.0, 0.5, -1.0], 0)], dtype)
    ref = torch.tensor([[math.log(p_ref)]], dtype=dtype)
    return bnf_token_terms(scores.token_logps, ref, scores.others, scores.mask, guards), logits


@pytest.mark.parametrize("guards, tol", [(False, 1e-6), (True, 1e-5)])
def test_bnf_single_token(guards, tol):
    (a, w, u), logits = one_token_terms(0.8, guards)
    assert w.item() == pytest.approx(0.761825, abs=tol) and u.item() == pytest.approx(0.609861, abs=tol)
    assert a.item() == pytest.approx(-0.811836 if guards else -0.811834, abs=1e-6)
    assert not w.requires_grad and not u.requires_grad
    a.sum().backward()
    q_minus_p = torch.tensor([0.152365, -0.087472, -0.053055, -0.011838])
    torch.testing.assert_close(logits.grad[0, 0], q_minus_p, atol=tol, rtol=0)
    (a, w, u), _ = one_token_terms(0.5, guards)  # policy above reference: SFT gradient
    assert w.item() == pytest.approx(1.0, abs=tol) and u.item() == pytest.approx(0.0, abs=tol)
    assert a.item() == pytest.approx(-0.495182, abs=tol)


def test_bnf_logit_gradient_is_q_minus_p_random():
    torch.manual_seed(4)
    logits = torch.randn(1, 9, 13, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 13, (1, 9))
    mask = torch.ones(1, 9, dtype=torch.long)
    scores = score_tokens(logits, ids, mask, with_others=True)
    ref = scores.token_logps.detach() + torch.randn(1, 8, dtype=F64)  # some above, some below the policy
    a, w, _ = bnf_token_terms(scores.token_logps, ref, scores.others, scores.mask, guards=False)
    a.sum().backward()
    p = torch.softmax(logits.detach()[0, :-1], -1)
    p_y = p.gather(-1, ids[0, 1:, None])
    q = p * (1 - w[0, :, None]) / (1 - p_y)  # remaining mass in proportion to p ...
    q.scatter_(-1, ids[0, 1:, None], w[0, :, None])  # ... and w on the observed token
    torch.testing.assert_close(logits.grad[0, :-1], q - p, atol=1e-10, rtol=0)


PAIR_CHOSEN = [([1.0, 0.0, -1.0], 0), ([0.5, 0.5, 0.0], 1)]
PAIR_REJECTED = [([1.0, 0.0, -1.0], 0), ([0.0, 1.0, 0.0], 2), ([2.0, 0.0, 0.0], 0)]
REF_CHOSEN, REF_REJECTED = [0.7, 0.3], [0.7, 0.3, 0.9]
TABLE_CHOSEN = [(-0.470616, -0.407606, -0.561239, 0.950344, 0.148333),  # A_t, log p, O_t, w, u
                (-0.958020, -0.958020, -0.706822, 1.000000, 0.000000)]
TABLE_REJECTED = [(-0.470616, -0.407606, -0.561239, 0.950344, 0.148333),
                  (-1.336858, -1.551445, -0.646512, 0.706472, 0.372470),
                  (-0.490687, -0.239545, -0.477054, 0.874429, 0.589497)]


def spec_pair():
    (sc, _), (sr, _) = bnf_scores(PAIR_CHOSEN), bnf_scores(PAIR_REJECTED)
    ref_c = torch.tensor([REF_CHOSEN]).log()
    ref_r = torch.tensor([REF_REJECTED]).log()
    return LossInput(
        chosen_logps=sc.token_logps.sum(-1), rejected_logps=sr.token_logps.sum(-1),
        chosen_token_logps=sc.token_logps, rejected_token_logps=sr.token_logps,
        chosen_mask=sc.mask, rejected_mask=sr.mask,
        ref_chosen_logps=ref_c.sum(-1), ref_rejected_logps=ref_r.sum(-1),
        ref_chosen_token_logps=ref_c, ref_rejected_token_logps=ref_r,
        chosen_others=sc.others, rejected_others=sr.others,
    )


@pytest.mark.parametrize("guards, tol", [(False, 1e-6), (True, 1e-5)])
def test_bnf_pair_table(guards, tol):
    inp = spec_pair()
    for side, table, sum_a in (("chosen", TABLE_CHOSEN, -1.428636), ("rejected", TABLE_REJECTED, -2.298162)):
        logps, others = getattr(inp, f"{side}_token_logps"), getattr(inp, f"{side}_others")
        a, w, u = bnf_token_terms(logps, getattr(inp, f"ref_{side}_token_logps"), others,
                                  getattr(inp, f"{side}_mask"), guards)
        got = torch.stack([a[0], logps[0], others[0], w[0], u[0]], -1)
        torch.testing.assert_close(got, torch.tensor(table), atol=tol, rtol=0)
        assert a.sum().item() == pytest.approx(sum_a, abs=tol)


@pytest.mark.parametrize("guards, tol", [(False, 1e-6), (True, 1e-5)])
@pytest.mark.parametrize("normalisation, expected", [
    ("batch_min", -0.434763), ("per_sequence", -0.051736), ("none", -0.869525)])
def test_bnf_pair_losses_and_rewards(normalisation, expected, guards, tol):
    out = bnf_loss(spec_pair(), {"normalisation": normalisation, "guards": guards})
    assert out.loss.item() == pytest.approx(expected, abs=tol)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.195022, abs=1e-6)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.532587, abs=1e-6)
    assert out.metrics["bnf/identical_pairs"].item() == 0.0


def stack_inputs(*inputs: LossInput) -> LossInput:
    """Concatenate single-pair inputs along the batch (right-padding per-token tensors with zeros)."""
    def cat(name):
        parts = [getattr(i, name) for i in inputs]
        if parts[0] is None:
            return None
        if parts[0].dim() == 1:
            return torch.cat(parts)
        width = max(p.shape[-1] for p in parts)
        return torch.cat([F.pad(p, (0, width - p.shape[-1])) for p in parts])
    return LossInput(**{name: cat(name) for name in LossInput.__dataclass_fields__})


def test_bnf_identical_pairs_are_masked_but_counted():
    """A pair whose two responses are the same tokens contributes 0 and still counts in the mean over B.

    The two rows of one forward may score the same tokens a little differently (batch layout,
    reduced precision), so the loss trusts the trainer's token-id test (``same_response``), not the
    log-probs: here the "rejected" copy carries perturbed log-probs, so unmasked it would add a
    non-zero term.
    """
    pair = spec_pair()
    same = spec_pair()
    for field in ("token_logps", "mask", "others", "logps"):
        setattr(same, f"rejected_{field}", getattr(same, f"chosen_{field}").clone())
    same.rejected_token_logps = same.rejected_token_logps - 0.01 * same.rejected_mask  # rounding noise
    same.rejected_logps = same.rejected_token_logps.sum(-1)
    same.ref_rejected_token_logps, same.ref_rejected_logps = same.ref_chosen_token_logps, same.ref_chosen_logps
    batch = stack_inputs(pair, same)
    unmasked = bnf_loss(batch, {"normalisation": "none", "guards": True})
    assert abs(unmasked.loss.item() - (-0.869525 / 2)) > 1e-3  # the noise matters when nothing masks it
    batch.same_response = torch.tensor([False, True])
    out = bnf_loss(batch, {"normalisation": "none", "guards": True})
    assert out.loss.item() == pytest.approx(-0.869525 / 2, abs=1e-5)  # mean over B = 2 (as in oat)
    assert out.metrics["bnf/identical_pairs"].item() == 0.5


def test_same_rows_compares_response_tokens():
    from pipeline.training.training_loop import same_rows
    ids = torch.tensor([[1, 5, 6, 7, 0], [1, 5, 6, 8, 0], [1, 5, 6, 7, 0], [1, 5, 6, 7, 9]])  # chosen 0,1; rejected 0,1
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 1.0]])  # scores tokens 1: of each row
    assert same_rows(ids, mask, 2).tolist() == [True, False]


def test_bnf_unpaired_rows_and_sft_limit():
    """A lone chosen row adds -S(y), a lone rejected row +S(y); above the reference that is SFT."""
    pair = spec_pair()
    empty = lambda t: torch.zeros_like(t)  # noqa: E731
    lone_w, lone_l = spec_pair(), spec_pair()
    for field in ("token_logps", "mask", "others", "logps"):
        setattr(lone_w, f"rejected_{field}", empty(getattr(lone_w, f"rejected_{field}")))
        setattr(lone_l, f"chosen_{field}", empty(getattr(lone_l, f"chosen_{field}")))
    cfg = {"normalisation": "none", "guards": False}
    assert bnf_loss(lone_w, cfg).loss.item() == pytest.approx(1.428636, abs=1e-6)
    assert bnf_loss(lone_l, cfg).loss.item() == pytest.approx(-2.298162, abs=1e-6)
    # batch_min ignores the empty sides: shortest non-empty response is 2 tokens
    mixed = bnf_loss(stack_inputs(pair, lone_w, lone_l), {"normalisation": "batch_min", "guards": False})
    assert mixed.loss.item() == pytest.approx((-0.869525 + 1.428636 - 2.298162) / 2 / 3, abs=1e-6)
    # positive data above the reference: w = 1, u = 0, the loss is the SFT negative log-likelihood / N
    (sc, logits) = bnf_scores(PAIR_CHOSEN, F64)
    above = LossInput(sc.token_logps.sum(-1), torch.zeros(1, dtype=F64), sc.token_logps, torch.zeros(1, 1, dtype=F64),
                      sc.mask, torch.zeros(1, 1, dtype=F64), None, None, sc.token_logps.detach() - 1.0,
                      torch.zeros(1, 1, dtype=F64), sc.others, torch.zeros(1, 1, dtype=F64))
    out = bnf_loss(above, {"normalisation": "per_sequence", "guards": False})
    out.loss.backward()
    bnf_grad = logits.grad.clone()
    logits.grad = None
    (-score_tokens(logits, torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 1]])).token_logps.sum() / 2).backward()
    torch.testing.assert_close(bnf_grad, logits.grad, atol=1e-12, rtol=0)


def mixed_length_batch(grad=True) -> LossInput:
    """Policy = reference (so w = 1, u = 0 with exact formulas, A_t = log p_t): pair 1 has 2-token responses,
    pair 2 has 6-token ones; every chosen token has log p = -1, every rejected one -2."""
    lengths, rows = [2, 6], 2
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths], dtype=F64)
    chosen = (-1.0 * mask).clone().requires_grad_(grad)
    rejected = (-2.0 * mask).clone().requires_grad_(grad)
    zeros = torch.zeros(rows, 6, dtype=F64)
    return LossInput(chosen.sum(-1), rejected.sum(-1), chosen, rejected, mask, mask.clone(),
                     chosen.detach().sum(-1), rejected.detach().sum(-1), chosen.detach().clone(), rejected.detach().clone(),
                     zeros, zeros.clone())


@pytest.mark.parametrize("normalisation, loss, grad_short, grad_long, mean_n", [
    # batch_min: N = 2 for all; pair 1: -(-2/2 + 4/2) = -1, pair 2: -(-6/2 + 12/2) = -3; mean -2;
    # dL/dlogp of a chosen token = -1 / N / B = -1/4 for both pairs: the long pair weighs 3x the short one
    ("batch_min", -2.0, -0.25, -0.25, 2.0),
    # per_sequence: both pairs -1 (S = mean log p); gradients -1/(2*2) and -1/(6*2); mean N = (2+2+6+6)/4
    ("per_sequence", -1.0, -0.25, -1 / 12, 4.0),
    # none: pair 1 -2, pair 2 -6; every token -1/2
    ("none", -4.0, -0.5, -0.5, 1.0),
])
def test_bnf_normaliser_weighs_mixed_lengths_as_derived(normalisation, loss, grad_short, grad_long, mean_n):
    inp = mixed_length_batch()
    out = bnf_loss(inp, {"normalisation": normalisation, "guards": False})
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    out.loss.backward()
    assert inp.chosen_token_logps.grad[0, :2].tolist() == pytest.approx([grad_short] * 2, abs=1e-12)
    assert inp.chosen_token_logps.grad[1].tolist() == pytest.approx([grad_long] * 6, abs=1e-12)
    assert inp.rejected_token_logps.grad[1].tolist() == pytest.approx([-grad_long] * 6, abs=1e-12)
    assert out.metrics["bnf/normaliser"].item() == pytest.approx(mean_n)


def test_bnf_rejects_unknown_normalisation():
    with pytest.raises(UserError, match="method.normalisation"):
        bnf_loss(spec_pair(), {"normalisation": "sum"})


# ----------------------------------------------------------------------------- KTO (docs/losses.md, Worked values)

KTO = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "reference_point": "batch"}


def test_kto_paired_rows_are_two_examples_around_the_batch_reference_point():
    """rho_w = (2, 4), rho_l = (-1, -1): z0 = mean(2, 4, -1, -1) = 1; 1 - sigmoid(0.1 (rho - 1)) for the chosen,
    1 - sigmoid(0.1 (1 - rho)) for the rejected: 0.475021, 0.425557, 0.450166, 0.450166; mean 0.450228."""
    inp = pairs([-8.0, -6.0], [-12.0, -12.0], [-10.0, -10.0], [-11.0, -11.0])
    out = LOSSES["kto"](inp, KTO)
    assert out.loss.item() == pytest.approx(0.450228, abs=1e-6)
    assert out.metrics["kl"].item() == pytest.approx(1.0)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.3)  # beta * mean rho_w
    # lambda_U = 2 doubles the rejected examples' terms: (0.475021 + 0.425557 + 4 * 0.450166) / 4
    assert LOSSES["kto"](inp, {**KTO, "undesirable_weight": 2.0}).loss.item() == pytest.approx(0.675311, abs=1e-6)
    # z0 is detached: dL/d rho_w1 = -beta s (1 - s) / 4 with s = sigmoid(0.1), not its total derivative
    out.loss.backward()
    assert inp.chosen_logps.grad[0].item() == pytest.approx(-0.0062344, abs=1e-7)
    # reference_point=zero: z0 = 0 and the loss is 1 - sigmoid(beta rho_w), 1 - sigmoid(-beta rho_l) per example
    zero = LOSSES["kto"](pairs([-8.0, -6.0], [-12.0, -12.0], [-10.0, -10.0], [-11.0, -11.0]), {**KTO, "reference_point": "zero"})
    expected = (1 - 1 / (1 + math.exp(-0.2)) + 1 - 1 / (1 + math.exp(-0.4)) + 2 * (1 - 1 / (1 + math.exp(-0.1)))) / 4
    assert zero.loss.item() == pytest.approx(expected, abs=1e-9) and zero.metrics["kl"].item() == 0.0


def test_kto_reference_point_is_clamped_at_zero_and_unpaired_rows_count_once():
    # rho_w = -1, rho_l = -3: the batch mean -2 is clamped to z0 = 0: (1 - sigmoid(-0.1) + 1 - sigmoid(0.3)) / 2
    below = LOSSES["kto"](pairs([-11.0], [-14.0], [-10.0], [-11.0]), KTO)
    assert below.metrics["kl"].item() == 0.0 and below.loss.item() == pytest.approx(0.475268, abs=1e-6)
    # a lone chosen row (rho 3) and a lone rejected row (rho -2): two examples, z0 = 0.5, each 1 - sigmoid(0.25)
    lone = pairs([-7.0, 0.0], [0.0, -13.0], [-10.0, 0.0], [0.0, -11.0])
    lone.rejected_mask[0] = 0
    lone.chosen_mask[1] = 0
    out = LOSSES["kto"](lone, KTO)
    assert out.metrics["kl"].item() == pytest.approx(0.5) and out.loss.item() == pytest.approx(0.437823, abs=1e-6)
    with pytest.raises(UserError, match="method.reference_point"):
        LOSSES["kto"](lone, {**KTO, "reference_point": "mismatched"})


# ----------------------------------------------------------------------------- registry and method files

def test_get_loss_lists_valid_names():
    assert get_loss("dpop") is LOSSES["dpop"]
    with pytest.raises(UserError, match=r"valid losses are \[.*'bnf'.*'dpop'"):
        get_loss("dpo-positive")


def test_missing_hyper_parameter_names_the_key():
    with pytest.raises(UserError, match="method.lambda_"):
        LOSSES["dpop"](pairs(*CASE_A), {"beta": 0.1, "loss": "dpop"})


METHOD_FILES = sorted(METHOD_DIR.glob("*.yaml"))


def test_every_loss_has_a_method_file():
    assert {OmegaConf.load(p).loss for p in METHOD_FILES} == set(LOSSES)


def toy_batch(cfg, b=3, vocab=11, seed=0):
    """Policy scores from random logits (grad), reference from perturbed logits, as the trainer builds them."""
    g = torch.Generator().manual_seed(seed)
    lengths_w, lengths_l = (7, 9)

    def side(t, resp_start):
        logits = torch.randn(b, t, vocab, generator=g, requires_grad=True)
        ids = torch.randint(0, vocab, (b, t), generator=g)
        mask = torch.zeros(b, t, dtype=torch.long)
        mask[:, resp_start:] = 1
        mask[0, -1] = 0  # padding on one row
        pol = score_tokens(logits, ids, mask, with_others=bool(cfg.needs_vocab_term))
        ref = score_tokens(logits.detach() + 0.3 * torch.randn(b, t, vocab, generator=g), ids, mask)
        return logits, pol, ref
    lw, pw, rw = side(lengths_w, 3)
    ll, pl, rl = side(lengths_l, 3)
    use_ref = bool(cfg.needs_reference)
    inp = LossInput(
        pw.token_logps.sum(-1), pl.token_logps.sum(-1), pw.token_logps, pl.token_logps, pw.mask, pl.mask,
        rw.token_logps.sum(-1) if use_ref else None, rl.token_logps.sum(-1) if use_ref else None,
        rw.token_logps if use_ref else None, rl.token_logps if use_ref else None, pw.others, pl.others)
    return inp, (lw, ll)


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.stem)
def test_method_file_runs_forward_and_backward(path):
    cfg = OmegaConf.load(path)
    for key in ("name", "loss", "needs_reference", "needs_vocab_term", "accepts_unpaired"):
        assert key in cfg, f"{path.name}: missing {key}"
    assert path.stem == cfg.name
    inp, leaves = toy_batch(cfg)
    out = get_loss(cfg.loss)(inp, OmegaConf.to_container(cfg))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert out.metrics[key].dim() == 0 and not out.metrics[key].requires_grad
        assert torch.isfinite(out.metrics[key])
    out.loss.backward()
    for logits in leaves:
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.stem)
def test_method_file_passes_config_checks(path):
    from pipeline.orchestration.validate import validate
    validate(OmegaConf.create({"stages": [], "method": OmegaConf.load(path)}))


@pytest.mark.parametrize("override, key", [
    ({"beta": 0.0}, "method.beta"), ({"beta": -1}, "method.beta"), ({"lambda_": -5}, "method.lambda_"),
    ({"epsilon": 0.5}, "method.epsilon"), ({"epsilon": -0.1}, "method.epsilon"), ({"gamma": -1}, "method.gamma"),
    ({"lam": -0.1}, "method.lam"), ({"alpha": -1}, "method.alpha"), ({"normalisation": "sum"}, "method.normalisation"),
    ({"guards": "yes"}, "method.guards"), ({"loss": "dpo_positive"}, "method.loss"),
])
def test_bad_method_values_are_rejected_naming_the_key(override, key):
    from pipeline.orchestration.validate import validate
    method = OmegaConf.merge(OmegaConf.load(METHOD_DIR / "dpop.yaml"), override)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate(OmegaConf.create({"stages": [], "method": method}))
