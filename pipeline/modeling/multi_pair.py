"""Several pairs per forward: each pair's own layout (pipeline/modeling/packing.py) laid side by side in one row.

A small pair (a short prompt and two short answers) costs one forward of a few dozen positions in the
one-pair layout; the model's per-call work (every layer's kernels, the mask, the head) is then paid per
pair. ``train.pack_tokens`` lays the pairs of a micro-batch one after another into rows of at most that
many positions, each pair keeping its tree: its shared prefix, then its chosen and rejected suffixes
that see the prefix and themselves, never each other; position ids restart at 0 for every pair, so
each token sees exactly what it sees in the one-pair layout (the same numbers, to float rounding).

A row is described by two vectors over its positions (``tree``): ``doc`` (which block a position belongs
to: a pair's tree, or one unshared side of a pair) and ``branch`` (0 = the block's shared part, 1 = chosen
suffix, 2 = rejected suffix). Query position ``q`` may attend to key ``k`` when ``k <= q``, both are in
the same block, and ``k`` is shared or on ``q``'s branch: ``tree_visible``. The dense 4D mask (SDPA,
eager) and the FlexAttention block mask (pipeline/modeling/tree_attention.py) are both that one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pipeline.modeling.packing import PairLayout


def tree_visible(doc_q: Tensor, branch_q: Tensor, index_q: Tensor, doc_k: Tensor, branch_k: Tensor,
                 index_k: Tensor) -> Tensor:
    """True where the query may attend to the key (broadcasting; module docstring)."""
    return (index_k <= index_q) & (doc_k == doc_q) & ((branch_k == 0) | (branch_k == branch_q))


def dense_tree_mask(tree: Tensor) -> Tensor:
    """The boolean ``[1, 1, L, L]`` mask (True = may attend) of a row's ``tree`` ``[2, L]`` (doc, branch)."""
    doc, branch = tree
    index = torch.arange(doc.shape[0], device=doc.device)
    visible = tree_visible(doc[:, None], branch[:, None], index[:, None], doc[None, :], branch[None, :], index[None, :])
    return visible[None, None]


def layout_blocks(layout: PairLayout) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """A pair's layout as blocks without padding: ``(ids, positions, branch, flat index in the layout)`` each.

    A packed pair (one row, 4D mask) is one block whose branches are its own; each row of an unshared
    layout (``[chosen, rejected]`` right-padded, or a one-sided row) is a block of its own, padding cut."""
    if layout.tree is not None:
        return [(layout.input_ids[0], layout.position_ids[0], layout.tree[1], torch.arange(layout.input_ids.shape[1]))]
    rows, width = layout.input_ids.shape
    blocks = []
    for row in range(rows):
        length = int(layout.attention[row].sum())
        blocks.append((layout.input_ids[row, :length], layout.position_ids[row, :length],
                       torch.zeros(length, dtype=torch.long), row * width + torch.arange(length)))
    return blocks


@dataclass
class PackedRow:
    """One row holding several pairs: ``layout`` is the row's model input (``[1, L]``, ``tree`` set, its
    queries every member's queries in member order); member ``m`` is ``members[m]`` of the micro-batch,
    its queries start at ``query_offsets[m]`` and ``cell_query[m]`` maps its ``[S, T-1]`` cells to them."""

    layout: PairLayout
    members: list[int]
    query_offsets: list[int]
    cell_queries: list[Tensor]
    tokens: list[int]  # positions each member takes in the row (no padding)


def pack_layouts(layouts: Sequence[PairLayout], members: Sequence[int]) -> PackedRow:
    """The layouts of ``members`` laid one after another into one row (module docstring)."""
    ids, positions, docs, branches, query_positions, labels = [], [], [], [], [], []
    offsets, cells, tokens = [], [], []
    start, queries, doc = 0, 0, 0
    for member in members:
        layout = layouts[member]
        rows, width = layout.input_ids.shape
        remap = torch.full((rows * width,), -1, dtype=torch.long)  # the layout's flat index -> the row's
        taken = 0
        for block_ids, block_positions, block_branch, flat in layout_blocks(layout):
            ids.append(block_ids)
            positions.append(block_positions)
            branches.append(block_branch)
            docs.append(torch.full_like(block_ids, doc))
            remap[flat] = start + taken + torch.arange(len(block_ids))
            taken += len(block_ids)
            doc += 1
        query_positions.append(remap[layout.query_positions])
        labels.append(layout.query_labels)
        offsets.append(queries)
        cells.append(layout.cell_query)
        tokens.append(taken)
        queries += len(layout.query_positions)
        start += taken
    tree = torch.stack([torch.cat(docs), torch.cat(branches)])
    row = PairLayout(torch.cat(ids)[None], torch.cat(positions)[None], None, torch.cat(query_positions),
                     torch.cat(labels), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long),
                     0, tree)
    return PackedRow(row, list(members), offsets, cells, tokens)


def row_tokens(layout: PairLayout) -> int:
    """Positions a pair's layout takes in a packed row (its padding cut)."""
    return int(layout.input_ids.shape[1]) if layout.tree is not None else int(layout.attention.sum())


def bins(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive members grouped greedily, in order, into rows of at most ``budget`` positions; a member
    larger than the budget gets a row of its own."""
    groups: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if groups and used + size <= budget:
            groups[-1].append(index)
            used += size
        else:
            groups.append([index])
            used = size
    return groups
