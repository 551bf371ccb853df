"""The training loop is right: fp32 master weights, step 0 equal to the reference in every precision,
dropout off, non-finite gradients stop the run, warm-up and decay groups, every pair weighted once
(accumulation and DDP equal one big batch)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.training import losses
from pipeline.orchestration.orchestrate import Run
from pipeline.training.session import TrainingDiverged
from pipeline.training.training_loop import (MicroBatchResult, StepMetrics, disable_dropout, parameter_groups, warmup_steps)
from tests.conftest import REPO_ROOT, compose_config

TINY = ("model=tiny", "logger=none", "train.max_length=96", "train.max_prompt_length=48", "train.progress=false",
        "train.probe_pairs=0", "train.checkpoint_every=0", "train.warmup_ratio=0", "train.schedule=constant")


def write_pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"What is {i} plus {i + 1}?", "chosen": f"{i} + {i + 1} = {2 * i + 1}.",
             "rejected": f"{i} + {i + 1} = {2 * i + 2}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def eleven_pairs(tmp_path_factory) -> Path:
    """11 training pairs, none held out: batch sizes 4 and 6 leave partial micro-batches."""
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 11)


def run(root: Path, data: Path, *overrides: str) -> Path:
    cfg = compose_config(f"artifacts_dir={root}", "stages=[pair,reference,train]", *TINY, "data=local",
                         f"data.path={data}", "pairing.test_fraction=0", *overrides)
    record = Run(cfg, root.parent / "run").execute()
    return Path(record["artifacts"]["train"]["path"])


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def metrics(train_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ fp32 master weights

def test_a_bf16_model_really_trains(tmp_path, eleven_pairs):
    """At lr 5e-7 an update is far below bf16's resolution: only fp32 master weights keep it.

    Counted over the transformer layers (embedding rows of tokens the data never uses get no gradient)."""
    trained = run(tmp_path / "artifacts", eleven_pairs, "model.dtype=bf16", "method=dpo", "train.lr=5e-7",
                  "train.max_steps=3", "train.batch_size=4", "train.precision=fp32")
    before = weights(tmp_path / "artifacts" / "model" / next((tmp_path / "artifacts" / "model").glob("*/model")).parent.name / "model")
    after = weights(trained / "model")
    layers = [k for k in before if ".layers." in k]
    # Compared in the dtype that trained: bf16 training would save bf16 weights, compared with bf16 starts.
    changed = sum(int((before[k].to(after[k].dtype) != after[k]).sum()) for k in layers)
    total = sum(before[k].numel() for k in layers)
    assert changed / total > 0.9, f"only {changed / total:.1%} of the weights moved"


# ------------------------------------------------------------------ step 0 equals the reference

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_zero_reproduces_the_reference_exactly(tmp_path, eleven_pairs, precision):
    """The first forward scores each pair as the reference stage did: rewards 0, DPO loss log 2, and
    DPOP's penalty exactly off, so DPOP's first update equals DPO's (same beta) bit for bit."""
    common = ("train.max_steps=1", "train.batch_size=4", f"train.precision={precision}", "train.lr=1e-3",
              "method.beta=0.3")
    dpo = run(tmp_path / "artifacts", eleven_pairs, "method=dpo", *common)
    dpop = run(tmp_path / "artifacts", eleven_pairs, "method=dpop", "method.lambda_=50", *common)
    first = metrics(dpo)[0]
    assert first["train/rewards/chosen"] == 0 and first["train/rewards/rejected"] == 0
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["train/logps_shift/chosen/low"] == 0
    assert metrics(dpop)[0]["train/loss"] == first["train/loss"]
    a, b = weights(dpo / "model"), weights(dpop / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ dropout

def test_dropout_is_switched_off(tiny_model_artifact, tiny_model_cfg):
    from pipeline.modeling.models import load_causal_lm
    model = load_causal_lm(tiny_model_artifact, tiny_model_cfg, trainable=True)
    for module in model.modules():  # give the tiny model dropout, as real checkpoints have
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    ids = torch.arange(1, 17).reshape(1, 16)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert disable_dropout(model) > 0
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


# ------------------------------------------------------------------ non-finite gradients

def test_a_non_finite_gradient_stops_before_the_optimiser_step(tmp_path, eleven_pairs, monkeypatch):
    """Finite loss, infinite gradient (sqrt at 0) from step 2 on: stop there, keep step 1's finite checkpoint."""
    calls = {"n": 0}
    dpo = losses.LOSSES["dpo"]

    def poisoned(inp, cfg):
        out = dpo(inp, cfg)
        calls["n"] += 1
        if calls["n"] >= 2:  # one micro-batch per step
            total = inp.chosen_logps.sum()
            out.loss = out.loss + torch.sqrt(total - total.detach())  # value 0, gradient inf
        return out

    monkeypatch.setitem(losses.LOSSES, "dpo", poisoned)
    root = tmp_path / "artifacts"
    with pytest.raises(TrainingDiverged) as caught:
        run(root, eleven_pairs, "method=dpo", "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=1",
            "train.precision=fp32")
    message = str(caught.value)
    assert "gradient norm" in message and "at step 2, before its optimiser step" in message
    assert "last good checkpoint (step 1)" in message
    partial = next((root / "train").glob("*.partial"))
    assert [row["step"] for row in metrics(partial)] == [1]


# ------------------------------------------------------------------ schedule and decay groups

@pytest.mark.parametrize("total,ratio,schedule", [
    (16, 0.1, "linear"), (10, 0.3, "linear"), (10, 0.1, "cosine"), (7, 0.5, "cosine"),
    (16, 0.25, "constant"), (5, 0.0, "linear"), (12, 0.99, "cosine"), (3, 0.2, "constant"), (100, 0.07, "linear")])
def test_lr_per_step_equals_transformers_get_scheduler(total, ratio, schedule):
    """Every step's lr equals what TRL/HF would use: warm-up count from TrainingArguments (a ratio
    passed as TRL's float ``warmup_steps``), then transformers.get_scheduler (step 0 of a warm-up has lr 0)."""
    from omegaconf import OmegaConf
    from transformers import TrainingArguments, get_scheduler

    from pipeline.training.training_loop import build_optimizer

    cfg = OmegaConf.create({"lr": 3e-4, "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8,
                            "warmup_ratio": ratio, "schedule": schedule})
    ours_optimizer, ours = build_optimizer(torch.nn.Linear(2, 2), cfg, total)
    hf_warmup = TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(total)
    hf_optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=3e-4)
    hf_name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    hf = get_scheduler(hf_name, hf_optimizer, num_warmup_steps=hf_warmup, num_training_steps=total)
    for step in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(hf.get_last_lr()[0], rel=1e-12, abs=1e-18), (step, hf_warmup)
        ours_optimizer.step(), ours.step(), hf_optimizer.step(), hf.step()
    if ratio > 0:
        assert warmup_steps(ratio, total) == hf_warmup > 0


