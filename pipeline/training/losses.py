"""Preference losses with one signature: ``loss_fn(LossInput, method_cfg) -> LossOutput``.

Formulas: docs/losses.md, one section per loss (each function cites paper and equation). Shapes: B pairs; chosen and
rejected per-token tensors are ``[B, T_w]`` and ``[B, T_l]`` (T may differ), sequence sums are ``[B]``.
``-log sigmoid(z)`` is always ``softplus(-z)``. The batch reduction is the mean over the B pairs.

A new loss = a function here registered in ``LOSSES`` + ``conf/method/<name>.yaml``; the trainer only
reads the method file's capability flags (``needs_reference``, ``needs_vocab_term``, ``accepts_unpaired``).

Metrics use TRL's names without prefix. Losses built on the reference report ``rewards/* = beta*rho``
(rho = policy - reference log-prob of the response, on the same scale the loss uses). BNF has no beta and
reports ``sum_t (logp - logp_ref)``. Reference-free losses (SimPO, ORPO) report ``beta * avg_logp``
(``lam`` for ORPO), as TRL's CPO/ORPO trainers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import UserError


@dataclass
class LossInput:
    """B preference pairs. Sums are ``[B]``; per-token tensors ``[B, T]`` (0 outside the fp32 mask).

    Unpaired rows (BNF and KTO, ``accepts_unpaired``): an absent side is a row whose mask is all zero; in
    BNF it contributes ``S = 0``, so a lone chosen response adds ``-S(y)`` and a lone rejected one ``+S(y)``;
    KTO counts only the present sides as examples.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_token_logps: Tensor
    rejected_token_logps: Tensor
    chosen_mask: Tensor
    rejected_mask: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    ref_chosen_token_logps: Tensor | None = None
    ref_rejected_token_logps: Tensor | None = None
    chosen_others: Tensor | None = None  # BNF's O_t from score_tokens(..., with_others=True)
    rejected_others: Tensor | None = None
    # [B] bool: chosen and rejected are the same token sequence (the trainer sets it from token ids;
    # log-probs cannot tell, since the same tokens in two rows of one forward may differ by rounding).
    same_response: Tensor | None = None


@dataclass
class LossOutput:
    loss: Tensor  # scalar, mean over pairs
    metrics: dict[str, Tensor]  # detached scalars, TRL names without prefix


LossFn = Callable[[LossInput, Mapping[str, Any]], LossOutput]


# ----------------------------------------------------------------------------- helpers

def _param(cfg: Mapping[str, Any], key: str) -> float:
    if key not in cfg or cfg[key] is None:
        raise UserError(f"method.{key}: required by loss '{cfg.get('loss', '?')}' (set it in conf/method/ or e.g. method.{key}=0.1)")
    return float(cfg[key])


def _lengths(mask: Tensor) -> Tensor:
    """Response lengths |y| ``[B]`` (at least 1, so empty rows do not divide by zero)."""
    return mask.sum(-1).clamp_min(1)


def _reference(inp: LossInput, loss: str) -> tuple[Tensor, Tensor]:
    if inp.ref_chosen_logps is None or inp.ref_rejected_logps is None:
        raise ValueError(f"loss '{loss}' needs reference log-probs (its method file sets needs_reference: true)")
    return inp.ref_chosen_logps, inp.ref_rejected_logps


def _log_ratios(inp: LossInput, loss: str, average: bool = False) -> tuple[Tensor, Tensor]:
    """rho(y_w), rho(y_l) ``[B]``; per-token averages (rho / |y|) when ``average``."""
    ref_w, ref_l = _reference(inp, loss)
    rho_w, rho_l = inp.chosen_logps - ref_w, inp.rejected_logps - ref_l
    if average:
        rho_w, rho_l = rho_w / _lengths(inp.chosen_mask), rho_l / _lengths(inp.rejected_mask)
    return rho_w, rho_l


def _metrics(inp: LossInput, reward_w: Tensor, reward_l: Tensor, **extra: Tensor) -> dict[str, Tensor]:
    reward_w, reward_l = reward_w.detach(), reward_l.detach()
    metrics = {
        "rewards/chosen": reward_w.mean(),
        "rewards/rejected": reward_l.mean(),
        "rewards/margins": (reward_w - reward_l).mean(),
        "rewards/accuracies": (reward_w > reward_l).float().mean(),
        "logps/chosen": inp.chosen_logps.detach().mean(),
        "logps/rejected": inp.rejected_logps.detach().mean(),
    }
    metrics.update({name: value.detach().float().mean() for name, value in extra.items()})
    return metrics


