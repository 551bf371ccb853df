"""Stage "reference": per-token log-probs of the frozen reference model on every pair, computed once.

Its key holds the model artifact, a hash of the scored text (each row's pair_id, which hashes prompt,
chosen and rejected, and the rendered prompt) rather than the pair artifact's key — so pairings that
differ only in bucket edges or unit share one reference — plus only what changes the numbers: the tokenisation
budget (``train.max_length``, ``train.max_prompt_length``), the resolved forward precision
(``train.precision``: bf16 autocast or fp32, as the trainer's forward) and the dtype the weights load
in (``models.policy_dtype``: what the policy trains from). Each pair is scored alone
(``scoring.pair_forward``), exactly as the trainer's forward sees it, so at step 0 the policy
reproduces these log-probs bit for bit: the DPO loss is exactly log 2 and DPOP's penalty is exactly
off. Method, beta, seed and batch size are not in the key, so every method, beta and seed of a sweep
reuses one artifact; the manifest's ``sequences_scored`` shows how many sequences went through the
model, once.

Artifact: ``reference.safetensors`` (``pipeline.modeling.scoring.ScoredPairs``: ragged fp32 per-token
log-probs, observed-token logits and token ids of chosen and rejected, train AND test split; the
row order's pair ids are in its metadata). Where the pair artifact has one-sided rows
(``unpaired.parquet``, ``data.schema=unpaired``) also ``unpaired.safetensors``: the same for each of
them, its response scored ALONE (``scoring.response_forward``, the layout the trainer uses for it) and
its absent side an empty row (pipeline/data/unpaired.py); the key then covers their text too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from pipeline.store.artifact_reads import read_artifact_file
from pipeline.store.artifacts import Artifact
from pipeline.modeling.batching import check_token_budget
from pipeline.data import unpaired
from pipeline.store.distributed import build_shared, gather, process_state, shard
from pipeline.modeling.reference_scores import PAIRS_FILE, SCORES_FILE, UNPAIRED_SCORES_FILE
from pipeline.modeling.scoring import ForwardSettings, ScoredPairs, concat_scored, forward_settings, score_pairs

STAGE = "reference"
PRECISIONS = ("fp32", "bf16")


def config_subset(cfg: DictConfig) -> dict[str, Any]:
    from pipeline.modeling.models import attention_setting, policy_dtype
    from pipeline.modeling.precision import resolve_precision
    check_token_budget(cfg.train.max_length, cfg.train.max_prompt_length)
    return {
        **attention_setting(cfg.model),
        "max_length": int(cfg.train.max_length),
        "max_prompt_length": int(cfg.train.max_prompt_length),
        "precision": resolve_precision(cfg.train.precision),
        "weights_dtype": policy_dtype(cfg.model),  # as the policy loads them, so step 0 reproduces these scores
        **forward_settings(cfg).key(),  # the forward layout and head chunking every scoring stage shares
    }


def run(cfg: DictConfig, upstream: dict[str, Artifact], root: Path) -> Artifact:
    from pipeline.modeling.models import load_causal_lm, load_tokenizer

    pair = upstream["pair"]
    pairs = read_artifact_file(Path(pair.path) / PAIRS_FILE, pd.read_parquet)  # every split: probes and evaluation need test pairs
    one_sided = unpaired.load_rows(pair.path)  # None unless data.schema=unpaired
    subset = {**config_subset(cfg), "scored_text": scored_text_hash(pairs)}
    if one_sided is not None:  # absent key otherwise: paired setups keep their keys
        subset["scored_unpaired"] = unpaired.scored_text_hash(one_sided)
    inputs = {"model": upstream["model"]}

    def compute(workdir: Path) -> dict[str, Any] | None:
        state = process_state()  # several processes (accelerate launch): each scores its shard of the rows
        tokenizer = load_tokenizer(inputs["model"], trust_remote_code=bool(cfg.model.trust_remote_code))
        model = load_causal_lm(inputs["model"], cfg.model, dtype=subset["weights_dtype"]).to(state.device)
        settings = ForwardSettings(subset["prefix_sharing"], subset["logprob_chunk"], subset["precision"])

        def score(frame: pd.DataFrame, desc: str) -> ScoredPairs:
            rows = shard(len(frame), state.process_index, state.num_processes)
            part = score_pairs(model, tokenizer, frame.iloc[rows.start:rows.stop], subset["max_length"],
                               subset["max_prompt_length"], settings=settings, desc=desc,
                               progress=state.is_main_process)
            return concat_scored(gather(part))  # every rank's part in rank order: the single-process rows

        scored = score(pairs, "reference log-probs")
        lone = score(one_sided, "reference log-probs (one-sided rows)") if one_sided is not None else None
        if not state.is_main_process:  # only the main process writes the artifact
            return None
        scored.save(workdir / SCORES_FILE)
        extra = {}
        if lone is not None:
            lone.save(workdir / UNPAIRED_SCORES_FILE)
            extra = {"unpaired_rows": len(lone), "unpaired_tokens": int(sum(lone.lengths(s).sum() for s in ("chosen", "rejected")))}
        return {"pairs": len(scored), "sequences_scored": 2 * len(scored) + extra.get("unpaired_rows", 0),
                "processes": state.num_processes,
                "first_pair_artifact": pair.key, **token_stats(scored, tokenizer.eos_token_id), **extra}

    # The rows are scored one pair at a time wherever they land, so the artifact (and its key) is the same
    # for any process count.
    return build_shared(root, STAGE, subset, inputs, compute)


def scored_text_hash(pairs: pd.DataFrame) -> str:
    """What the reference model reads, in row order: pair_id (a hash of prompt, chosen, rejected) and the
    rendered prompt. Bucket columns are left out on purpose."""
    digest = hashlib.sha256()
    for pair_id, prompt in zip(pairs["pair_id"].astype(str), pairs["prompt"].astype(str)):
        digest.update(pair_id.encode())
        digest.update(hashlib.sha256(prompt.encode()).digest())
    return digest.hexdigest()


def token_stats(scored: ScoredPairs, eos_id: int) -> dict[str, int]:
    """Response tokens scored and how many responses lost their EOS to ``train.max_length``."""
    stats = {}
    for side in ("chosen", "rejected"):
        lengths = scored.lengths(side)
        stats[f"{side}_tokens"] = int(lengths.sum())
        ends = scored.offsets[side][1:] - 1
        has_tokens = lengths > 0
        last = scored.token_id_values[side][ends[has_tokens]]
        stats[f"{side}_truncated"] = int((last != eos_id).sum()) + int((~has_tokens).sum())
    return stats
