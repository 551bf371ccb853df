"""Stage "train": one preference method on the training pairs, starting from the reference model.

Upstream: ``model`` (weights + tokenizer), ``pair`` (``pairs.parquet``, and ``unpaired.parquet`` under
``data.schema=unpaired``) and ``reference`` (per-token reference log-probs of every row, never recomputed
here). The loss is ``get_loss(method.loss)``; the method file's flags (``needs_vocab_term``,
``needs_reference``, ``accepts_unpaired``) decide what the loss input carries and whether one-sided rows
may train. The trainer never tests a method's name.

One-sided rows (pipeline/data/unpaired.py): the rows of ``unpaired.parquet`` train beside the pairs, each
scored alone; ``train.drop_one_side=true`` keeps one side of each training pair (drawn from ``seed``),
forwarded in the pair's layout. Either way the absent side reaches the loss as an all-zero mask, and
the probes and the evaluation score held-out rows as they are (pairs stay pairs).

Runs on accelerate (CPU, one GPU or DDP via ``accelerate launch --multi_gpu --num_processes N -m pipeline``,
which on a CPU-only machine runs gloo DDP; ``--cpu`` alone starts ONE process). Under DDP every rank
trains, only the main one writes the artifact (``artifacts.build_collective``). Chosen and rejected rows
go through ONE concatenated forward; log-probs are fp32 even under bf16 autocast; AdamW with warm-up and
linear/cosine decay, gradient accumulation and clipping. Truncation is the reference stage's
(``pipeline.modeling.batching.encode_response`` with ``train.max_length`` and ``train.max_prompt_length``), so
policy and reference score exactly the same tokens.

Resumable: every ``train.checkpoint_every`` steps the full state goes into the artifact's partial
directory (pipeline/training/checkpointing.py); rerunning the same command resumes from it and, on CPU, ends
bit-identical to an uninterrupted run. A non-finite loss stops the run with a one-line error naming
the step and keeps the last good checkpoint.

Artifact: ``model/`` (save_pretrained + tokenizer), ``metrics.jsonl`` (one row per step, ``train/...``
names), ``trajectories.jsonl`` (per probe pair and probe step), ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline.store.artifacts import Artifact
from pipeline.training.checkpointing import CHECKPOINT_DIR, remove_checkpoints
from pipeline.store.distributed import build_shared, process_state
from pipeline.training import sharding
from pipeline.errors import UserError
from pipeline import interrupts
from pipeline.training.truncation_check import check_truncated_pairs
from pipeline.modeling.precision import resolve_precision
from pipeline.data import unpaired
from pipeline.evaluation.probes import ProbeRecorder, append_jsonl
from pipeline.training.session import (Session, metric_reducers, optimiser_step, resume_or_begin, start_session,
                                       write_checkpoint, write_local_checkpoint)
from pipeline.training.training_loop import PairEncodings

STAGE = "train"
UPSTREAM = ("model", "pair", "reference")
# Keys of conf/train that change nothing in the artifact (memory, checkpoints, display) or belong to the reference stage.
OPERATIONAL_KEYS = ("checkpoint_every", "progress")
LABELS = ("name",)  # method.name labels tables and runs; two names of one setting share the artifact
# Test-only hook: raise after this many steps (after that step's checkpoint) to simulate a crash.
CRASH_HOOK_ENV = "PREFOPT_TEST_CRASH_AFTER_STEP"
METRICS_FILE, TRAJECTORIES_FILE, SUMMARY_FILE, MODEL_DIR = "metrics.jsonl", "trajectories.jsonl", "summary.json", "model"


def bucket_filter(cfg: DictConfig) -> list[str] | None:
    value = OmegaConf.select(cfg, "pairing.bucket_filter", default=None)
    if value is None:
        return None
    return [str(v) for v in (OmegaConf.to_container(value) if OmegaConf.is_list(value) else [value])]


def config_subset(cfg: DictConfig) -> dict[str, Any]:
    from pipeline.modeling.models import attention_setting, lora_enabled, policy_dtype
    train = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k not in OPERATIONAL_KEYS}
    # How the ranks hold the model: in the key only under FSDP (run() adds it), so DDP keys stay as they were.
    train.pop("distributed", None), train.pop("accelerate_config", None)
    train["precision"] = resolve_precision(train["precision"])  # what ran, not "auto"
    if train.get("max_steps") is not None:
        train.pop("epochs", None)  # unused when the step count is set
    method = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in LABELS}
    return {
        "method": method,
        "train": train,
        "seed": int(cfg.seed),
        "bucket_filter": bucket_filter(cfg),
        # How the model is trained (the model artifact's key covers only its weights).
        "model_use": {"weights_dtype": policy_dtype(cfg.model), **attention_setting(cfg.model),
                      "lora": OmegaConf.to_container(cfg.model.lora, resolve=True) if lora_enabled(cfg.model) else None},
    }


def run(cfg: DictConfig, upstream: dict[str, Artifact], root: Path) -> Artifact:
    missing = [name for name in UPSTREAM if name not in upstream]
    if missing:
        raise ValueError(f"train needs upstream artifacts {missing}")
    check_one_sided(cfg, upstream["pair"])  # before any model loads
    state = process_state()  # joins the process group under `accelerate launch` / torchrun
    subset = config_subset(cfg)
    if sharding.is_fsdp(cfg):
        sharding.check_processes(state.num_processes)  # before any model loads
        # The passed-through settings (the file's content, not its path): CPU offload moves the optimiser step.
        path = OmegaConf.select(cfg, "train.accelerate_config", default=None)
        subset["distributed"] = {"mode": "fsdp", **(sharding.accelerate_settings(path) if path is not None else {})}
    if state.num_processes > 1:
        # DDP and FSDP: each optimiser step sees batch_size x processes pairs, so the process count is part of the key.
        subset["processes"] = state.num_processes
    inputs = {name: upstream[name] for name in UPSTREAM}
    # Every rank trains; only the main one holds the lock and writes the artifact.
    # A leftover partial folder keeps only what a resume reads; anything else in it is deleted, never published.
    return build_shared(root, STAGE, subset, inputs, lambda workdir: train(cfg, upstream, Path(workdir)),
                        resumable=(CHECKPOINT_DIR, METRICS_FILE, TRAJECTORIES_FILE))


# ----------------------------------------------------------------------------- data

def check_one_sided(cfg: DictConfig, pair: Artifact) -> None:
    """One-sided rows in the pair artifact (an unpaired file, also when ``data.schema=auto`` detected it)
    train only a method with ``accepts_unpaired: true``; pipeline/orchestration/validate.py catches what the config shows."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    if not method.get("accepts_unpaired") and unpaired.load_rows(pair.path) is not None:
        raise unpaired.refusal(method, f"the data (unpaired rows: {pair.path / unpaired.UNPAIRED_FILE})", "paired data")


