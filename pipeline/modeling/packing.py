"""Forward layouts of one pair: which tokens go through the model, and which position scores which token.

Every loss reads, per side, the log-prob of each response token ``ids[k]`` from the logits at position
``k - 1`` of that side's sequence. The layouts below compute those logits with less work and the same
numbers (within float rounding; exactly the same in every stage, since all of them use one layout):

- ``none``: rows ``[chosen, rejected]``, right-padded to the longer one (the unshared computation).
- ``prompt``: ONE packed row ``prompt | chosen response | rejected response``; the rejected tokens attend
  to the prompt and to themselves, never to the chosen ones, and their position ids restart where the
  prompt ends, so each response sees exactly what it sees alone (the "prefix sharing" of Wang and Hegde,
  arXiv 2410.20305). The prompt is computed once.
- ``response`` (default): the shared part goes on to the first token where chosen and rejected differ:
  ``prompt + common response prefix | chosen rest | rejected rest``. Before that token both sequences
  are identical, so their hidden states are too (causal attention); a low-edit-distance pair (one
  corrupted step) computes most of its response once.

The packed row has no padding at all; its 4D mask is built here (never inferred from position ids: a
2D mask next to packed position ids makes transformers' SDPA path attend across segments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.modeling.logprobs import first_difference_index

SHARING = ("response", "prompt", "none")


@dataclass
class PairLayout:
    """Model inputs for one pair and the map from scored tokens to hidden positions.

    ``input_ids``/``position_ids`` are ``[R, L]``; ``attention`` is a 2D padding mask ``[R, L]`` (layout
    ``none``) or a 4D boolean ``[1, 1, L, L]`` mask (True = may attend); a one-row tree layout also has
    ``tree`` ``[2, L]`` (block and branch of each position, pipeline/modeling/multi_pair.py), from which that mask
    follows (``attention`` may then be None: built only by the attention that needs it). ``query_positions[q]`` is the
    flat index into ``[R * L]`` hidden states whose logits score ``query_labels[q]``; ``cell_query[s, k-1]``
    is the query that scores token ``k`` of side ``s`` (-1 where ``k`` is not a response token), in the
    ``[2, T-1]`` layout of ``TokenScores`` (T = the longer side's length).
    """

    input_ids: Tensor
    position_ids: Tensor
    attention: Tensor
    query_positions: Tensor
    query_labels: Tensor
    cell_query: Tensor
    padded_ids: Tensor  # [2, T] the sides right-padded, as the ``none`` rows (for token ids and masks)
    shared: int  # tokens computed once for both sides (0 for ``none``)
    tree: Tensor | None = None  # [2, L] (block, branch) of a one-row tree layout; None for padded rows

    @property
    def tokens(self) -> int:
        """Positions the model computes, padding included."""
        return int(self.input_ids.numel())


def shared_length(chosen: list[int], rejected: list[int], chosen_start: int, rejected_start: int, sharing: str) -> int:
    """Tokens at the start of both sequences computed once: 0, the prompt, or the prompt and the common
    response prefix (up to, not including, the first differing token)."""
    if sharing not in SHARING:
        raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
    if sharing == "none" or chosen_start != rejected_start or chosen[:chosen_start] != rejected[:rejected_start]:
        return 0
    if sharing == "prompt":
        return chosen_start
    return chosen_start + first_difference_index(chosen[chosen_start:], rejected[rejected_start:])


def computed_tokens(chosen: list[int], rejected: list[int], chosen_start: int, rejected_start: int, sharing: str) -> int:
    """Positions the model computes for one pair in this layout (padding included)."""
    shared = shared_length(chosen, rejected, chosen_start, rejected_start, sharing)
    if shared == 0:
        return 2 * max(len(chosen), len(rejected))
    return len(chosen) + len(rejected) - shared


def pair_layout(chosen: list[int], rejected: list[int], chosen_start: int, rejected_start: int,
                sharing: str, pad_id: int) -> PairLayout:
    """The layout of one pair (module docstring); a pair whose prompts differ is never shared."""
    width = max(len(chosen), len(rejected))
    padded = torch.full((2, width), int(pad_id), dtype=torch.long)
    padded[0, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    padded[1, :len(rejected)] = torch.tensor(rejected, dtype=torch.long)
    shared = shared_length(chosen, rejected, chosen_start, rejected_start, sharing)
    if shared == 0:
        return _unshared(chosen, rejected, chosen_start, rejected_start, padded)
    return _packed(chosen, rejected, chosen_start, rejected_start, shared, padded)


def _queries(sides: list[tuple[list[int], int]], position_of) -> tuple[list[int], list[int], Tensor]:
    """One query per distinct (hidden position, label); ``position_of(side, k)`` places position k of a side."""
    width = max(len(ids) for ids, _ in sides)
    cell_query = torch.full((2, max(width - 1, 0)), -1, dtype=torch.long)
    positions, labels, seen = [], [], {}
    for side, (ids, start) in enumerate(sides):
        for k in range(max(start, 1), len(ids)):
            key = (position_of(side, k - 1), ids[k])
            if key not in seen:
                seen[key] = len(positions)
                positions.append(key[0])
                labels.append(key[1])
            cell_query[side, k - 1] = seen[key]
    return positions, labels, cell_query


def _unshared(chosen, rejected, chosen_start, rejected_start, padded) -> PairLayout:
    width = padded.shape[1]
    attention = torch.zeros((2, width), dtype=torch.long)
    attention[0, :len(chosen)] = 1
    attention[1, :len(rejected)] = 1
    positions, labels, cell_query = _queries([(chosen, chosen_start), (rejected, rejected_start)],
                                             lambda side, k: side * width + k)
    return PairLayout(padded, torch.arange(width).repeat(2, 1), attention, torch.tensor(positions, dtype=torch.long),
                      torch.tensor(labels, dtype=torch.long), cell_query, padded, 0)


def _packed(chosen, rejected, chosen_start, rejected_start, shared, padded) -> PairLayout:
    chosen_rest, rejected_rest = len(chosen) - shared, len(rejected) - shared
    ids = chosen + rejected[shared:]  # shared | chosen rest | rejected rest
    length = len(ids)
    positions = list(range(len(chosen))) + list(range(shared, len(rejected)))
    segment = torch.tensor([0] * shared + [1] * chosen_rest + [2] * rejected_rest)
    index = torch.arange(length)
    causal = index[None, :] <= index[:, None]  # [query, key]
    visible = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
    attention = (causal & visible)[None, None]  # [1, 1, L, L]

    def position_of(side: int, k: int) -> int:
        if k < shared or side == 0:
            return k  # the shared part, then the chosen rest, sit where they sit in the chosen sequence
        return len(chosen) + (k - shared)

    query_positions, labels, cell_query = _queries([(chosen, chosen_start), (rejected, rejected_start)], position_of)
    return PairLayout(torch.tensor([ids], dtype=torch.long), torch.tensor([positions], dtype=torch.long), attention,
                      torch.tensor(query_positions, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                      cell_query, padded, shared, torch.stack([torch.zeros_like(segment), segment]))


def one_row_layout(ids: list[int], start: int) -> PairLayout:
    """A one-sided row alone (unpaired data): one row, no padding; ``cell_query`` has one side."""
    positions, labels, cell_query = _queries([(ids, start)], lambda side, k: k)
    tensor = torch.tensor([ids], dtype=torch.long)
    return PairLayout(tensor, torch.arange(len(ids))[None], torch.ones_like(tensor), torch.tensor(positions, dtype=torch.long),
                      torch.tensor(labels, dtype=torch.long), cell_query[:1], tensor, 0)
