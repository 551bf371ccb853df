"""The pieces of one training step: data order, batches, the loss input, the schedule, step metrics.

Kept apart from pipeline/stages/train.py (stage wiring, checkpoints, logs) so each part reads on its own.
Nothing here knows a method's name: the loss comes from ``get_loss(method.loss)`` and the
method file's capability flags decide what the loss input carries.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.modeling.batching import DroppedEncoding, OneSidedEncoding, PairEncoding, encode_row
from pipeline.training.losses import LossInput, LossOutput
from pipeline.modeling.multi_pair import bins, pack_layouts, row_tokens
from pipeline.modeling.packing import PairLayout, one_row_layout, pair_layout
from pipeline.modeling.scoring import ForwardSettings, layout_forward, packed_forward

SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------------------- data order

class MicroBatchStream:
    """Deterministic, resumable order of micro-batches over the training rows.

    Epoch ``e`` visits the rows in ``permutation(seed, e)``, cut into global micro-batches of
    ``batch_size * num_processes`` pairs; process ``p`` takes every ``num_processes``-th pair of each.
    The order is a pure function of (seed, epoch), so the only state is ``position``, the number of
    global micro-batches consumed so far, which checkpoints store. Every process knows every global
    micro-batch, so each can weight its share by the step's total pair count.
    """

    def __init__(self, rows: Sequence[int], batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.global_batch = batch_size * num_processes
        self.seed, self.num_processes, self.process_index = seed, num_processes, process_index
        full, rest = divmod(len(self.rows), self.global_batch)
        # A last partial micro-batch is kept unless some process would get no pair from it.
        self.per_epoch = full + (1 if rest >= num_processes else 0)
        if self.per_epoch == 0:
            raise ValueError("no training micro-batch: fewer training pairs than processes")
        self.position = 0
        self._epoch, self._order = -1, self.rows

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            generator = np.random.default_rng([self.seed, epoch])  # seeded data-order generator
            self._epoch, self._order = epoch, self.rows[generator.permutation(len(self.rows))]
        return self._order

    def next_global(self) -> list[int]:
        """The next global micro-batch (every process's pairs)."""
        epoch, index = divmod(self.position, self.per_epoch)
        chunk = self.order(epoch)[index * self.global_batch:(index + 1) * self.global_batch]
        self.position += 1
        return chunk.tolist()

    def share(self, chunk: Sequence[int]) -> list[int]:
        """This process's pairs of a global micro-batch."""
        return list(chunk[self.process_index::self.num_processes])

    def next(self) -> list[int]:
        return self.share(self.next_global())


def total_steps(max_steps: int | None, epochs: float, micro_per_epoch: int, grad_accumulation: int) -> int:
    if max_steps is not None:
        return int(max_steps)
    return max(1, math.ceil(epochs * micro_per_epoch / grad_accumulation))


# ----------------------------------------------------------------------------- optimiser and schedule

def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based), as transformers' schedulers compute it.

    Warm-up rises linearly from 0: step ``s < warmup`` has ``s / warmup`` (so the first step has lr 0 and
    the peak is reached at step ``warmup``), exactly as ``transformers.get_scheduler`` with
    ``linear``, ``cosine`` or ``constant_with_warmup`` (our ``constant``). After it, ``linear`` and
    ``cosine`` decay towards 0 at step ``total``; ``constant`` stays at 1. Same maths as HF, so a
    prefopt run and a TRL run with the same settings use the same lr at every step.
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"train.schedule={schedule!r}")


def warmup_steps(ratio: float, total: int) -> int:
    """Warm-up steps ``ceil(total * ratio)``, HF's rounding (``TrainingArguments.get_warmup_steps``) for a ratio
    below 1: 16 steps at 0.1 warm up for 2; 100 steps at 0.07 for 8 (100 * 0.07 is 7.000000000000001 in floats)."""
    return math.ceil(total * float(ratio))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (>= 2-D: linear and embedding weights), none on biases and norm weights."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return [group for group in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if group["params"]]


