"""Real two-process runs (gloo on CPU) through `accelerate launch ... -m pipeline`.

Training (DDP): every rank trains, only the main one takes the artifact lock and writes: the run must
finish (not deadlock on the lock), print each stage once, be found cached by the next launch, and resume
from a checkpoint on every rank to the same weights as an uninterrupted run.

Reference scoring and lm-eval shard their work over the ranks: the two-process artifacts must equal a
single-process run's (the reference bit for bit, under the same key; lm-eval's scores and every item).

`--multi_gpu` is what starts several processes: `accelerate launch --cpu --num_processes 2` starts ONE
(accelerate 1.15's simple launcher). On a CPU-only machine `--multi_gpu` runs torchrun with gloo.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from pipeline.stages.train import CRASH_HOOK_ENV

pytestmark = pytest.mark.slow  # four launches of two processes each: ~1-2 minutes on 2 cores

PROCESSES = 2
OVERRIDES = ("stages=[pair,reference,train]", "model=tiny", "train=smoke", "logger=none", "train.progress=false",
             "data.num_problems=40", "data.num_eval_items=4", "pairing.test_fraction=0.2", "train.max_length=96",
             "train.max_prompt_length=48", "train.checkpoint_every=2")  # smoke: 4 steps of 4 pairs per process


def free_port() -> int:
    with socket.socket() as sock:  # other test runs on this machine may hold torchrun's default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(root: Path, run_dir: Path, overrides=OVERRIDES, processes: int = PROCESSES, **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` with ``processes`` ranks, or with 1 the plain ``python -m pipeline``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "pipeline", *overrides,
               f"artifacts_dir={root}", f"hydra.run.dir={run_dir}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}  # one thread: the same kernels in every run
    environment.pop("RANK", None), environment.pop("WORLD_SIZE", None)
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)


def stage_lines(result: subprocess.CompletedProcess, stage: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(f"[{stage}] artifact ")]


def only_artifact(root: Path, stage: str) -> Path:
    finished = [path for path in (root / stage).iterdir() if (path / "manifest.json").is_file()]
    assert len(finished) == 1, finished
    return finished[0]


def only_train_artifact(root: Path) -> Path:
    return only_artifact(root, "train")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(directory.glob("*.safetensors")) for name, tensor in load_file(str(file)).items()}


def test_ddp_training_finishes_is_cached_and_resumes(tmp_path):
    root = tmp_path / "artifacts"
    first = launch(root, tmp_path / "run1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("model", "pair", "reference", "train"):  # one writer: the main process alone prints
        assert len(stage_lines(first, stage)) == 1, (stage, first.stdout)
    assert stage_lines(first, "train")[0].endswith("(computed)")
    record = json.loads((tmp_path / "run1" / "run.json").read_text())
    assert record["status"] == "ok" and set(record["artifacts"]) == {"model", "pair", "reference", "train"}

    trained = only_train_artifact(root)
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["processes"] == PROCESSES and manifest["config"]["processes"] == PROCESSES  # in the key
    assert record["artifacts"]["train"]["key"] == manifest["key"] == trained.name
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["processes"] == PROCESSES and summary["global_batch"] == 4 * PROCESSES
    metrics = read_jsonl(trained / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]  # written once, by the main process
    assert all(math.isfinite(row["train/loss"]) for row in metrics)
    assert any(key.startswith("train/logps_shift/chosen/") for key in metrics[-1])
    assert not (trained / "checkpoints").exists() and (trained / "model").is_dir()
    assert not list((root / "train").glob("*.partial"))

    again = launch(root, tmp_path / "run2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert stage_lines(again, "train") == [f"[train] artifact {trained} (cached)"]

    # Crash after step 3 (checkpoint at step 2) in a copy of the store, then resume: every rank restores.
    resumed_root = tmp_path / "resumed"
    shutil.copytree(root, resumed_root, ignore=shutil.ignore_patterns("train"))
    crashed = launch(resumed_root, tmp_path / "run3", **{CRASH_HOOK_ENV: "3"})
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stderr
    assert (resumed_root / "train" / f"{trained.name}.partial" / "checkpoints").is_dir()
    resumed = launch(resumed_root, tmp_path / "run4")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished = only_train_artifact(resumed_root)
    assert json.loads((finished / "manifest.json").read_text())["resumed_from_step"] == 2
    timing_free = lambda rows: [{k: v for k, v in row.items() if k != "train/tokens_per_second"} for row in rows]  # noqa: E731
    assert timing_free(read_jsonl(finished / "metrics.jsonl")) == timing_free(metrics)
    before, after = weights(trained / "model"), weights(finished / "model")
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


SHARDED = ("stages=[pair,reference,evaluate]", "model=tiny", "train=smoke", "logger=none", "data.num_problems=15",
           "data.num_eval_items=21", "pairing.test_fraction=0.2", "train.max_length=96", "train.max_prompt_length=48",
           "eval.limit=null", "eval.max_gen_toks=16")  # 13 test items a task: uneven over 2 ranks


def per_item(directory: Path) -> dict[tuple, tuple]:
    """Every logged item of every task: (task, doc_id, filter) -> (prompt, its metrics, the model's responses)."""
    items = {}
    for file in sorted((directory / "samples").glob("*.jsonl")):
        for row in read_jsonl(file):
            metrics = {key: row[key] for key in ("acc", "acc_norm", "exact_match") if key in row}
            # each request's first response: lm-eval pads a rank that has fewer requests with copies of its last
            # one, and the copy's answer is appended to that request's responses (its metrics read the first)
            responses = [request[0] for request in row["resps"]]
            items[(file.stem, row["doc_id"], row.get("filter"))] = (row["arguments"], metrics, responses)
    return items


def flat(value) -> list:
    return [item for part in value for item in flat(part)] if isinstance(value, (list, tuple)) else [value]


def test_reference_and_lm_eval_shard_over_ranks_and_equal_one_process(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    alone = launch(single, tmp_path / "run1", overrides=SHARDED, processes=1)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    both = launch(sharded, tmp_path / "run2", overrides=SHARDED)
    assert both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
    for stage in ("pair", "reference", "evaluate"):  # the main process alone prints
        assert len(stage_lines(both, stage)) == 1, (stage, both.stdout)

    # Reference: the same key, the same bytes; the manifest says two processes scored it.
    one, two = only_artifact(single, "reference"), only_artifact(sharded, "reference")
    assert one.name == two.name
    assert json.loads((one / "manifest.json").read_text())["processes"] == 1
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["processes"] == PROCESSES and manifest["sequences_scored"] == 2 * manifest["pairs"]
    first, second = load_file(str(one / "reference.safetensors")), load_file(str(two / "reference.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    assert (one / "reference.safetensors").read_bytes() == (two / "reference.safetensors").read_bytes()

    # lm-eval: its requests split over the two ranks, every item answered as in one process.
    one, two = only_artifact(single, "lm_eval"), only_artifact(sharded, "lm_eval")
    assert json.loads((one / "manifest.json").read_text())["processes"] == 1
    assert json.loads((two / "manifest.json").read_text())["processes"] == PROCESSES
    scores_one = json.loads((one / "lm_eval_scores.json").read_text())
    scores_two = json.loads((two / "lm_eval_scores.json").read_text())
    assert scores_one.keys() == scores_two.keys() == {"local_mc", "local_gen"}
    for task in scores_one:
        for metric, value in scores_one[task].items():
            assert scores_two[task][metric] == pytest.approx(value, abs=1e-12), (task, metric)
    items_one, items_two = per_item(one), per_item(two)
    assert {task: len({doc for name, doc, _ in items_one if name == task}) for task in scores_one} == \
        {"local_mc": 13, "local_gen": 13}
    assert items_one.keys() == items_two.keys()
    for item, (prompt, metrics, responses) in items_one.items():
        prompt_two, metrics_two, responses_two = items_two[item]
        assert prompt_two == prompt and metrics_two == metrics, item  # the same prompts (few-shot included)
        # the same answers; log-likelihoods to float rounding (each rank batches its own share of requests)
        values, values_two = flat(responses), flat(responses_two)
        assert [v for v in values if not isinstance(v, float)] == [v for v in values_two if not isinstance(v, float)]
        assert [v for v in values_two if isinstance(v, float)] == pytest.approx([v for v in values if isinstance(v, float)], abs=1e-4)
