"""Train stage on the tiny model: every method moves every weight, resume is bit-identical, NaN stops
cleanly, bad values are rejected before any model loads, and the entry command works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CONF_DIR, REPO_ROOT, compose_config
from pipeline.training.checkpointing import load_checkpoint
from pipeline.errors import UserError
from pipeline.orchestration.orchestrate import Run
from pipeline.stages.train import CRASH_HOOK_ENV
from pipeline.training.session import TrainingDiverged

METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
# Small and fast: ~70 pairs, short sequences, fp32 so CPU runs are bit-reproducible.
BASE = ("model=tiny", "logger=none", "data.num_problems=40", "data.num_eval_items=4", "pairing.test_fraction=0.2",
        "train.precision=fp32", "train.max_length=96", "train.max_prompt_length=48", "train.batch_size=4",
        "train.probe_pairs=3", "train.probe_every=2", "train.progress=false", "train.warmup_ratio=0")


def config(root: Path, *overrides: str):
    return compose_config(f"artifacts_dir={root}", "stages=[pair,reference,train]", *BASE, *overrides)


def execute(root: Path, *overrides: str) -> Run:
    run = Run(config(root, *overrides), root.parent / "run")
    run.execute()
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One model + pair + reference store shared by every test here (train is what varies)."""
    root = tmp_path_factory.mktemp("train-store") / "artifacts"
    run = Run(config(root, "stages=[pair,reference]"), root.parent / "run")
    run.execute()
    return root


def copy_store(store: Path, tmp_path: Path) -> Path:
    """A private copy, so a test's train artifact never collides with another's (checkpoint_every is not in the key)."""
    root = tmp_path / "artifacts"
    shutil.copytree(store, root, ignore=shutil.ignore_patterns("train"))
    return root


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_changes_every_parameter(store, method):
    run = execute(store, f"method={method}", "train.max_steps=2", "train.lr=1e-3", "train.checkpoint_every=0")
    trained = run.artifacts["train"].path
    before, after = weights(run.artifacts["model"].path / "model"), weights(trained / "model")
    assert before.keys() == after.keys() and before
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"{method}: parameters not updated: {unchanged}"
    metrics = read_jsonl(trained / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1, 2]
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/lr",
                "train/grad_norm", "train/tokens_per_second"):
        assert key in metrics[0] and metrics[0][key] == metrics[0][key], key  # present and not nan
    assert any(key.startswith("train/logps_shift/chosen/") for key in metrics[0])
    assert any(key.startswith("train/logps_shift/rejected/") for key in metrics[0])
    trajectories = read_jsonl(trained / "trajectories.jsonl")
    assert sorted({row["step"] for row in trajectories}) == [0, 2]
    first = [row for row in trajectories if row["step"] == 0]
    assert len(first) == 3
    # At step 0 the policy is the reference, scored in the same per-pair layout: the shift is exactly 0.
    assert all(row["chosen_shift"] == 0 and row["rejected_shift"] == 0 for row in first)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"]["train/loss"] == metrics[-1]["train/loss"]
    assert not (trained / "checkpoints").exists()


