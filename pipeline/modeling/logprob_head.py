"""The output head, chunked: log-probs, centred observed logits and BNF's O_t without a ``[rows, T, V]`` tensor.

A model's ``logits`` are ``[rows, T, V]``: at V = 128k (Llama-3) or 152k (Qwen2.5) the fp32 logits, the
log-softmax autograd keeps and O_t's weights are gigabytes per micro-batch. Here the decoder's final
hidden states are projected ``chunk`` positions at a time, only at the positions that predict a scored
token, and each chunk's ``[chunk, V]`` tensors are freed before the next one. Backward recomputes a
chunk's logits and applies the closed-form gradient instead of keeping them:

    d logp_y / dz = e_y - p,   d O_t / dz = -p_y (e_y - p)   =>   dL/dz = (g_logp - g_O * p_y) (e_y - p)

(``O_t = sum_{j != y} sg(p_j) log p_j``: docs/losses.md). Forward stores only the hidden states it read,
the log-sum-exp and ``p_y`` per position. The per-position math of the forward is ``token_terms``, the
same function that scores a model's full logits.

The head is ``z = scale * (h W^T + b)``, then ``cap * tanh(z / cap)`` where the model's config sets
``final_logit_softcapping`` (Gemma 2/3); ``logit_scale`` (Cohere) is the scale. ``head_of`` refuses any
other output module with one line. The head's matmuls run in fp32 even under bf16 autocast (autocast is
off inside), as the model's own head does (``models.keep_output_head_fp32``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.errors import UserError
from pipeline.modeling.logprobs import token_terms


@dataclass(frozen=True)
class Head:
    """A linear output head and the post-processing its model applies to the logits."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    scale: float | None = None  # logits * scale (Cohere's logit_scale)
    softcap: float | None = None  # cap * tanh(logits / cap) (Gemma's final_logit_softcapping)


def unwrap(model):
    """The transformers model inside a DDP/FSDP (``.module``) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def head_of(model) -> Head:
    """The output head of a transformers causal LM (PEFT-wrapped too); one line if it is not a plain Linear."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"model {type(inner).__name__}: its output head is {type(head).__name__}, not a linear "
                        f"projection; the chunked log-prob head supports Linear heads only")
    config = getattr(inner, "config", None)
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(head.weight, head.bias, float(scale) if scale else None, float(softcap) if softcap else None)


def _logits(hidden: Tensor, head: Head, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fp32 ``[Q, V]`` logits of ``hidden [Q, H]`` (``weight``/``bias`` already in the matmul dtype)."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        z = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(_compute_dtype(z.dtype))
    if head.scale is not None:
        z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # float64 kept (gradient checks)


def _cast(head: Head) -> tuple[Tensor, Tensor | None]:
    """The head's parameters in fp32 (float64 kept), for every matmul of the head: bf16 logits are rounded
    to ~0.1 nats at typical magnitudes, enough for two layouts of one sequence to differ visibly
    (``models.keep_output_head_fp32`` keeps the model's own head fp32 for the same reason)."""
    dtype = _compute_dtype(head.weight.dtype)
    return head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)