def test_warmup_first_step_has_lr_zero_and_rounds_up():
    """16 steps at 0.1: 2 warm-up steps with lr 0 and peak/2 (hand-derived); 100 x 0.07 rounds as floats do (8)."""
    assert warmup_steps(0.1, 16) == 2 and warmup_steps(0.1, 10) == 1 and warmup_steps(0, 16) == 0
    assert warmup_steps(0.25, 8) == 2 and warmup_steps(0.07, 100) == 8
    from pipeline.training.training_loop import lr_factor
    assert [lr_factor(s, 16, 2, "linear") for s in range(3)] == [0.0, 0.5, 1.0]
    assert lr_factor(9, 16, 2, "linear") == pytest.approx(1 - 7 / 14)


def test_no_weight_decay_on_biases_and_norms(tiny_model_artifact, tiny_model_cfg):
    from pipeline.modeling.models import load_causal_lm
    model = load_causal_lm(tiny_model_artifact, tiny_model_cfg, trainable=True)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)].split(".")[-2] for p in no_decay["params"]} >= {"input_layernorm", "norm"}
    assert all("norm" not in names[id(p)] for p in decay["params"])
    assert any("embed_tokens" in names[id(p)] for p in decay["params"])


# ------------------------------------------------------------------ every pair weighted once

def test_step_metrics_weight_micro_batches_by_pairs():
    class Out:
        def __init__(self, loss):
            self.loss, self.metrics = torch.tensor(loss), {}
    step = StepMetrics(buckets=["low"] * 10)
    step.add(MicroBatchResult(Out(1.0), torch.zeros(4), torch.zeros(4), 0, 4), [0, 1, 2, 3])
    step.add(MicroBatchResult(Out(4.0), torch.zeros(1), torch.zeros(1), 0, 1), [4])
    assert step.finish()["train/loss"] == pytest.approx((4 * 1.0 + 1 * 4.0) / 5)  # not (1 + 4) / 2


# AdamW with eps 1 and lr 1 makes the first update g / (|g| + 1) ~ g: the weights show the gradient itself
# (with the default eps the first Adam step is ~ lr * sign(g), blind to how the pairs were weighted).
LINEAR_ADAM = ("method=dpo", "train.lr=1.0", "train.adam_eps=1.0", "train.max_grad_norm=null",
               "train.weight_decay=0", "train.precision=fp32", "train.max_steps=1")


@pytest.mark.parametrize("batch, accumulation", [(6, 2), (4, 3)])
def test_accumulation_equals_one_big_batch(tmp_path, eleven_pairs, batch, accumulation):
    """11 pairs in one micro-batch == 6 + 5 or 4 + 4 + 3 with accumulation: the same update."""
    whole = weights(run(tmp_path / "a", eleven_pairs, *LINEAR_ADAM, "train.batch_size=11")
                    / "model")
    split = weights(run(tmp_path / "b", eleven_pairs, *LINEAR_ADAM, f"train.batch_size={batch}",
                        f"train.grad_accumulation={accumulation}") / "model")
    base = weights(next((tmp_path / "a" / "model").glob("*/model")))
    moved = max(float((whole[k] - base[k].float()).abs().max()) for k in whole)
    assert moved > 1e-3  # the step really moved the weights
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-6, rtol=0)


def test_two_process_ddp_equals_one_process(tmp_path, eleven_pairs):
    """1 process x batch 4 vs 2 processes x batch 2 over 3 steps (the last global micro-batch has 3 pairs:
    2 on one process, 1 on the other): the same weights."""
    common = (*LINEAR_ADAM[:-1], "train.max_steps=3", "train.lr=0.1")
    single = run(tmp_path / "one" / "artifacts", eleven_pairs, *common, "train.batch_size=4")
    root = tmp_path / "two" / "artifacts"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "pipeline", "stages=[pair,reference,train]", *TINY, "data=local", f"data.path={eleven_pairs}",
               "pairing.test_fraction=0", *common, "train.batch_size=2", f"artifacts_dir={root}",
               f"hydra.run.dir={tmp_path / 'two' / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (double,) = [p for p in (root / "train").iterdir() if (p / "manifest.json").is_file()]
    a, b = weights(single / "model"), weights(double / "model")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    drop = lambda rows: [{k: v for k, v in r.items() if "tokens_per_second" not in k and "grad_norm" not in k}  # noqa: E731
                         for r in rows]
    for x, y in zip(drop(metrics(single)), drop(metrics(double))):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], abs=1e-5) for k in x)


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