def test_dpo_starts_at_log2_and_logs_the_schedule(store):
    run = execute(store, "method=dpo", "train.max_steps=3", "train.lr=1e-3", "train.schedule=linear",
                  "train.checkpoint_every=0")
    metrics = read_jsonl(run.artifacts["train"].path / "metrics.jsonl")
    assert metrics[0]["train/loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at step 1
    assert [row["train/lr"] for row in metrics] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_resume_after_crash_is_bit_identical(store, tmp_path, monkeypatch):
    overrides = ("method=dpop", "train.max_steps=5", "train.lr=1e-3", "train.checkpoint_every=2",
                 "train.grad_accumulation=2", "train.schedule=cosine")
    straight = execute(copy_store(store, tmp_path / "a"), *overrides).artifacts["train"]

    root = copy_store(store, tmp_path / "b")
    monkeypatch.setenv(CRASH_HOOK_ENV, "3")
    with pytest.raises(RuntimeError, match="simulated crash after step 3"):
        execute(root, *overrides)
    partial = next((root / "train").glob("*.partial"))
    assert (partial / "checkpoints" / "state.safetensors").is_file()
    assert len(read_jsonl(partial / "metrics.jsonl")) == 3  # steps 1-3 logged; step 3 is redone on resume
    monkeypatch.delenv(CRASH_HOOK_ENV)
    resumed = execute(root, *overrides).artifacts["train"]

    assert resumed.key == straight.key
    assert json.loads((resumed.path / "summary.json").read_text())["resumed_from_step"] == 2
    a, b = weights(straight.path / "model"), weights(resumed.path / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    drop_timing = lambda rows: [{k: v for k, v in r.items() if k != "train/tokens_per_second"} for r in rows]  # noqa: E731
    assert drop_timing(read_jsonl(straight.path / "metrics.jsonl")) == drop_timing(read_jsonl(resumed.path / "metrics.jsonl"))
    assert read_jsonl(straight.path / "trajectories.jsonl") == read_jsonl(resumed.path / "trajectories.jsonl")


def test_a_planted_checkpoint_is_not_executed_and_training_starts_over(store, tmp_path, monkeypatch, capsys):
    """A pickle planted where the checkpoint lives (a shared store) must never run: the run says so and trains from 0."""
    import pickle

    from tests.test_store_safety import Planted

    overrides = ("method=dpo", "train.max_steps=3", "train.checkpoint_every=1")
    root = copy_store(store, tmp_path)
    monkeypatch.setenv(CRASH_HOOK_ENV, "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        execute(root, *overrides)
    monkeypatch.delenv(CRASH_HOOK_ENV)
    checkpoints = next((root / "train").glob("*.partial")) / "checkpoints"
    marker = tmp_path / "pwned"
    for name in ("state.safetensors", "state.pt"):
        (checkpoints / name).write_bytes(pickle.dumps(Planted(marker)))
    capsys.readouterr()
    trained = execute(root, *overrides).artifacts["train"]
    assert not marker.exists()
    assert "not a readable checkpoint" in capsys.readouterr().out
    summary = json.loads((trained.path / "summary.json").read_text())
    assert summary["resumed_from_step"] is None and summary["steps"] == 3
    rows = {e["path"]: e for e in json.loads((trained.path / "manifest.json").read_text())["files"]}
    assert rows["metrics.jsonl"]["rows"] == len(read_jsonl(trained.path / "metrics.jsonl")) == 3


def test_nan_loss_stops_with_one_line_and_keeps_checkpoint(store, tmp_path):
    root = copy_store(store, tmp_path)
    # An absurd learning rate without clipping blows the weights up to inf within a few steps.
    with pytest.raises(TrainingDiverged) as caught:
        execute(root, "method=dpo", "train.max_steps=6", "train.lr=1e30", "train.max_grad_norm=null",
                "train.checkpoint_every=1")
    message = str(caught.value)
    assert "\n" not in message and "not finite) at step " in message and "last good checkpoint (step " in message
    step = int(message.split("at step ")[1].split(",")[0])
    assert step >= 2
    partial = next((root / "train").glob("*.partial"))
    state = load_checkpoint(partial)
    assert state["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not list((root / "train").glob("*/manifest.json"))  # no finished artifact


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-5", "train.lr"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.max_steps=-3", "train.max_steps"),
    ("train.max_length=32", "train.max_length"),  # shorter than the prompt budget (48)
    ("train.batch_size=0", "train.batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("train.schedule=step", "train.schedule"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
])
def test_bad_values_are_rejected_before_any_model_loads(tmp_path, override, key):
    root = tmp_path / "artifacts"
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as caught:
        execute(root, "method=dpo", override)
    assert "\n" not in str(caught.value)
    assert not root.exists()  # nothing was computed, not even the model


@pytest.mark.slow  # ~30 s: a fresh interpreter builds every stage
def test_entry_command_on_tiny_model(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "pipeline", "stages=[pair,reference,train]", "model=tiny", "train.max_steps=4",
               "method=dpop", f"artifacts_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}",
               *[o for o in BASE if not o.startswith(("model=", "logger="))], "logger=none"]
    out = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("model", "pair", "reference", "train"):
        assert f"[{stage}] artifact " in out.stdout and "(computed)" in out.stdout
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "ok"
    trained = Path(record["artifacts"]["train"]["path"])
    assert json.loads((trained / "summary.json").read_text())["steps"] == 4
    assert (trained / "model" / "config.json").is_file() and (trained / "model" / "tokenizer_config.json").is_file()


@pytest.mark.slow  # three short trainings (~20 s); tests/test_store_trust.py covers the parts fast
def test_a_partial_folder_from_another_learning_rate_is_not_resumed_nor_published(store, tmp_path, monkeypatch, capsys):
    """Another learning rate's crashed run copied over this key's partial folder, with a LoRA adapter planted
    in it: training starts over, and the published model is the one this run wrote, without the adapter."""
    overrides = ("method=dpo", "train.max_steps=3", "train.checkpoint_every=1")
    root = copy_store(store, tmp_path)
    monkeypatch.setenv(CRASH_HOOK_ENV, "1")
    for lr in ("1e-3", "5e-3"):  # each leaves its partial folder with a step-1 checkpoint
        with pytest.raises(RuntimeError, match="simulated crash"):
            execute(root, *overrides, f"train.lr={lr}")
    monkeypatch.delenv(CRASH_HOOK_ENV)
    partials = {read_jsonl(p / "metrics.jsonl")[0]["train/lr"]: p for p in (root / "train").glob("*.partial")}
    assert sorted(partials) == pytest.approx([1e-3, 5e-3])
    source, target = partials[min(partials)], partials[max(partials)]
    capsys.readouterr()
    shutil.rmtree(target)
    shutil.copytree(source, target)
    (target / "model").mkdir()
    (target / "model" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    trained = execute(root, *overrides, "train.lr=5e-3").artifacts["train"]
    out = capsys.readouterr().out
    assert trained.path == target.with_name(target.name.removesuffix(".partial"))
    assert f"written for train/{source.name.removesuffix('.partial')}" in out
    summary = json.loads((trained.path / "summary.json").read_text())
    assert summary["resumed_from_step"] is None and summary["steps"] == 3
    published = [e["path"] for e in json.loads((trained.path / "manifest.json").read_text())["files"]]
    assert "model/adapter_config.json" not in published and not (trained.path / "model" / "adapter_config.json").exists()
    assert read_jsonl(trained.path / "metrics.jsonl")[0]["train/lr"] == pytest.approx(5e-3)