def head_logits(hidden: Tensor, head: Head) -> Tensor:
    """fp32 logits ``[Q, V]`` of ``hidden [Q, H]``, no grad: the head as the chunks compute it."""
    with torch.no_grad():
        weight, bias = _cast(head)
        return _logits(hidden.detach(), head, weight, bias)


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head, chunk, with_others):
        cast_weight, cast_bias = _cast(head)
        logps, observed, others, lse, p_label = [], [], [], [], []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                z = _logits(hidden[start:start + chunk], head, cast_weight, cast_bias)
                y = labels[start:start + chunk]
                logp, obs, o_t = token_terms(z, y, with_others)
                logps.append(logp)
                observed.append(obs)
                if with_others:
                    others.append(o_t)
                lse.append(torch.logsumexp(z, dim=-1))
                p_label.append(logp.exp())
        lse, p_label = torch.cat(lse), torch.cat(p_label)
        ctx.save_for_backward(hidden, labels, lse, p_label)
        ctx.head, ctx.chunk = head, chunk
        observed = torch.cat(observed)
        ctx.mark_non_differentiable(observed)
        return torch.cat(logps), observed, torch.cat(others) if with_others else None

    @staticmethod
    def backward(ctx, g_logp, _g_observed, g_others):
        hidden, labels, lse, p_label = ctx.saved_tensors
        head, chunk = ctx.head, ctx.chunk
        cast_weight, cast_bias = _cast(head)
        # dL/dz = a (e_y - p) with a = g_logp - g_O * p_y (module docstring).
        a = torch.zeros_like(lse) if g_logp is None else g_logp.to(lse.dtype)
        if g_others is not None:
            a = a - g_others.to(lse.dtype) * p_label
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(head.weight.shape, dtype=lse.dtype, device=hidden.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(head.bias.shape, dtype=lse.dtype, device=hidden.device) \
            if head.bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            z = _logits(h, head, cast_weight, cast_bias)
            rows = torch.arange(z.shape[0], device=z.device)
            dz = torch.exp(z - lse[start:start + chunk, None]).mul_(-a[start:start + chunk, None])
            dz[rows, labels[start:start + chunk]] += a[start:start + chunk]
            if head.softcap is not None:  # z = cap * tanh(r / cap): dz/dr = 1 - (z / cap)^2
                dz.mul_(1 - (z / head.softcap) ** 2)
            if head.scale is not None:
                dz.mul_(head.scale)
            dz_mm = dz.to(cast_weight.dtype)
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = (dz_mm @ cast_weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (dz_mm.T @ h.to(cast_weight.dtype)).to(lse.dtype)
            if grad_bias is not None:
                grad_bias += dz.sum(0)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(head.weight.dtype),
                None if grad_bias is None else grad_bias.to(head.bias.dtype),
                None, None, None, None)


def score_hidden(hidden: Tensor, labels: Tensor, head: Head, chunk: int | None = None,
                 with_others: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """``hidden [Q, H]`` (the decoder's output at the positions that predict ``labels [Q]``) -> fp32
    ``(log p(label), centred observed logit, O_t or None)``, each ``[Q]``; ``chunk`` positions at a time
    (None: all at once), with grad to ``hidden`` and the head's parameters."""
    chunk = max(int(chunk or hidden.shape[0] or 1), 1)
    if hidden.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        zero = hidden.sum() * 0 + head.weight.sum() * 0  # keeps the graph connected for DDP
        return empty + zero, empty, (empty + zero) if with_others else None
    logp, observed, others = _ChunkedHead.apply(hidden, head.weight, head.bias, labels, head, chunk, with_others)
    return logp, observed, others


def is_sharded(model) -> bool:
    """The model is sharded by FSDP2 (pipeline/training/sharding.py)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule) or isinstance(unwrap(model), FSDPModule)


def owning_unit(model):
    """The FSDP2 unit that holds the output head's weight (accelerate's tail unit: final norm + head)."""
    from torch.distributed.fsdp import FSDPModule
    head = unwrap(model).get_output_embeddings()
    if isinstance(head, FSDPModule):
        return head
    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)
             and any(p is head.weight for p in m.parameters(recurse=False))]
    return units[0] if units else unwrap(model)


def score_sharded(model, hidden: Tensor, labels: Tensor, chunk: int | None = None,
                  with_others: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """``score_hidden`` for an FSDP2 model: the head's unit is all-gathered again before the chunked head's backward.

    After the model's forward the head's weight is the tail unit's all-gathered parameter (that unit is not
    resharded after its forward), so the forward reads it as it is. Its backward is outside every FSDP hook,
    though: by then the backward of another pair of the micro-batch may have resharded the unit (its storage
    freed), and nothing would gather it again. A gradient hook on the head's outputs calls the unit's
    ``unshard()`` (a no-op when it is still gathered) just before that backward; the weight's gradient then
    accumulates on the gathered parameter and is reduce-scattered with the unit's own, after the final norm's
    backward. The numbers are ``score_hidden``'s."""
    unit = owning_unit(model)
    outputs = score_hidden(hidden, labels, head_of(model), chunk, with_others)

    def gather(grad: Tensor) -> Tensor:
        unit.unshard()
        return grad

    for output in (outputs[0], outputs[2]):
        if output is not None and output.requires_grad:
            output.register_hook(gather)  # on both: a loss may read only one (unshard is a no-op the second time)
    return outputs