def kept_sides(cfg: DictConfig, frame: pd.DataFrame, rows: list[int]) -> dict[int, str]:
    """``train.drop_one_side``: the side kept of each training pair (row -> side); {} when off."""
    if not bool(OmegaConf.select(cfg, "train.drop_one_side", default=False)):
        return {}
    lone = unpaired.one_sided(frame)
    pairs = [row for row in rows if not lone[row]]  # one-sided rows have nothing to drop
    return dict(zip(pairs, unpaired.kept_sides(frame["pair_id"].iloc[pairs].astype(str), int(cfg.seed))))


def select_rows(cfg: DictConfig, pairs: pd.DataFrame) -> tuple[list[int], list[int]]:
    """Row positions of the training pairs (split == train, bucket filter) and the fixed probe set."""
    train_mask = pairs["split"] == "train"
    buckets = bucket_filter(cfg)
    if buckets is not None:
        known = sorted(pairs["bucket"].astype(str).unique())
        unknown = [b for b in buckets if b not in known]
        if unknown:
            raise UserError(f"pairing.bucket_filter={unknown[0]!r}: expected null or one of {known}")
        train_mask &= pairs["bucket"].astype(str).isin(buckets)
    train_rows = [int(i) for i in train_mask.to_numpy().nonzero()[0]]
    if not train_rows:
        raise UserError(f"pairs.parquet: no split=train rows to train on (pairing.bucket_filter={buckets}); "
                        "check pairing.test_fraction and the bucket names")
    test_mask = pairs["split"] == "test"
    if buckets is not None:  # follow the pairs it trains on (Smaug measures on the kind of pair it trains on)
        test_mask &= pairs["bucket"].astype(str).isin(buckets)
    test_rows = test_mask.to_numpy().nonzero()[0]
    probe_rows = [int(i) for i in test_rows[: int(cfg.train.probe_pairs)]]
    return train_rows, probe_rows


