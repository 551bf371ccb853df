"""A finished job leaves nothing behind: one process runs a whole sweep (Hydra multirun), so a job's
model, optimiser and caches must be freed before the next job starts (pipeline/orchestration/job_memory.py)."""

from __future__ import annotations

import gc
import json

import torch

from pipeline.orchestration.orchestrate import Run
from tests.conftest import compose_config


def live(kind) -> set[int]:
    """Ids of the objects of ``kind`` the garbage collector tracks: reachable ones and unfreed cycles alike."""
    return {id(o) for o in gc.get_objects() if isinstance(o, kind)}


def test_a_finished_job_leaves_no_model_or_optimiser_alive(tmp_path):
    from transformers import PreTrainedModel

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 1}?", "chosen": f" {2 * i + 1}.",
                                        "rejected": f" {2 * i + 2}."}) + "\n" for i in range(8)))
    cfg = compose_config(f"artifacts_dir={tmp_path / 'artifacts'}", "stages=[pair,reference,train]", "model=tiny",
                         "logger=none", "data=local", f"data.path={data}", "pairing.test_fraction=0",
                         "train.max_steps=2", "train.batch_size=4", "train.progress=false", "train.probe_pairs=0",
                         "train.checkpoint_every=0", "train.max_length=64", "train.max_prompt_length=32")
    before_models, before_optimisers = live(PreTrainedModel), live(torch.optim.Optimizer)
    gc.disable()  # only the job's own release may free cycles: the automatic collector must not do it by chance
    try:
        record = Run(cfg, tmp_path / "run").execute()
        left_models = live(PreTrainedModel) - before_models
        left_optimisers = live(torch.optim.Optimizer) - before_optimisers
    finally:
        gc.enable()
    assert record["status"] == "ok" and not record["artifacts"]["train"]["cached"]  # it really loaded and trained
    assert not left_models, f"{len(left_models)} models of the finished job are still in memory"
    assert not left_optimisers, f"{len(left_optimisers)} optimisers of the finished job are still in memory"
