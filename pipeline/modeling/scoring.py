"""Score every pair's chosen and rejected response under a model: ragged per-token results.

Used by the reference stage (once per sweep), the trainer's probe trajectories and evaluation.
For each pair and side it keeps, over the RESPONSE tokens only (the EOS included), the fp32
log-prob of the observed token, its raw logit (for the logit-shift analysis) and its id (for
Smaug's first-difference index). Rows are stored flat with offsets, as safetensors.

A one-sided row (unpaired data) is scored alone (``response_forward``: one row, no padding) and
stored as a row whose absent side is empty (0 tokens); everything that reads ``ScoredPairs`` sees
an absent side as length 0.
"""

from __future__ import annotations

import json
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.modeling.batching import OneSidedEncoding, PairEncoding, encode_pairs
from pipeline.errors import UserError
from pipeline.modeling.logprob_head import head_logits, head_of, is_sharded, score_hidden, score_sharded, unwrap
from pipeline.modeling.logprobs import TokenScores
from pipeline.modeling.multi_pair import PackedRow, dense_tree_mask
from pipeline.modeling.packing import SHARING, PairLayout, one_row_layout, pair_layout
from pipeline.modeling import tree_attention

SIDES = ("chosen", "rejected")
FORMAT = "prefopt.scored_pairs/2"
METADATA_KEY = "prefopt"  # ONE metadata entry: safetensors writes several in a random (hash-map) order,
#                          so the same scores would give files that differ byte for byte