def build_optimizer(model: torch.nn.Module, train_cfg: Any, total: int):
    optimizer = torch.optim.AdamW(parameter_groups(model, float(train_cfg.weight_decay)), lr=float(train_cfg.lr),
                                  betas=tuple(float(b) for b in train_cfg.adam_betas), eps=float(train_cfg.adam_eps))
    warmup = warmup_steps(float(train_cfg.warmup_ratio), total)
    schedule = str(train_cfg.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, schedule))
    return optimizer, scheduler


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout off everywhere (as TRL's ``disable_dropout``): nn.Dropout modules and attention dropout rates.

    Preference losses compare the policy with a reference scored without dropout; dropout in the
    policy's forward would make even step 0 differ from it. Returns how many dropouts were switched off.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, switched = 0.0, switched + 1
        for name in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float) and getattr(module, name) > 0:
                setattr(module, name, 0.0)
                switched += 1
    return switched


# ----------------------------------------------------------------------------- batches

@dataclass
class PairEncodings:
    """Token ids of every row we train on, encoded once with the reference stage's settings.

    A row is a pair (``PairEncoding``), a one-sided row (``OneSidedEncoding``: unpaired data, its
    chosen or rejected None) or, with ``kept`` (``train.drop_one_side``), a pair of which only one side
    trains (``DroppedEncoding``).
    """

    encodings: dict[int, Any]

    @classmethod
    def build(cls, tokenizer, pairs, rows: Sequence[int], max_length: int, max_prompt_length: int,
              kept: dict[int, str] | None = None) -> "PairEncodings":
        encodings = {}
        for row in rows:
            record = pairs.iloc[row]
            encoding = encode_row(tokenizer, record["prompt"], record["chosen"], record["rejected"],
                                  max_length, max_prompt_length)
            if kept and row in kept and isinstance(encoding, PairEncoding):
                encoding = DroppedEncoding(encoding, kept[row])
            encodings[row] = encoding
        return cls(encodings)

    def of(self, rows: Sequence[int]) -> list[Any]:
        return [self.encodings[row] for row in rows]


def pad_rows(rows: list[Tensor]) -> Tensor:
    """Stack 1-D per-token tensors of different lengths into ``[B, T]`` (zeros after each row's end).

    An absent side is a 0-length row: all zeros, so its mask is all zero; T is at least 1."""
    width = max([1] + [int(r.shape[-1]) for r in rows])
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows])


def reference_tokens(reference, side: str, rows: Sequence[int], mask: Tensor, present: Sequence[bool] | None = None) -> Tensor:
    """Reference per-token log-probs of ``rows`` placed on the response positions of ``mask`` ``[B, T]``.

    The reference stage stored only response tokens (ragged); the counts must match the policy's
    tokenisation exactly, otherwise the two were encoded differently (a bug, not a user error). A row
    whose side is not ``present`` (a dropped side) takes none of its stored values: its mask is all zero.
    """
    present = [True] * len(rows) if present is None else present
    empty = torch.zeros(0, dtype=torch.float32)
    values = [reference.token_logps(side, row).to(torch.float32).reshape(-1) if keep else empty
              for row, keep in zip(rows, present)]
    counts = mask.sum(-1).to(torch.int64).tolist()
    for row, value, count in zip(rows, values, counts):
        if value.numel() != count:
            raise RuntimeError(f"reference/{side} row {row}: {value.numel()} stored tokens but the policy sees {count}; "
                               "policy and reference were tokenised differently")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask.bool()] = torch.cat(values).to(mask.device) if values else out[mask.bool()]
    return out


def same_rows(input_ids: Tensor, mask: Tensor, n: int) -> Tensor:
    """``[n]`` bool: chosen row i and rejected row n+i hold the same response tokens (same prompt by construction)."""
    ids = input_ids[:, 1:] * mask.long()  # [2n, T-1], response tokens only
    return (ids[:n] == ids[n:]).all(-1) & (mask[:n] == mask[n:]).all(-1)


@dataclass
class MicroBatchResult:
    output: LossOutput
    chosen_rho: Tensor  # [B] policy minus reference sequence log-prob (detached)
    rejected_rho: Tensor
    tokens: int  # positions through the model (pipeline/modeling/packing.py: shared prefix once, no padding)
    pairs: int
    chosen_present: list[bool] | None = None  # [B] the row has this side (None: every row has both)
    rejected_present: list[bool] | None = None


