"""A fused attention kernel for the pair-tree mask on CUDA: FlexAttention with a block mask.

The tree layouts (pipeline/modeling/packing.py, pipeline/modeling/multi_pair.py) need a custom mask. Given a dense 4D mask,
SDPA on CUDA falls back from its flash kernel to the memory-efficient or math kernel, which reads the
whole ``[L, L]`` mask and computes every masked block. FlexAttention takes the same rule as a
``mask_mod`` (``multi_pair.tree_visible``), turns it into a block-sparse ``BlockMask`` once per forward,
and its compiled kernel skips the blocks that are fully masked (the other pairs of a packed row, the
other suffix of a pair).

``auto`` (the default of ``ForwardSettings.attention``) uses it for a tree layout on CUDA when the model
runs SDPA (transformers' default); the CPU path keeps the dense mask. ``flex`` forces it (tests run it on
CPU, where FlexAttention has no backward: forward only). Once chosen, the model's attention stays this
kernel for the rest of the process (a checkpointed layer recomputes its forward in backward, and must
find the same kernel); a padded or one-sided row then gets transformers' own flex mask.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from pipeline.modeling.multi_pair import tree_visible

NAME = "prefopt_tree_flex"  # the attention implementation registered with transformers
KERNELS = ("auto", "mask", "flex")


def wanted(kernel: str, implementation: str | None, device: torch.device) -> bool:
    """Whether a tree layout runs FlexAttention: forced, already switched, or ``auto`` on CUDA over SDPA."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if implementation == NAME:
        return True
    return kernel == "flex" or (kernel == "auto" and device.type == "cuda" and implementation == "sdpa")


@lru_cache(maxsize=None)
def register() -> None:
    """Register the kernel and transformers' flex mask builder under ``NAME`` (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask
    AttentionInterface.register(NAME, tree_flex_attention)
    AttentionMaskInterface.register(NAME, flex_attention_mask)


def switch(config) -> None:
    """Run the model of ``config`` (a transformers config) with ``NAME`` from now on."""
    register()
    config._attn_implementation = NAME


def block_mask(tree: Tensor, device: torch.device):
    """The FlexAttention ``BlockMask`` of a row's ``tree`` ``[2, L]`` (pipeline/modeling/multi_pair.py)."""
    from torch.nn.attention.flex_attention import create_block_mask
    doc, branch = tree.to(device)
    length = int(doc.shape[0])

    def mask_mod(_batch, _head, q, k):
        return tree_visible(doc[q], branch[q], q, doc[k], branch[k], k)

    return create_block_mask(mask_mod, None, None, length, length, device=device)


@lru_cache(maxsize=None)
def _compiled():
    # Compiled once, with dynamic shapes: every packed row has its own length, and a recompile per length
    # would hit dynamo's recompile limit within a few steps.
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def _kernel(device: torch.device):
    """Compiled on CUDA (eager FlexAttention materialises the scores); eager elsewhere (CPU tests)."""
    if device.type == "cuda":
        return _compiled()
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention


def tree_flex_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                        dropout: float = 0.0, softcap: float | None = None, **_kwargs):
    """transformers' attention signature: ``query [B, Hq, L, D]``, ``key``/``value`` ``[B, Hkv, L, D]``,
    ``attention_mask`` a ``BlockMask``; returns ``([B, L, Hq, D], None)``."""
    if dropout > 0:
        raise ValueError("the tree attention kernel has no dropout (train.disable_dropout switches it off)")
    score_mod = None
    if softcap is not None:  # Gemma 2's attention logit soft-capping
        def score_mod(score, _batch, _head, _q, _k):
            return softcap * torch.tanh(score / softcap)
    output = _kernel(query.device)(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                                   enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None
