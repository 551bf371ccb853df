"""One training run's moving parts, and what it does with them: set up, resume, take a step, checkpoint.

``Session`` holds what the train stage builds once (accelerate's accelerator, the policy, its optimiser and
schedule, the stream of micro-batches) and the few derived things every step needs. The stage
(pipeline/stages/train.py) reads as the sequence of these steps; the maths of one micro-batch is in
pipeline/training/training_loop.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from pipeline.errors import UserError
from pipeline.modeling.precision import resolve_precision
from pipeline.modeling.scoring import ForwardSettings
from pipeline.store.artifacts import Artifact
from pipeline.training import sharding
from pipeline.training.checkpointing import load_checkpoint, restore_checkpoint, save_checkpoint, truncate_jsonl
from pipeline.training.training_loop import (MicroBatchStream, StepMetrics, build_optimizer, disable_dropout,
                                             forward_micro_batch, total_steps)


class TrainingDiverged(UserError):
    """The loss became nan/inf; the message names the step and the checkpoint that was kept."""


def use_cpu() -> bool:
    return not torch.cuda.is_available()


@dataclass
class Session:
    accelerator: Any
    model: Any            # what trains: DDP-wrapped by accelerate, or sharded by FSDP2
    plain: Any            # what probes score (the unwrapped model; an FSDP model as it is)
    optimizer: Any
    scheduler: Any
    params: list
    stream: MicroBatchStream
    steps: int
    accumulation: int
    fsdp: bool
    settings: ForwardSettings
    max_grad_norm: float

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process  # under DDP only the main process writes into workdir

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    def quiet(self):
        """No gradient sync for this micro-batch: FSDP2 reduce-scatters in every backward (it has no no_sync);
        DDP skips all but the last micro-batch's."""
        return contextlib.nullcontext() if self.fsdp else self.accelerator.no_sync(self.model)


def start_session(cfg: DictConfig, model_artifact: Artifact, train_rows: list[int]) -> Session:
    """The accelerator, the policy (fp32 master weights) with its optimiser and schedule, and the data stream."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from pipeline.modeling.models import load_causal_lm

    train_cfg, seed = cfg.train, int(cfg.seed)
    # Each train stage is its own accelerate run: several can follow in one process (Hydra's basic
    # launcher runs a whole multirun in-process, e.g. a sweep over train.precision), and accelerate
    # refuses a second Accelerator with other settings. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    precision = resolve_precision(train_cfg.precision)
    settings = ForwardSettings.from_config(train_cfg, precision)  # the reference stage's layout and head
    accelerator = Accelerator(cpu=use_cpu(), mixed_precision="bf16" if precision == "bf16" else "no")
    fsdp = sharding.is_fsdp(cfg)
    if fsdp:
        sharding.check_processes(accelerator.num_processes)
    model = load_causal_lm(model_artifact, cfg.model, trainable=True)  # fp32 master weights (models.policy_dtype)
    if bool(train_cfg.disable_dropout):
        disable_dropout(model)
    if fsdp:  # sharded by us, not by accelerate.prepare (pipeline/training/sharding.py says why); before the optimiser
        model = sharding.shard(model, sharding.build_plugin(cfg, model), accelerator.device, accelerator.is_main_process)
        sharding.autocast_forward(model, accelerator.device, precision)
    stream = MicroBatchStream(train_rows, int(train_cfg.batch_size), seed,
                              accelerator.num_processes, accelerator.process_index)
    accumulation = int(train_cfg.grad_accumulation)
    steps = total_steps(train_cfg.max_steps, float(train_cfg.epochs), stream.per_epoch, accumulation)
    optimizer, scheduler = build_optimizer(model, train_cfg, steps)
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = model if fsdp else accelerator.unwrap_model(model)
    max_grad_norm = float(train_cfg.max_grad_norm) if train_cfg.max_grad_norm is not None else math.inf
    return Session(accelerator, model, plain, optimizer, scheduler, params, stream, steps, accumulation, fsdp,
                   settings, max_grad_norm)


def resume_or_begin(session: Session, workdir: Path, logs: tuple[Path, ...]) -> int:
    """The step to start from: a checkpoint's (its state restored on every process, the logs cut back to it) or 0."""
    state = load_checkpoint(workdir)  # every process restores the same state
    if state is None:
        if session.main:
            for path in logs:
                path.write_text("")
        return 0
    # resume: everything after the checkpoint is recomputed
    if session.fsdp:  # the full state dicts of the file, each rank keeping its shard
        sharding.load_full_state(session.model, session.optimizer, state["model"], state["optimizer"])
        restore_checkpoint(state, model=None, optimizer=None, scheduler=session.scheduler)
    else:
        restore_checkpoint(state, model=session.accelerator.unwrap_model(session.model), optimizer=session.optimizer,
                           scheduler=session.scheduler)
    start, session.stream.position = int(state["step"]), int(state["position"])
    if session.main:
        for path in logs:
            truncate_jsonl(path, start)
    return start