def row_layout(encoding, pad_id: int, settings: ForwardSettings) -> PairLayout:
    """A row's reference layout: a pair (also one with a dropped side) in its pair layout, a one-sided row alone."""
    if isinstance(encoding, OneSidedEncoding):
        return one_row_layout(encoding.ids, encoding.start)
    pair = encoding.pair if isinstance(encoding, DroppedEncoding) else encoding
    return pair_layout(pair.chosen_ids, pair.rejected_ids, pair.chosen_start, pair.rejected_start,
                       settings.sharing, pad_id)


def row_sides(encoding, layout: PairLayout, scores, with_others: bool, device: torch.device):
    """A row's scores as ``{side: (token_logps, mask, others) or None}`` and whether its two sides are the same.

    A dropped side was computed (the pair's layout needs it) but is returned as None, so nothing of it
    reaches the loss."""
    if isinstance(encoding, OneSidedEncoding):
        kept = {encoding.side: 0}  # side -> its row in the forward
        same = False
    else:
        kept = {side: k for k, side in enumerate(SIDES)
                if not isinstance(encoding, DroppedEncoding) or side == encoding.kept}
        same = len(kept) == 2 and bool(same_rows(layout.padded_ids.to(device), scores.mask, 1)[0])
    sides = {}
    for side in SIDES:
        k = kept.get(side)
        sides[side] = None if k is None else (scores.token_logps[k], scores.mask[k],
                                              scores.others[k] if with_others else None)
    return sides, same


def forward_rows(model, encodings: Sequence[Any], pad_id: int, device: torch.device, with_others: bool,
                 settings: ForwardSettings = ForwardSettings(), quiet=contextlib.nullcontext) -> list[tuple]:
    """Every row of a micro-batch through the model: ``(sides, same, tokens)`` per row (``row_sides``; tokens =
    positions it took through the model).

    One forward per row in its reference layout, exactly as the reference stage scored it; with
    ``settings.pack_tokens``, the rows' layouts laid side by side into rows of at most that many positions
    (pipeline/modeling/multi_pair.py), the same numbers to float rounding with fewer forwards. ``quiet`` wraps every
    forward but the last (DDP's ``no_sync``)."""
    layouts = [row_layout(encoding, pad_id, settings) for encoding in encodings]
    if settings.pack_tokens is None:
        groups = [[index] for index in range(len(layouts))]
    else:
        groups = bins([row_tokens(layout) for layout in layouts], int(settings.pack_tokens))
    results: list[tuple] = [()] * len(layouts)
    for number, group in enumerate(groups):
        with quiet() if number < len(groups) - 1 else contextlib.nullcontext():
            if settings.pack_tokens is None:
                scores, tokens = [layout_forward(model, layouts[group[0]], settings, device, with_others)], \
                    [layouts[group[0]].tokens]
            else:
                row = pack_layouts(layouts, group)
                scores, tokens = packed_forward(model, row, settings, device, with_others), row.tokens
        for index, member_scores, count in zip(group, scores, tokens):
            results[index] = (*row_sides(encodings[index], layouts[index], member_scores, with_others, device), count)
    return results