def _dpo_family(inp: LossInput, cfg: Mapping[str, Any], name: str, per_pair: Callable[[Tensor], Tensor]) -> LossOutput:
    """Losses that are a function of ``z = beta * h`` only (h = margin of log-ratios)."""
    beta = _param(cfg, "beta")
    rho_w, rho_l = _log_ratios(inp, name)
    losses = per_pair(beta * (rho_w - rho_l))
    return LossOutput(losses.mean(), _metrics(inp, beta * rho_w, beta * rho_l))


# ----------------------------------------------------------------------------- DPO and DPOP

def dpo_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7): ``softplus(-beta * h)``, h = rho(y_w) - rho(y_l), per pair ``[B]``.

    Config: ``beta`` > 0. At pi = pi_ref the loss is log 2. No departure from the paper.
    """
    return _dpo_family(inp, cfg, "dpo", lambda z: F.softplus(-z))


def dpop_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, Smaug v2 Eq. 3).

    ``pen = max(0, logp_ref(y_w) - logp(y_w))`` (sequence level, ``[B]``) and
    ``L = softplus(-beta * (h - lambda_ * pen))``: lambda INSIDE the beta bracket (v1 of the paper put it
    outside; docs/losses.md, DPOP lists both wrong variants). lambda_ = 0, or chosen at/above the reference
    (relu's gradient at 0 is 0), gives exactly DPO. Config: ``beta`` > 0, ``lambda_`` >= 0.
    Extra metric ``dpop/penalty``: mean pen over pairs.
    """
    beta, lam = _param(cfg, "beta"), _param(cfg, "lambda_")
    rho_w, rho_l = _log_ratios(inp, "dpop")
    penalty = torch.relu(-rho_w)  # = max(0, logp_ref(y_w) - logp(y_w))
    losses = F.softplus(-beta * (rho_w - rho_l - lam * penalty))
    return LossOutput(losses.mean(), _metrics(inp, beta * rho_w, beta * rho_l, **{"dpop/penalty": penalty}))


# ----------------------------------------------------------------------------- BNF