# ----------------------------------------------------------------------------- the stage

def train(cfg: DictConfig, upstream: dict[str, Artifact], workdir: Path) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from pipeline.modeling.models import load_tokenizer
    from pipeline.modeling.reference_scores import load_scored_rows
    from pipeline.store.tracking import start_run
    from pipeline.training.losses import get_loss

    train_cfg = cfg.train
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    loss_fn = get_loss(str(cfg.method.loss))
    set_seed(int(cfg.seed))  # python, numpy, torch (+cuda): LoRA init and dropout

    # Pairs, then any one-sided rows, with the reference's scores in the same row order.
    pairs, reference = load_scored_rows(upstream["pair"], upstream["reference"])
    train_rows, probe_rows = select_rows(cfg, pairs)
    kept = kept_sides(cfg, pairs, train_rows)
    tokenizer = load_tokenizer(upstream["model"])
    max_length, max_prompt_length = int(train_cfg.max_length), int(train_cfg.max_prompt_length)
    encodings = PairEncodings.build(tokenizer, pairs, train_rows, max_length, max_prompt_length, kept)
    check_truncated_pairs(encodings.encodings.values(), max_length, max_prompt_length)  # before any model loads

    session = start_session(cfg, upstream["model"], train_rows)
    metrics_path, trajectories_path = workdir / METRICS_FILE, workdir / TRAJECTORIES_FILE
    start = resume_or_begin(session, workdir, (metrics_path, trajectories_path))
    main, steps = session.main, session.steps
    # One W&B run per train artifact: a resumed training continues it (the id follows the artifact key).
    tracker = start_run(cfg, job_type=STAGE, run_id=f"train-{workdir.name.removesuffix('.partial')}") if main else None
    # Under FSDP every rank scores the probes (the forward is collective); only the main one writes them.
    probe = (ProbeRecorder(cfg, pairs, probe_rows, tokenizer, reference, trajectories_path, tracker)
             if main or session.fsdp else None)
    checkpoint_every = int(train_cfg.checkpoint_every or 0)
    crash_after = int(os.environ[CRASH_HOOK_ENV]) if os.environ.get(CRASH_HOOK_ENV) else None
    buckets = pairs["bucket"].astype(str).to_numpy()
    reduce, gather = metric_reducers(session)

    # SIGTERM/SIGINT wait for the end of the step, which is then checkpointed (one process: ranks could disagree).
    stop_early = contextlib.ExitStack()
    if session.processes == 1:
        stop_early.enter_context(interrupts.deferred())
    started, tokens_seen, last = time.time(), 0, {}
    try:
        if start == 0 and probe is not None:
            probe.record(session.plain, 0, write=main)
        bar = tqdm(total=steps, initial=start, desc=f"train {cfg.method.name}", unit="step",
                   disable=not (main and bool(train_cfg.progress)), dynamic_ncols=True)
        for step in range(start, steps):
            step_started = time.time()
            lr = session.scheduler.get_last_lr()[0]
            collected, grad_norm = optimiser_step(session, step, encodings.of, tokenizer.pad_token_id, reference, loss_fn,
                                                  method_cfg, buckets, workdir, checkpoint_every)
            done, elapsed = step + 1, time.time() - step_started
            tokens_seen += collected.tokens
            last = {"step": done, **collected.finish(reduce, gather), "train/lr": lr, "train/grad_norm": grad_norm,
                    "train/tokens_per_second": collected.tokens * session.processes / max(elapsed, 1e-9)}
            if main:
                append_jsonl(metrics_path, [last])
                tracker.log({k: v for k, v in last.items() if k != "step"}, step=done)
            if probe is not None and (done % int(train_cfg.probe_every) == 0 or done == steps):
                probe.record(session.plain, done, write=main)
            checkpointed = bool(checkpoint_every and done % checkpoint_every == 0 and done < steps)
            if checkpointed:
                write_checkpoint(session, workdir, done)
            bar.update(1)
            bar.set_postfix(loss=f"{last['train/loss']:.4f}")
            if crash_after is not None and done == crash_after:
                raise RuntimeError(f"{CRASH_HOOK_ENV}={crash_after}: simulated crash after step {done}")
            stop_if_asked(session, workdir, done, checkpointed)
        bar.close()
        wall = time.time() - started
        session.accelerator.wait_for_everyone()
        summary = {**training_summary(session, start, pairs, train_rows, probe_rows, kept, cfg),
                   **throughput(session, start, wall, tokens_seen), "final": last}
        publish(session, cfg, upstream["model"], tokenizer, workdir, summary, last, tracker)
        return {"steps": steps, "train_pairs": len(train_rows), "resumed_from_step": start or None,
                "processes": session.processes}
    finally:
        stop_early.close()
        if tracker is not None:
            tracker.finish()