@dataclass
class ScoredPairs:
    """Ragged per-response-token scores of N pairs; row ``i`` of each side is ``flat[offsets[i]:offsets[i+1]]``."""

    pair_ids: list[Any]
    logps: dict[str, torch.Tensor]  # side -> fp32 [total tokens]
    token_id_values: dict[str, torch.Tensor]  # side -> int64 [total tokens]
    offsets: dict[str, torch.Tensor]  # side -> int64 [N+1]
    logits: dict[str, torch.Tensor] | None = None  # side -> fp32 [total tokens] observed-token logits
    _index: dict[Any, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {pair_id: row for row, pair_id in enumerate(self.pair_ids)}

    def __len__(self) -> int:
        return len(self.pair_ids)

    def _span(self, side: str, i: int) -> slice:
        offsets = self.offsets[_side(side)]
        return slice(int(offsets[i]), int(offsets[i + 1]))

    def token_logps(self, side: str, i: int) -> torch.Tensor:
        return self.logps[_side(side)][self._span(side, i)]

    def observed_logits(self, side: str, i: int) -> torch.Tensor:
        if self.logits is None:
            raise ValueError("these scores were computed with with_logits=False")
        return self.logits[_side(side)][self._span(side, i)]

    def token_ids(self, side: str, i: int) -> torch.Tensor:
        return self.token_id_values[_side(side)][self._span(side, i)]

    def lengths(self, side: str) -> torch.Tensor:
        return self.offsets[_side(side)].diff()

    def seq_logps(self, side: str) -> torch.Tensor:
        """Summed response log-prob per pair, fp32 ``[N]`` (summed in float64)."""
        flat, offsets = self.logps[_side(side)], self.offsets[_side(side)]
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), flat.double().cumsum(0)])
        return (cumulative[offsets[1:]] - cumulative[offsets[:-1]]).float()

    def row(self, pair_id: Any) -> int:
        return self._index[pair_id]

    def select(self, rows: Sequence[int]) -> "ScoredPairs":
        """A new ScoredPairs with these rows, in this order."""
        return _from_rows([self.pair_ids[i] for i in rows], {
            side: [(self.token_logps(side, i), self.token_ids(side, i),
                    None if self.logits is None else self.observed_logits(side, i)) for i in rows]
            for side in SIDES
        }, with_logits=self.logits is not None)

    def save(self, path: Path | str) -> None:
        tensors = {}
        for side in SIDES:
            tensors[f"{side}.logps"] = self.logps[side].contiguous()
            tensors[f"{side}.token_ids"] = self.token_id_values[side].contiguous()
            tensors[f"{side}.offsets"] = self.offsets[side].contiguous()
            if self.logits is not None:
                tensors[f"{side}.logits"] = self.logits[side].contiguous()
        header = json.dumps({"format": FORMAT, "pair_ids": self.pair_ids})
        save_file(tensors, str(path), metadata={METADATA_KEY: header})

    @classmethod
    def load(cls, path: Path | str) -> "ScoredPairs":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        try:
            header = json.loads(metadata.get(METADATA_KEY, "{}"))
        except json.JSONDecodeError:
            header = {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a scored-pairs file (format {header.get('format')!r})")
        tensors = load_file(str(path))
        has_logits = f"{SIDES[0]}.logits" in tensors
        return cls(
            pair_ids=list(header["pair_ids"]),
            logps={s: tensors[f"{s}.logps"] for s in SIDES},
            token_id_values={s: tensors[f"{s}.token_ids"] for s in SIDES},
            offsets={s: tensors[f"{s}.offsets"] for s in SIDES},
            logits={s: tensors[f"{s}.logits"] for s in SIDES} if has_logits else None,
        )


def _side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return side


def _from_rows(pair_ids: list[Any], rows: dict[str, list[tuple]], with_logits: bool) -> ScoredPairs:
    def flat(items: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(items).to(dtype) if items else torch.zeros(0, dtype=dtype)

    logps, ids, offsets, logits = {}, {}, {}, {}
    for side in SIDES:
        side_rows = rows[side]
        logps[side] = flat([r[0] for r in side_rows], torch.float32)
        ids[side] = flat([r[1] for r in side_rows], torch.long)
        lengths = torch.tensor([0] + [len(r[0]) for r in side_rows], dtype=torch.long)
        offsets[side] = lengths.cumsum(0)
        if with_logits:
            logits[side] = flat([r[2] for r in side_rows], torch.float32)
    return ScoredPairs(list(pair_ids), logps, ids, offsets, logits if with_logits else None)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast when ``precision == "bf16"`` (as the trainer's forward), else plain fp32/native."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class ForwardSettings:
    """How a pair goes through the model (pipeline/modeling/packing.py, pipeline/modeling/logprob_head.py): the same in every
    stage that scores pairs (reference, training, probes, evaluation), so step 0 reproduces the reference."""

    sharing: str = "response"  # response | prompt | none (train.prefix_sharing)
    chunk: int | None = 1024  # positions per chunk of the output head (train.logprob_chunk); None = all at once
    precision: str = "fp32"  # fp32 | bf16: autocast of the forward (the head itself always runs in fp32)
    pack_tokens: int | None = None  # training: positions per row of several pairs (train.pack_tokens); None = one pair
    attention: str = "auto"  # auto | mask | flex: the kernel of a tree layout (pipeline/modeling/tree_attention.py)

    @classmethod
    def from_config(cls, train_cfg, precision: str) -> "ForwardSettings":
        sharing = str(train_cfg.get("prefix_sharing", "response"))
        if sharing not in SHARING:
            raise UserError(f"train.prefix_sharing={sharing!r}: expected one of {', '.join(SHARING)}")
        chunk = train_cfg.get("logprob_chunk", 1024)
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise UserError(f"train.logprob_chunk={chunk!r}: expected a positive integer or null")
        pack = train_cfg.get("pack_tokens")
        if pack is not None and (not isinstance(pack, int) or isinstance(pack, bool) or pack < 1):
            raise UserError(f"train.pack_tokens={pack!r}: expected a positive integer (positions per row) or null")
        return cls(sharing, chunk, precision, pack)

    def key(self) -> dict[str, Any]:
        """The settings in the keys of the stages that score pairs (precision is keyed by each stage)."""
        return {"prefix_sharing": self.sharing, "logprob_chunk": self.chunk}


def forward_settings(cfg) -> ForwardSettings:
    """The run's ``ForwardSettings`` from ``cfg.train`` (precision resolved: "auto" -> what runs)."""
    from pipeline.modeling.precision import resolve_precision
    return ForwardSettings.from_config(cfg.train, resolve_precision(cfg.train.precision))


MASKABLE = ("sdpa", "eager")  # attention implementations that take a custom 4D mask
_head_checked: "weakref.WeakSet" = weakref.WeakSet()


def _attention_mask(model, layout: PairLayout, settings: ForwardSettings, device: torch.device):
    if layout.tree is None:
        return layout.attention.to(device)
    config = unwrap(model).config
    implementation = getattr(config, "_attn_implementation", None)
    if tree_attention.wanted(settings.attention, implementation, device):
        tree_attention.switch(config)
        return tree_attention.block_mask(layout.tree, device)
    if implementation not in MASKABLE:
        what = (f"train.prefix_sharing={settings.sharing}" if layout.shared
                else f"train.pack_tokens={settings.pack_tokens}")
        fix = "train.prefix_sharing=none" if layout.shared else "train.pack_tokens=null"
        raise UserError(f"model.attn_implementation={implementation}: cannot take the custom attention mask of "
                        f"{what} (needs one of {', '.join(MASKABLE)}); set {fix} or model.attn_implementation=sdpa")
    mask = (layout.attention if layout.attention is not None else dense_tree_mask(layout.tree)).to(device)
    if implementation == "eager":  # eager attention adds the mask to its scores
        dtype = unwrap(model).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def _decoder_states(model, layout: PairLayout, settings: ForwardSettings, device: torch.device) -> tuple[Tensor, Tensor]:
    """The decoder's final hidden states ``[R, L, H]`` (what the head reads) and the model's own logits of
    each row's last position (its head is run on one position only: ``logits_to_keep=1``).

    The model is called whole (a DDP wrapper's forward must run) and the hidden states are taken from its
    decoder's output by a hook."""
    captured = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    hook = unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        out = model(input_ids=layout.input_ids.to(device), attention_mask=_attention_mask(model, layout, settings, device),
                    position_ids=layout.position_ids.to(device), logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[-1], out.logits[:, -1]


def _check_head(model, hidden: Tensor, model_logits: Tensor, head) -> None:
    """Once per model: the chunked head reproduces the model's own logits (else its head is not plain)."""
    inner = unwrap(model)
    if inner in _head_checked:
        return
    with torch.no_grad():
        ours, theirs = head_logits(hidden[:, -1], head), model_logits.detach().float()
        # Both heads run in fp32 on the same hidden states: a structural difference (a missing scale or cap)
        # is orders of magnitude above the rounding of two matmul kernels.
        tolerance = 1e-4 * max(1.0, float(theirs.abs().max()))
        if not torch.allclose(ours, theirs, rtol=0, atol=tolerance):
            raise UserError(f"model {type(inner).__name__}: its logits are not a linear head of the decoder's output "
                            f"(max difference {float((ours - theirs).abs().max()):.3g}); the chunked log-prob head "
                            f"cannot score this architecture")
    _head_checked.add(inner)


def layout_queries(model, layout: PairLayout, settings: ForwardSettings, device: torch.device,
                   with_others: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward of ``layout``: fp32 ``(log p, centred observed logit, O_t or None)`` of each of its queries."""
    hidden, model_logits = _decoder_states(model, layout, settings, device)
    head = head_of(model)
    _check_head(model, hidden, model_logits, head)
    flat = hidden.reshape(-1, hidden.shape[-1])
    positions, labels = layout.query_positions.to(device), layout.query_labels.to(device)
    if is_sharded(model):  # FSDP2: the head's unit is gathered again before its backward (logprob_head.score_sharded)
        logps, observed, others = score_sharded(model, flat[positions], labels, settings.chunk, with_others)
    else:
        logps, observed, others = score_hidden(flat[positions], labels, head, settings.chunk, with_others)
    return logps, observed, others


def place_scores(cell_query: Tensor, logps: Tensor, observed: Tensor, others: Tensor | None,
                 device: torch.device) -> TokenScores:
    """Per-query results placed on a layout's ``[S, T-1]`` cells (``cell_query``: -1 = not scored)."""
    cells = cell_query.to(device)
    present = cells >= 0
    index = cells.clamp_min(0)
    zero = torch.zeros((), dtype=torch.float32, device=device)

    def place(values: Tensor) -> Tensor:
        return torch.where(present, values[index], zero) if values.numel() else torch.zeros(cells.shape, device=device)

    return TokenScores(token_logps=place(logps), mask=present.float(), observed_logits=place(observed),
                       others=None if others is None else place(others))


def layout_forward(model, layout: PairLayout, settings: ForwardSettings, device: torch.device,
                   with_others: bool = False) -> TokenScores:
    """``TokenScores`` ``[S, T-1]`` (S = the layout's sides) of one pair's (or one row's) layout."""
    return place_scores(layout.cell_query, *layout_queries(model, layout, settings, device, with_others), device)


def packed_forward(model, row: PackedRow, settings: ForwardSettings, device: torch.device,
                   with_others: bool = False) -> list[TokenScores]:
    """One forward of a row holding several pairs (pipeline/modeling/multi_pair.py): each member's ``TokenScores``,
    as ``layout_forward`` of its own layout gives them."""
    logps, observed, others = layout_queries(model, row.layout, settings, device, with_others)
    scores = []
    for offset, cells in zip(row.query_offsets, row.cell_queries):
        shifted = torch.where(cells >= 0, cells + offset, cells)
        scores.append(place_scores(shifted, logps, observed, others, device))
    return scores


def pair_forward(model, encoding: PairEncoding, pad_id: int, device: torch.device, with_others: bool = False,
                 settings: ForwardSettings = ForwardSettings()):
    """One pair's forward in its layout (``settings.sharing``); ``TokenScores`` ``[2, T-1]`` of both sides
    (row 0 chosen, row 1 rejected) and their token ids right-padded to ``[2, T]``.

    The layout depends on the pair alone, never on which other pairs share a batch: the reference
    stage, the trainer, probes and evaluation all score a pair through this function, so the policy's
    first forward reproduces the reference log-probs bit for bit (in any precision).
    """
    layout = pair_layout(encoding.chosen_ids, encoding.rejected_ids, encoding.chosen_start, encoding.rejected_start,
                         settings.sharing, pad_id)
    return layout_forward(model, layout, settings, device, with_others), layout.padded_ids.to(device)


def response_forward(model, encoding: OneSidedEncoding, pad_id: int, device: torch.device, with_others: bool = False,
                     settings: ForwardSettings = ForwardSettings()):
    """One response alone (a one-sided row): a single row, no padding; ``TokenScores`` ``[1, T-1]``.

    The one-sided counterpart of ``pair_forward``: the reference stage, the trainer, probes and
    evaluation all score a one-sided row through it, so its first training forward is bit-identical
    to the stored reference too.
    """
    layout = one_row_layout(encoding.ids, encoding.start)
    return layout_forward(model, layout, settings, device, with_others), layout.padded_ids.to(device)


@torch.no_grad()
def score_encodings(model, encodings: Sequence[PairEncoding | OneSidedEncoding], pad_id: int, pair_ids: Sequence[Any],
                    with_logits: bool = True, settings: ForwardSettings = ForwardSettings(), progress: bool = True,
                    desc: str = "scoring pairs") -> ScoredPairs:
    """Score each pair with ``pair_forward`` (chosen and rejected in one forward), each one-sided row
    with ``response_forward`` (its absent side stored as an empty row)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: dict[str, list[tuple]] = {side: [] for side in SIDES}
    empty = (torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0) if with_logits else None)
    try:
        for encoding in tqdm(encodings, desc=desc, unit="pair", disable=not progress):
            one_sided = isinstance(encoding, OneSidedEncoding)
            with autocast_context(device, settings.precision):
                forward = response_forward if one_sided else pair_forward
                scores, input_ids = forward(model, encoding, pad_id, device, settings=settings)
            keep = scores.mask.bool().cpu()
            token_logps, observed, targets = scores.token_logps.cpu(), scores.observed_logits.cpu(), input_ids[:, 1:].cpu()
            for k, side in enumerate([encoding.side] if one_sided else SIDES):
                rows[side].append((token_logps[k][keep[k]], targets[k][keep[k]],
                                   observed[k][keep[k]] if with_logits else None))
            if one_sided:
                rows["rejected" if encoding.side == "chosen" else "chosen"].append(empty)
    finally:
        model.train(was_training)
    return _from_rows(list(pair_ids), rows, with_logits)


def concat_scored(parts: Sequence[ScoredPairs]) -> ScoredPairs:
    """One ``ScoredPairs`` holding the rows of ``parts`` in order (logits kept when every part has them)."""
    with_logits = all(part.logits is not None for part in parts)
    logps, ids, offsets, logits = {}, {}, {}, {}
    for side in SIDES:
        logps[side] = torch.cat([part.logps[side] for part in parts])
        ids[side] = torch.cat([part.token_id_values[side] for part in parts])
        starts, shifted = 0, [torch.zeros(1, dtype=torch.long)]
        for part in parts:
            shifted.append(part.offsets[side][1:] + starts)
            starts += int(part.offsets[side][-1])
        offsets[side] = torch.cat(shifted)
        if with_logits:
            logits[side] = torch.cat([part.logits[side] for part in parts])
    return ScoredPairs([pid for part in parts for pid in part.pair_ids], logps, ids, offsets,
                       logits if with_logits else None)


def score_pairs(model, tokenizer, pairs_df, max_length: int, max_prompt_length: int,
                with_logits: bool = True, settings: ForwardSettings = ForwardSettings(), progress: bool = True,
                desc: str = "scoring pairs") -> ScoredPairs:
    """Score every row of ``pairs_df`` (columns pair_id, prompt, chosen, rejected) under ``model``; a row
    whose chosen or rejected is None is one-sided and scored alone (``response_forward``)."""
    encodings = encode_pairs(tokenizer, list(pairs_df["prompt"]), list(pairs_df["chosen"]), list(pairs_df["rejected"]),
                             int(max_length), int(max_prompt_length))
    pair_ids = [_plain(v) for v in pairs_df["pair_id"]]
    return score_encodings(model, encodings, tokenizer.pad_token_id, pair_ids,
                           with_logits=with_logits, settings=settings, progress=progress, desc=desc)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values, so pair ids survive JSON."""
    return value.item() if hasattr(value, "item") else value