def forward_micro_batch(model, encodings: Sequence[Any], pad_id: int, rows: Sequence[int], reference, loss_fn,
                        method_cfg: dict, device: torch.device, quiet=contextlib.nullcontext,
                        settings: ForwardSettings = ForwardSettings()) -> MicroBatchResult:
    """Each row through its reference layout (``forward_rows``), then one loss over all.

    Scoring a pair alone, in the same layout as the reference stage (a one-sided row alone, as a single
    sequence), makes the policy's first forward equal the stored reference bit for bit; per-token results
    are then padded across rows into the ``[B, T]`` tensors the loss reads, an absent side as an all-zero
    row (all-zero mask). The method's capability flags decide what the loss input carries: BNF's
    full-vocabulary term only with ``needs_vocab_term``, the reference's log-probs only with
    ``needs_reference`` (reference-free losses never see them; the shifts are still logged).
    Under DDP ``quiet`` is ``no_sync``: every forward but the last leaves the reducer alone, so the
    one backward over all pairs synchronises gradients once.
    """
    with_others = bool(method_cfg.get("needs_vocab_term"))
    parts: dict[str, list[Tensor]] = defaultdict(list)
    present: dict[str, list[bool]] = defaultdict(list)
    same, tokens = [], 0
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    for sides, is_same, count in forward_rows(model, encodings, pad_id, device, with_others, settings, quiet):
        for side in SIDES:
            token_logps, mask, others = sides[side] if sides[side] is not None else (empty, empty, empty)
            present[side].append(sides[side] is not None)
            parts[f"{side}_logps"].append(token_logps)
            parts[f"{side}_mask"].append(mask)
            if with_others:
                parts[f"{side}_others"].append(others)
        same.append(is_same)
        tokens += count
    token_w, token_l = pad_rows(parts["chosen_logps"]), pad_rows(parts["rejected_logps"])
    mask_w, mask_l = pad_rows(parts["chosen_mask"]), pad_rows(parts["rejected_mask"])
    others_w = pad_rows(parts["chosen_others"]) if with_others else None
    others_l = pad_rows(parts["rejected_others"]) if with_others else None
    ref_w = reference_tokens(reference, "chosen", rows, mask_w, present["chosen"])
    ref_l = reference_tokens(reference, "rejected", rows, mask_l, present["rejected"])
    with_reference = bool(method_cfg.get("needs_reference", True))
    inp = LossInput(
        chosen_logps=token_w.sum(-1), rejected_logps=token_l.sum(-1),
        chosen_token_logps=token_w, rejected_token_logps=token_l, chosen_mask=mask_w, rejected_mask=mask_l,
        ref_chosen_logps=ref_w.sum(-1) if with_reference else None,
        ref_rejected_logps=ref_l.sum(-1) if with_reference else None,
        ref_chosen_token_logps=ref_w if with_reference else None,
        ref_rejected_token_logps=ref_l if with_reference else None,
        chosen_others=others_w, rejected_others=others_l,
        same_response=torch.tensor(same, device=mask_w.device),
    )
    output = loss_fn(inp, method_cfg)
    return MicroBatchResult(output, (inp.chosen_logps - ref_w.sum(-1)).detach(),
                            (inp.rejected_logps - ref_l.sum(-1)).detach(), tokens, len(rows),
                            present["chosen"], present["rejected"])


# ----------------------------------------------------------------------------- step metrics

@dataclass
class StepMetrics:
    """The ``train/...`` metrics of one optimiser step: every micro-batch weighted by its pair count.

    Losses return means over their micro-batch, so a mean of means would over-weight a short last
    micro-batch; each value is summed as ``mean x pairs`` and divided by the step's pairs. Under DDP
    ``reduce`` sums (value sums and pair counts) over processes before dividing, and ``gather`` pools
    the per-bucket shifts of every process's pairs (each process may see other buckets).
    """

    buckets: Any  # row -> bucket label
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    pairs: int = 0
    shift: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: int = 0

    def add(self, result: MicroBatchResult, rows: Sequence[int]) -> None:
        self.pairs += result.pairs
        self.tokens += result.tokens
        self.sums["loss"] += float(result.output.loss.detach()) * result.pairs
        for name, value in result.output.metrics.items():
            self.sums[name] += float(value) * result.pairs
        every = [True] * len(rows)
        for row, rho_w, rho_l, has_w, has_l in zip(rows, result.chosen_rho.tolist(), result.rejected_rho.tolist(),
                                                   result.chosen_present or every, result.rejected_present or every):
            if has_w:  # an absent side (one-sided rows) has no shift to average
                self.shift[f"logps_shift/chosen/{self.buckets[row]}"].append(rho_w)
            if has_l:
                self.shift[f"logps_shift/rejected/{self.buckets[row]}"].append(rho_l)

    def finish(self, reduce=None, gather=None) -> dict[str, float]:
        sums, pairs = dict(self.sums), float(self.pairs)
        if reduce is not None:
            totals = reduce({**sums, "__pairs__": pairs})
            pairs = totals.pop("__pairs__")
            sums = totals
        values = {f"train/{name}": total / pairs for name, total in sums.items()}
        shift = self.shift
        if gather is not None:
            shift = defaultdict(list)
            for part in gather(dict(self.shift)):
                for name, items in part.items():
                    shift[name].extend(items)
        values.update({f"train/{name}": float(np.mean(v)) for name, v in sorted(shift.items())})
        return values