def stop_if_asked(session: Session, workdir: Path, done: int, checkpointed: bool) -> None:
    """After a step: on SIGTERM/SIGINT (deferred to here), checkpoint this step unless done already, and stop."""
    stop = interrupts.stop_requested()
    if stop is None or done >= session.steps:
        return
    if not checkpointed:  # this step's checkpoint is not written yet
        write_local_checkpoint(session, workdir, done)
    print(f"[train] {stop.signal_name}: stopped after step {done} of {session.steps}; checkpoint in {workdir}; "
          "rerun the same command to resume", flush=True)
    raise stop


def training_summary(session: Session, start: int, pairs: pd.DataFrame, train_rows: list[int], probe_rows: list[int],
                     kept: dict[int, str], cfg: DictConfig) -> dict[str, Any]:
    """What trained: rows by kind, processes and batch (summary.json; the timings are added by the caller)."""
    lone = unpaired.one_sided(pairs)
    one_sided = sum(lone[row] for row in train_rows)
    return {"steps": session.steps, "resumed_from_step": start or None, "train_pairs": len(train_rows),
            "train_rows": {"pairs": len(train_rows) - one_sided - len(kept), "one_sided": one_sided,
                           "dropped_pairs_kept_chosen": sum(side == "chosen" for side in kept.values()),
                           "dropped_pairs_kept_rejected": sum(side == "rejected" for side in kept.values())},
            "processes": session.processes, "distributed": sharding.mode(cfg),
            "global_batch": session.stream.global_batch * session.accumulation, "probe_pairs": len(probe_rows)}


def throughput(session: Session, start: int, wall: float, tokens_seen: int) -> dict[str, Any]:
    """summary.json's timings of the steps this process ran (from ``start``: a resumed run times its rest)."""
    return {"wall_time_s": round(wall, 3),
            "positions_computed": tokens_seen * session.processes,  # padding included (packing.py)
            "tokens_per_second": tokens_seen * session.processes / max(wall, 1e-9),
            "pairs_per_second": (session.steps - start) * session.accumulation * session.stream.global_batch / max(wall, 1e-9)}


def publish(session: Session, cfg: DictConfig, model_artifact: Artifact, tokenizer, workdir: Path,
            summary: dict[str, Any], last: dict[str, Any], tracker) -> None:
    """The trained model, summary.json and the W&B summary into the artifact; the checkpoints go."""
    # Under FSDP every weight is gathered to the main rank (a collective) into a plain copy of the model there.
    final = (final_model(session.model, model_artifact, cfg.model) if session.fsdp
             else session.accelerator.unwrap_model(session.model))
    if session.main:
        save_final_model(final, tokenizer, workdir / MODEL_DIR)
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        tracker.summary({f"final/{k.removeprefix('train/')}": v for k, v in last.items() if k != "step"})
        remove_checkpoints(workdir)


def final_model(model, model_artifact: Artifact, model_cfg):
    """An FSDP model's weights, gathered (every rank calls this), in an unsharded copy on the main rank (None elsewhere)."""
    from pipeline.modeling.models import load_causal_lm
    weights, _ = sharding.full_state(model, trainable_only=False)
    if torch.distributed.get_rank() != 0:
        return None
    final = load_causal_lm(model_artifact, model_cfg, trainable=True)
    final.load_state_dict(weights, strict=True)
    return final


def save_final_model(model, tokenizer, directory: Path) -> None:
    if hasattr(model, "merge_and_unload"):  # LoRA: save plain weights so every later stage loads it like any model
        model = model.merge_and_unload()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
