"""SIGKILL at any moment loses nothing: a rerun finishes with exactly what an uninterrupted run computes.

Each case starts the real entry point in its own process group and kills it with SIGKILL (no handler
runs, as when a node dies or the OOM killer strikes) at a point read off the work in progress: the
training log's row count (first run and the resumed run), or the moment a stage's work folder appears
(pair, reference). Slow (a dozen interpreter starts); `.ci/run` runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

SMALL = ["model=tiny", "logger=none", "data.num_problems=60", "data.num_eval_items=4", "train.precision=fp32",
         "train.max_length=96", "train.max_prompt_length=48", "train.batch_size=4", "train.probe_pairs=3",
         "train.probe_every=2", "train.progress=false", "train.warmup_ratio=0", "method=dpop", "train.max_steps=10",
         "train.checkpoint_every=2", "train.lr=1e-3"]
RESULT_SUFFIXES = {".parquet", ".jsonl", ".json", ".safetensors"}  # figures carry creation dates; manifests timings


def start(store: Path, run_dir: Path, stages: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", f"stages={stages}", *SMALL, f"artifacts_dir={store}",
                             f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_to_end(store: Path, run_dir: Path, stages: str) -> None:
    process = start(store, run_dir, stages)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


def kill_when(store: Path, run_dir: Path, stages: str, ready: Callable[[], bool]) -> bool:
    """Start a run and SIGKILL its whole process group as soon as ``ready()``; False if it finished first."""
    process = start(store, run_dir, stages)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    process.communicate()
    return False


def rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def partial(store: Path, stage: str) -> Path | None:
    return next((store / stage).glob("*.partial"), None) if (store / stage).is_dir() else None


def published(store: Path, stage: str) -> Path:
    (path,) = [p.parent for p in (store / stage).glob("*/manifest.json")]
    return path


def results(artifact: Path) -> dict[str, str]:
    """sha256 of every result file, by path (figures and the manifest left out: dates and timings)."""
    return {str(p.relative_to(artifact)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(artifact.rglob("*")) if p.is_file() and p.suffix in RESULT_SUFFIXES and p.name != "manifest.json"}


def without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "train/tokens_per_second"}
            for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every killed one must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    run_to_end(root / "store", root / "run", "[pair,reference,train]")
    return root / "store"


def test_killed_pair_and_reference_stages_rerun_to_the_same_artifacts(straight, tmp_path):
    store = tmp_path / "store"
    run_to_end(store, tmp_path / "model-run", "[model]")
    assert kill_when(store, tmp_path / "run1", "[pair]", lambda: partial(store, "pair") is not None)
    assert not list((store / "pair").glob("*/manifest.json"))  # nothing published by the killed run
    assert kill_when(store, tmp_path / "run2", "[pair,reference]", lambda: partial(store, "reference") is not None)
    assert not list((store / "reference").glob("*/manifest.json"))
    run_to_end(store, tmp_path / "run3", "[pair,reference]")
    for stage in ("pair", "reference"):
        assert results(published(store, stage)) == results(published(straight, stage)), stage


@pytest.mark.parametrize("kill_at_rows", [(3,), (1, 7), (5, 6, 9)], ids=lambda points: "-".join(map(str, points)))
def test_training_killed_at_several_steps_resumes_bit_identically(straight, tmp_path, kill_at_rows):
    """Kills while training and while resuming (the row count falls back to the checkpoint, then grows)."""
    store = tmp_path / "store"
    shutil.copytree(straight, store, ignore=shutil.ignore_patterns("train"))
    for attempt, at in enumerate(kill_at_rows):
        def ready(at=at) -> bool:
            work = partial(store, "train")
            return work is not None and rows(work / "metrics.jsonl") >= at
        assert kill_when(store, tmp_path / f"run{attempt}", "[pair,reference,train]", ready), f"finished before row {at}"
        assert not list((store / "train").glob("*/manifest.json"))
    run_to_end(store, tmp_path / "final", "[pair,reference,train]")

    resumed, reference = published(store, "train"), published(straight, "train")
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_step"] is not None  # it did pick up a checkpoint
    a, b = load_file(str(reference / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert without_timing(resumed / "metrics.jsonl") == without_timing(reference / "metrics.jsonl")
    assert (resumed / "trajectories.jsonl").read_bytes() == (reference / "trajectories.jsonl").read_bytes()
    files = {e["path"]: e for e in json.loads((resumed / "manifest.json").read_text())["files"]}
    assert files["metrics.jsonl"]["rows"] == 10