def bnf_token_terms(token_logps: Tensor, ref_token_logps: Tensor, others: Tensor, mask: Tensor,
                    guards: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """BNF per-token objective (Mao et al. 2025; docs/losses.md, BNF). All tensors ``[B, T]``.

    ``w = min(p / p_ref, 1)``, ``u = (1 - w) / (1 - p)``, ``A = sg(w) log p + sg(u) O``; returns
    ``(A, w, u)`` with w, u detached and everything 0 outside ``mask``. The gradient of A on the logits
    is ``q - p`` (q: target with ``q(y) = w``, the rest spread in proportion to p).

    ``guards=True`` reproduces the author's oat code: ``w = min(p / (p_ref + 1e-6), 1)`` and
    ``u = (1 - w + 1e-6) / (1 - p + 1e-6)``. ``guards=False`` is the exact formula; u is set to 0 where
    ``w = 1`` (there 1 - w = 0, and 1 - p may be 0 too).
    """
    keep = mask > 0
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    # Mask first (docs/losses.md, BNF: before forming w and u): outside the mask log p = log p_ref = 0.
    logp = torch.where(keep, token_logps, zero).detach()
    ref = torch.where(keep, ref_token_logps.to(token_logps.dtype), zero)
    p = logp.exp()
    if guards:
        w = (p / (ref.exp() + 1e-6)).clamp(max=1.0)
        u = (1 - w + 1e-6) / (1 - p + 1e-6)
    else:
        w = (logp - ref).exp().clamp(max=1.0)
        u = torch.where(w < 1, (1 - w) / (1 - p).clamp_min(torch.finfo(p.dtype).tiny), zero)
    w, u = torch.where(keep, w, zero), torch.where(keep, u, zero)
    terms = w * token_logps + u * others
    return torch.where(keep, terms, zero), w, u


def _same_sequence(logps_a: Tensor, mask_a: Tensor, logps_b: Tensor, mask_b: Tensor) -> Tensor:
    """``[B]`` bool: rows whose masks and per-token log-probs are identical (y_w == y_l).

    The fallback when the caller gives no ``same_response`` (token ids are the reliable test)."""
    width = max(logps_a.shape[-1], logps_b.shape[-1])
    pad = lambda x: F.pad(x.detach(), (0, width - x.shape[-1]))  # noqa: E731
    return (pad(mask_a) == pad(mask_b)).all(-1) & (pad(logps_a * mask_a) == pad(logps_b * mask_b)).all(-1)


def bnf_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """BNF (Mao et al., ICLR 2025; formula of the author's oat implementation; docs/losses.md, BNF).

    ``S(y) = (1/N) sum_t A_t`` (``[B]`` per side) and ``L = mean over pairs of -(S(y_w) - S(y_l))``.
    Config ``normalisation``: ``batch_min`` (N = shortest non-empty response in the micro-batch, chosen
    and rejected together; the author's current rule), ``per_sequence`` (N = |y|, the earlier rule) or
    ``none`` (N = 1); ``guards``: the 1e-6 guards of the oat code (see ``bnf_token_terms``).
    Needs per-token reference log-probs and ``O_t`` (``needs_vocab_term``). Pairs with y_w == y_l
    contribute 0 but still count in the mean over B (as in oat). Departure from oat: empty rows (unpaired
    data, see ``LossInput``) are ignored by ``batch_min`` instead of making N = 0.
    Metrics: rewards without beta, ``sum_t (logp - logp_ref)``; extras ``bnf/identical_pairs`` (fraction
    masked), ``bnf/w_chosen``, ``bnf/w_rejected`` (mean w over response tokens) and ``bnf/normaliser`` (mean N
    over the present responses: under batch_min, compare it with their mean length).
    """
    normalisation = str(cfg.get("normalisation", "batch_min"))
    guards = bool(cfg.get("guards", True))
    if inp.ref_chosen_token_logps is None or inp.ref_rejected_token_logps is None:
        raise ValueError("loss 'bnf' needs per-token reference log-probs (needs_reference: true)")
    if inp.chosen_others is None or inp.rejected_others is None:
        raise ValueError("loss 'bnf' needs O_t: score_tokens(..., with_others=True) (needs_vocab_term: true)")
    a_w, w_w, _ = bnf_token_terms(inp.chosen_token_logps, inp.ref_chosen_token_logps, inp.chosen_others,
                                  inp.chosen_mask, guards)
    a_l, w_l, _ = bnf_token_terms(inp.rejected_token_logps, inp.ref_rejected_token_logps, inp.rejected_others,
                                  inp.rejected_mask, guards)
    len_w, len_l = inp.chosen_mask.sum(-1), inp.rejected_mask.sum(-1)
    if normalisation == "batch_min":
        lengths = torch.cat([len_w, len_l])
        lengths = lengths[lengths > 0]
        n_w = n_l = lengths.min().clamp_min(1) if lengths.numel() else len_w.new_ones(())
    elif normalisation == "per_sequence":
        n_w, n_l = len_w.clamp_min(1), len_l.clamp_min(1)
    elif normalisation == "none":
        n_w = n_l = torch.ones((), dtype=len_w.dtype, device=len_w.device)
    else:
        raise UserError(f"method.normalisation={normalisation!r}: expected one of batch_min, per_sequence, none")
    identical = inp.same_response if inp.same_response is not None else _same_sequence(
        inp.chosen_token_logps, inp.chosen_mask, inp.rejected_token_logps, inp.rejected_mask)
    losses = -(a_w.sum(-1) / n_w - a_l.sum(-1) / n_l)
    losses = torch.where(identical, torch.zeros_like(losses), losses)
    reward_w = (inp.chosen_token_logps - inp.ref_chosen_token_logps) * inp.chosen_mask
    reward_l = (inp.rejected_token_logps - inp.ref_rejected_token_logps) * inp.rejected_mask
    mean_w = lambda w, mask: (w * mask).sum() / mask.sum().clamp_min(1)  # noqa: E731
    # N over the present responses: how far batch_min's shared N sits below the responses' own lengths
    present = torch.cat([len_w, len_l]) > 0
    normaliser = torch.cat([n_w.expand_as(len_w), n_l.expand_as(len_l)])[present].float()
    extra = {"bnf/identical_pairs": identical, "bnf/w_chosen": mean_w(w_w, inp.chosen_mask),
             "bnf/w_rejected": mean_w(w_l, inp.rejected_mask), "bnf/normaliser": normaliser}
    return LossOutput(losses.mean(), _metrics(inp, reward_w.sum(-1), reward_l.sum(-1), **extra))


# ----------------------------------------------------------------------------- baselines (docs/losses.md, one section each)

def ipo_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """IPO (Azar et al. 2024, Eq. 17): ``(h - 1/(2 tau))^2`` per pair ``[B]``, tau passed as ``beta``.

    ``average_log_ratios: true`` (default) builds h from per-token averaged log-ratios rho/|y|, as TRL's
    ``loss_type="ipo"`` does; the paper's h uses sequence sums (``false``), whose scale grows with length
    against a fixed 1/(2 tau) target. Rewards are TRL's ``beta * rho`` with rho the SUMMED log-ratio, whichever
    scale h uses (TRL's DPOTrainer logs the same ``rewards/*`` for every loss type).
    """
    tau = _param(cfg, "beta")
    h_w, h_l = _log_ratios(inp, "ipo", average=bool(cfg.get("average_log_ratios", True)))
    losses = (h_w - h_l - 1 / (2 * tau)) ** 2
    rho_w, rho_l = _log_ratios(inp, "ipo")
    return LossOutput(losses.mean(), _metrics(inp, tau * rho_w, tau * rho_l))


def cdpo_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """Conservative DPO (Mitchell 2023 note; TRL ``label_smoothing``): labels flipped with probability e.

    ``(1 - e) softplus(-beta h) + e softplus(beta h)``, config ``beta`` > 0, ``epsilon`` in [0, 0.5).
    """
    e = _param(cfg, "epsilon")
    return _dpo_family(inp, cfg, "cdpo", lambda z: (1 - e) * F.softplus(-z) + e * F.softplus(z))


def robust_dpo_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, Eq. 7): unbiased loss under label-flip rate e.

    ``[(1 - e) softplus(-beta h) - e softplus(beta h)] / (1 - 2e)``; ``epsilon`` in [0, 0.5). Can be negative.
    """
    e = _param(cfg, "epsilon")
    return _dpo_family(inp, cfg, "robust_dpo",
                       lambda z: ((1 - e) * F.softplus(-z) - e * F.softplus(z)) / (1 - 2 * e))


def hinge_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """Hinge / SLiC-HF (Zhao et al. 2023, Eq. 1 with the reference log-ratio as in TRL): ``relu(1 - beta h)``."""
    return _dpo_family(inp, cfg, "hinge", lambda z: torch.relu(1 - z))


def rpo_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """RPO (Pang et al. 2024, Eq. 3 as DPO + NLL): ``softplus(-beta h) + alpha * (-logp(y_w) / |y_w|)``.

    The NLL is the per-token mean over the chosen response (TRL's ``rpo_alpha``). Extra metric ``nll_loss``.
    """
    beta, alpha = _param(cfg, "beta"), _param(cfg, "alpha")
    rho_w, rho_l = _log_ratios(inp, "rpo")
    nll = -inp.chosen_logps / _lengths(inp.chosen_mask)
    losses = F.softplus(-beta * (rho_w - rho_l)) + alpha * nll
    return LossOutput(losses.mean(), _metrics(inp, beta * rho_w, beta * rho_l, nll_loss=nll))


def simpo_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free: ``softplus(-(beta avg_w - beta avg_l - gamma))``.

    avg = logp / |y| ``[B]``. ``gamma`` is the paper's margin in reward units, the same quantity as TRL's
    ``simpo_gamma`` (TRL subtracts simpo_gamma / beta inside the beta bracket: the same loss); the SimPO
    authors' code takes gamma / beta (``gamma_beta_ratio``) instead. Rewards: ``beta * avg_logp``.
    """
    beta, gamma = _param(cfg, "beta"), _param(cfg, "gamma")
    avg_w = inp.chosen_logps / _lengths(inp.chosen_mask)
    avg_l = inp.rejected_logps / _lengths(inp.rejected_mask)
    losses = F.softplus(-(beta * avg_w - beta * avg_l - gamma))
    return LossOutput(losses.mean(), _metrics(inp, beta * avg_w, beta * avg_l))


def orpo_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """ORPO (Hong et al. 2024, Eqs. 6-7), reference-free: ``-avg_w + lam * softplus(-(lo_w - lo_l))``.

    ``lo = log(P / (1 - P))`` with ``P = exp(avg_logp)``, computed as ``avg - log(-expm1(avg))``.
    Rewards: ``lam * avg_logp`` (TRL's ORPO reports beta * avg_logp with beta = lam). Extras ``nll_loss``,
    ``log_odds_ratio`` (mean log sigmoid(lo_w - lo_l)).
    """
    lam = _param(cfg, "lam")
    avg_w = inp.chosen_logps / _lengths(inp.chosen_mask)
    avg_l = inp.rejected_logps / _lengths(inp.rejected_mask)
    log_odds = lambda a: a - torch.log(-torch.expm1(a))  # noqa: E731
    ratio = log_odds(avg_w) - log_odds(avg_l)
    losses = -avg_w + lam * F.softplus(-ratio)
    return LossOutput(losses.mean(), _metrics(inp, lam * avg_w, lam * avg_l, nll_loss=-avg_w,
                                              log_odds_ratio=-F.softplus(-ratio)))


# ----------------------------------------------------------------------------- KTO (unpaired comparator)

def kto_loss(inp: LossInput, cfg: Mapping[str, Any]) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, Eqs. 7-8; TRL 1.16 ``KTOTrainer``, ``loss_type="kto"``).

    Every present response is one example, desirable (chosen) or undesirable (rejected); paired rows give
    two examples, unpaired rows one (``accepts_unpaired``). With rho = logp - logp_ref (sequence sums):
    ``L_D = lambda_D (1 - sigmoid(beta (rho - z0)))``, ``L_U = lambda_U (1 - sigmoid(beta (z0 - rho)))``; the
    loss is the mean over the examples (TRL concatenates them and takes the mean). Reference point
    ``z0`` (``reference_point``): ``batch`` = ``max(0, mean rho over the micro-batch's responses)``,
    detached, as TRL's clamped, detached batch estimate, but from the responses' OWN prompts, whereas TRL
    (and the paper) pair each prompt with another example's completion (that needs extra forwards the
    trainer does not make: docs/losses.md, KTO); ``zero``: z0 = 0. Config: ``beta`` > 0,
    ``desirable_weight``, ``undesirable_weight`` >= 0. Extra metric ``kl`` (z0, TRL's name).
    """
    beta = _param(cfg, "beta")
    weight_d, weight_u = _param(cfg, "desirable_weight"), _param(cfg, "undesirable_weight")
    point = str(cfg.get("reference_point", "batch"))
    rho_w, rho_l = _log_ratios(inp, "kto")
    has_w, has_l = inp.chosen_mask.sum(-1) > 0, inp.rejected_mask.sum(-1) > 0
    present = torch.cat([rho_w[has_w], rho_l[has_l]])
    if point == "batch":
        z0 = present.detach().mean().clamp_min(0) if present.numel() else rho_w.new_zeros(())
    elif point == "zero":
        z0 = rho_w.new_zeros(())
    else:
        raise UserError(f"method.reference_point={point!r}: expected one of batch, zero")
    losses = torch.cat([weight_d * (1 - torch.sigmoid(beta * (rho_w[has_w] - z0))),
                        weight_u * (1 - torch.sigmoid(beta * (z0 - rho_l[has_l])))])
    loss = losses.mean() if losses.numel() else rho_w.sum() * 0
    return LossOutput(loss, _metrics(inp, beta * rho_w, beta * rho_l, kl=z0))


LOSSES: dict[str, LossFn] = {
    "dpo": dpo_loss,
    "dpop": dpop_loss,
    "bnf": bnf_loss,
    "ipo": ipo_loss,
    "cdpo": cdpo_loss,
    "robust_dpo": robust_dpo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "rpo": rpo_loss,
    "kto": kto_loss,
}


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``; a ``UserError`` listing the valid names otherwise."""
    if name not in LOSSES:
        raise UserError(f"method.loss={name!r}: unknown loss; valid losses are {sorted(LOSSES)}")
    return LOSSES[name]
