"""The pieces of one training step: data order, batches, the loss input, the schedule, step metrics.

Kept apart from pipeline/train.py (stage wiring, checkpoints, logs) so each part reads on its own.
Nothing here knows a method's name: the loss comes from ``get_loss(method.loss)`` and the
method file's capability flags decide what the loss input carries.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.batching import collate, encode_pair
from pipeline.logprobs import score_tokens
from pipeline.scoring import response_logits
from pipeline.losses import LossInput, LossOutput

SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------------------- data order

class MicroBatchStream:
    """Deterministic, resumable order of micro-batches over the training rows.

    Epoch ``e`` visits the rows in ``permutation(seed, e)``, cut into global micro-batches of
    ``batch_size * num_processes`` pairs; process ``p`` takes every ``num_processes``-th pair of each.
    The order is a pure function of (seed, epoch), so the only state is ``position``, the number of
    global micro-batches consumed so far, which checkpoints store.
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

    def next(self) -> list[int]:
        epoch, index = divmod(self.position, self.per_epoch)
        chunk = self.order(epoch)[index * self.global_batch:(index + 1) * self.global_batch]
        self.position += 1
        return chunk[self.process_index::self.num_processes].tolist()


def total_steps(max_steps: int | None, epochs: float, micro_per_epoch: int, grad_accumulation: int) -> int:
    if max_steps is not None:
        return int(max_steps)
    return max(1, math.ceil(epochs * micro_per_epoch / grad_accumulation))


# ----------------------------------------------------------------------------- optimiser and schedule

def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based).

    Warm-up rises linearly to 1 at step ``warmup - 1`` (the first step already moves, unlike HF's
    schedule whose step 0 has lr 0); then ``linear`` or ``cosine`` decay towards 0 after the last
    step, or ``constant``.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule={schedule!r}")


def build_optimizer(model: torch.nn.Module, train_cfg: Any, total: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(train_cfg.lr), betas=tuple(float(b) for b in train_cfg.adam_betas),
                                  eps=float(train_cfg.adam_eps), weight_decay=float(train_cfg.weight_decay))
    warmup = int(float(train_cfg.warmup_ratio) * total)
    schedule = str(train_cfg.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, schedule))
    return optimizer, scheduler


# ----------------------------------------------------------------------------- batches

@dataclass
class PairEncodings:
    """Token ids of every pair row we train on, encoded once with the reference stage's settings."""

    encodings: dict[int, Any]

    @classmethod
    def build(cls, tokenizer, pairs, rows: Sequence[int], max_length: int, max_prompt_length: int) -> "PairEncodings":
        encodings = {}
        for row in rows:
            record = pairs.iloc[row]
            encodings[row] = encode_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"],
                                         max_length, max_prompt_length)
        return cls(encodings)

    def collate(self, rows: Sequence[int], pad_id: int) -> dict[str, Tensor]:
        return collate([self.encodings[row] for row in rows], pad_id)


def scatter_reference(reference, side: str, rows: Sequence[int], mask: Tensor) -> Tensor:
    """Reference per-token log-probs of ``rows`` placed on the response positions of ``mask`` ``[B, T-1]``.

    The reference stage stored only response tokens (ragged); the counts must match the policy's
    tokenisation exactly, otherwise the two were encoded differently (a bug, not a user error).
    """
    values = [reference.token_logps(side, row).to(torch.float32).reshape(-1) for row in rows]
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
    tokens: int  # non-padding tokens in the forward


def forward_micro_batch(model, batch: dict[str, Tensor], rows: Sequence[int], reference, loss_fn,
                        method_cfg: dict) -> MicroBatchResult:
    """One concatenated forward of chosen and rejected rows, then the loss.

    The method's capability flags decide what the loss input carries: BNF's full-vocabulary term only
    with ``needs_vocab_term``, the reference's log-probs only with ``needs_reference`` (reference-free
    losses never see them; the shifts from the reference are still logged).
    """
    logits, input_ids, response_mask = response_logits(model, batch)
    scores = score_tokens(logits, input_ids, response_mask, with_others=bool(method_cfg.get("needs_vocab_term")))
    del logits
    n = len(rows)
    split = lambda x: (x[:n], x[n:]) if x is not None else (None, None)  # noqa: E731
    token_w, token_l = split(scores.token_logps)
    mask_w, mask_l = split(scores.mask)
    others_w, others_l = split(scores.others)
    ref_w = scatter_reference(reference, "chosen", rows, mask_w)
    ref_l = scatter_reference(reference, "rejected", rows, mask_l)
    with_reference = bool(method_cfg.get("needs_reference", True))
    inp = LossInput(
        chosen_logps=token_w.sum(-1), rejected_logps=token_l.sum(-1),
        chosen_token_logps=token_w, rejected_token_logps=token_l, chosen_mask=mask_w, rejected_mask=mask_l,
        ref_chosen_logps=ref_w.sum(-1) if with_reference else None,
        ref_rejected_logps=ref_l.sum(-1) if with_reference else None,
        ref_chosen_token_logps=ref_w if with_reference else None,
        ref_rejected_token_logps=ref_l if with_reference else None,
        chosen_others=others_w, rejected_others=others_l,
        same_response=same_rows(input_ids, scores.mask, n),
    )
    output = loss_fn(inp, method_cfg)
    return MicroBatchResult(output, (inp.chosen_logps - ref_w.sum(-1)).detach(),
                            (inp.rejected_logps - ref_l.sum(-1)).detach(),
                            int(batch["attention_mask"].sum()))


# ----------------------------------------------------------------------------- step metrics

@dataclass
class StepMetrics:
    """Averages the micro-batches of one optimiser step into the ``train/...`` names we log."""

    buckets: Any  # row -> bucket label
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    count: int = 0
    shift: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: int = 0

    def add(self, result: MicroBatchResult, rows: Sequence[int]) -> None:
        self.count += 1
        self.tokens += result.tokens
        self.sums["loss"] += float(result.output.loss.detach())
        for name, value in result.output.metrics.items():
            self.sums[name] += float(value)
        for row, rho_w, rho_l in zip(rows, result.chosen_rho.tolist(), result.rejected_rho.tolist()):
            self.shift[f"logps_shift/chosen/{self.buckets[row]}"].append(rho_w)
            self.shift[f"logps_shift/rejected/{self.buckets[row]}"].append(rho_l)

    def finish(self, reduce=None, gather=None) -> dict[str, float]:
        """The step's metrics. Under DDP ``reduce`` averages the micro-batch means over processes and
        ``gather`` (one object per process -> list of all) pools the per-bucket shifts of every process's
        pairs (each process may see other buckets, so they cannot be reduced as one tensor)."""
        values = {f"train/{name}": total / self.count for name, total in self.sums.items()}
        if reduce is not None:
            values = reduce(values)
        shift = self.shift
        if gather is not None:
            shift = defaultdict(list)
            for part in gather(dict(self.shift)):
                for name, pairs in part.items():
                    shift[name].extend(pairs)
        values.update({f"train/{name}": float(np.mean(v)) for name, v in sorted(shift.items())})
        return values
