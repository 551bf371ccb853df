"""Runs started at the same moment: each keeps its own run record; identical ones compute each artifact once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

SMALL = ["model=tiny", "logger=none", "data.num_problems=10", "data.num_eval_items=4", "stages=[model,pair]"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
        outputs.append(out)
    return outputs


def test_two_runs_started_together_keep_both_records(tmp_path):
    store = tmp_path / "store"
    finish([start([*SMALL, f"artifacts_dir={store}", f"method={m}"], tmp_path) for m in ("dpo", "bnf")])
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "adhoc").glob("*/run.json")]
    assert sorted(r["method"] for r in records) == ["bnf", "dpo"]
    assert all(r["status"] == "ok" for r in records)


def test_identical_runs_compute_each_artifact_once(tmp_path):
    store = tmp_path / "store"
    outputs = finish([start([*SMALL, f"artifacts_dir={store}"], tmp_path) for _ in range(2)])
    for stage in ("model", "pair"):
        lines = [line for out in outputs for line in out.splitlines() if line.startswith(f"[{stage}] artifact")]
        assert len(lines) == 2 and sum(line.endswith("(computed)") for line in lines) == 1, lines
    assert len(list((store / "pair").glob("*/manifest.json"))) == 1
