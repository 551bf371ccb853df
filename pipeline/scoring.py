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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.batching import OneSidedEncoding, PairEncoding, collate, collate_rows, encode_pairs
from pipeline.logprobs import score_tokens

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


def response_logits(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of the positions that predict response tokens, with input_ids and response_mask cut to match.

    Only positions from the batch's earliest response start on predict response tokens: the
    vocabulary projection (and later the log-softmax) of the prompt positions before it is skipped.
    Shared by reference scoring and the training forward so both see the same computation.
    """
    width = batch["input_ids"].shape[1]
    has_response = batch["response_mask"].bool().any(dim=1)
    starts = batch["response_mask"].float().argmax(dim=1)[has_response]
    keep_from = max(int(starts.min()) - 1, 0) if len(starts) else 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=width - keep_from).logits
    return logits, batch["input_ids"][:, keep_from:], batch["response_mask"][:, keep_from:]


def pair_forward(model, encoding: PairEncoding, pad_id: int, device: torch.device, with_others: bool = False):
    """One pair's forward: rows [chosen, rejected] padded to the pair's longer one; ``TokenScores`` of both.

    The layout depends on the pair alone, never on which other pairs share a batch: the reference
    stage, the trainer, probes and evaluation all score a pair through this function, so the policy's
    first forward reproduces the reference log-probs bit for bit (in any precision), and no token is
    computed for padding longer than the pair itself.
    """
    batch = {k: v.to(device) for k, v in collate([encoding], pad_id).items()}
    logits, input_ids, response_mask = response_logits(model, batch)
    return score_tokens(logits, input_ids, response_mask, with_others=with_others), input_ids


def response_forward(model, encoding: OneSidedEncoding, pad_id: int, device: torch.device, with_others: bool = False):
    """One response alone (a one-sided row): a single row, no padding; ``TokenScores`` ``[1, T-1]``.

    The one-sided counterpart of ``pair_forward``: the reference stage, the trainer, probes and
    evaluation all score a one-sided row through it, so its first training forward is bit-identical
    to the stored reference too.
    """
    batch = {k: v.to(device) for k, v in collate_rows([(encoding.ids, encoding.start)], pad_id).items()}
    logits, input_ids, response_mask = response_logits(model, batch)
    return score_tokens(logits, input_ids, response_mask, with_others=with_others), input_ids


@torch.no_grad()
def score_encodings(model, encodings: Sequence[PairEncoding | OneSidedEncoding], pad_id: int, pair_ids: Sequence[Any],
                    with_logits: bool = True, precision: str = "fp32", progress: bool = True,
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
            with autocast_context(device, precision):
                forward = response_forward if one_sided else pair_forward
                scores, input_ids = forward(model, encoding, pad_id, device)
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
                with_logits: bool = True, precision: str = "fp32", progress: bool = True,
                desc: str = "scoring pairs") -> ScoredPairs:
    """Score every row of ``pairs_df`` (columns pair_id, prompt, chosen, rejected) under ``model``; a row
    whose chosen or rejected is None is one-sided and scored alone (``response_forward``)."""
    encodings = encode_pairs(tokenizer, list(pairs_df["prompt"]), list(pairs_df["chosen"]), list(pairs_df["rejected"]),
                             int(max_length), int(max_prompt_length))
    pair_ids = [_plain(v) for v in pairs_df["pair_id"]]
    return score_encodings(model, encodings, tokenizer.pad_token_id, pair_ids,
                           with_logits=with_logits, precision=precision, progress=progress, desc=desc)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values, so pair ids survive JSON."""
    return value.item() if hasattr(value, "item") else value