def metric_reducers(session: Session) -> tuple[Callable | None, Callable | None]:
    """How step metrics combine over processes: sums (``reduce``) and per-pair lists (``gather``); None alone."""
    if session.processes == 1:
        return None, None
    from accelerate.utils import gather_object
    accelerator = session.accelerator

    def reduce(values: dict[str, float]) -> dict[str, float]:
        totals = accelerator.reduce(torch.tensor(list(values.values()), dtype=torch.float64,
                                                 device=accelerator.device), "sum")
        return dict(zip(values, totals.tolist()))

    def gather(shifts: dict[str, list[float]]) -> list[dict[str, list[float]]]:
        return gather_object([shifts])

    return reduce, gather


def optimiser_step(session: Session, step: int, batch: Callable, pad_id: int, reference, loss_fn, method_cfg: dict,
                   buckets, workdir: Path, checkpoint_every: int) -> tuple[StepMetrics, float]:
    """One optimiser step over ``accumulation`` micro-batches (``batch(rows)``: their encodings); the step's
    metrics and its gradient norm. Stops before the update when the loss or the gradient norm is not finite."""
    accelerator, stream = session.accelerator, session.stream
    collected = StepMetrics(buckets)
    chunks = [stream.next_global() for _ in range(session.accumulation)]
    # Every pair of the step counts once: a micro-batch's mean loss is scaled by its share of the
    # step's pairs (x processes, since DDP averages gradients over processes).
    step_pairs = sum(len(chunk) for chunk in chunks)
    for micro, chunk in enumerate(chunks):
        rows = stream.share(chunk)
        sync = contextlib.nullcontext() if micro == session.accumulation - 1 else session.quiet()
        with sync:
            result = forward_micro_batch(session.model, batch(rows), pad_id, rows, reference, loss_fn, method_cfg,
                                         accelerator.device, quiet=session.quiet, settings=session.settings)
            loss = result.output.loss * (len(rows) * session.processes / step_pairs)
            # FSDP's forward and backward are collectives: a rank with one pair fewer in a last partial
            # micro-batch runs one more forward (of its own first pair), whose loss counts zero times,
            # before anything else talks to the other ranks.
            padding = -(-len(chunk) // session.processes) - len(rows) if session.fsdp else 0
            if padding:
                extra = forward_micro_batch(session.model, batch(rows[:1]) * padding, pad_id, rows[:1] * padding,
                                            reference, loss_fn, method_cfg, accelerator.device, settings=session.settings)
                loss = loss + extra.output.loss * 0.0
            check_finite(accelerator, result.output.loss, step + 1, workdir, checkpoint_every)
            accelerator.backward(loss)
        collected.add(result, rows)
    if session.fsdp:
        grad_norm = sharding.clip_grad_norm(session.params, session.max_grad_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(session.params, session.max_grad_norm)
    check_finite(accelerator, grad_norm, step + 1, workdir, checkpoint_every, what="gradient norm")
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return collected, float(grad_norm)


def write_checkpoint(session: Session, workdir: Path, done: int) -> None:
    """The full training state after step ``done`` (every process calls this; the main one writes)."""
    session.accelerator.wait_for_everyone()
    if session.fsdp:  # gathered full state dicts (a collective), written by the main rank alone
        weights, optimizer_state = sharding.full_state(session.model, session.optimizer)
        if session.main:
            require_finite_weights(weights.items(), done)
            save_checkpoint(workdir, step=done, position=session.stream.position, model=None, optimizer=None,
                            scheduler=session.scheduler, weights=weights, optimizer_state=optimizer_state)
    elif session.main:
        write_local_checkpoint(session, workdir, done)


def write_local_checkpoint(session: Session, workdir: Path, done: int) -> None:
    """The checkpoint of a process that holds the whole model (no collective: also what a stop signal writes)."""
    unwrapped = session.accelerator.unwrap_model(session.model)
    require_finite_weights(((n, p) for n, p in unwrapped.named_parameters() if p.requires_grad), done)
    save_checkpoint(workdir, step=done, position=session.stream.position, model=unwrapped,
                    optimizer=session.optimizer, scheduler=session.scheduler)


def check_finite(accelerator, value: torch.Tensor, step: int, workdir: Path, checkpoint_every: int,
                 what: str = "loss") -> None:
    """Stop before the optimiser step when the loss or the gradient norm is nan/inf (on any process)."""
    finite = torch.isfinite(torch.as_tensor(value).detach().float()).float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    if bool(finite.min() < 1):
        state = load_checkpoint(workdir) if checkpoint_every else None
        kept = f"the last good checkpoint (step {state['step']}) is kept in {workdir}" if state else "no checkpoint was saved yet"
        raise TrainingDiverged(f"train: {what} is {float(torch.as_tensor(value).detach()):.4g} (not finite) at step {step}, "
                               f"before its optimiser step; {kept}; lower train.lr or check the data")


def require_finite_weights(named, step: int) -> None:
    """Never write a checkpoint holding nan/inf weights (it would be resumed as "the last good one");
    ``named``: (name, tensor) of the trainable weights."""
    bad = [name for name, p in named if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingDiverged(f"train: non-finite weights after step {step} ({bad[0]}, ...); no checkpoint written")
