"""`python -m pipeline.store` on a real temp store: list, show, rm with dependents, gc of unused artifacts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store import manage as store
from pipeline.errors import UserError
from pipeline.orchestration.orchestrate import Run
from tests.conftest import REPO_ROOT

SMALL = ("model=tiny", "logger=none", "data.num_problems=12", "data.num_eval_items=4", "stages=[pair,reference]",
         "train.max_length=128", "train.max_prompt_length=64")


@pytest.fixture
def filled(make_config, tmp_path):
    """Two runs over two seeds: one shared model, two pair artifacts, and a reference each."""
    records = [Run(make_config(*SMALL, f"seed={seed}"), tmp_path / "runs" / f"s{seed}").execute() for seed in (0, 1)]
    return tmp_path / "artifacts", tmp_path / "runs", records


def cli(root: Path, runs: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pipeline.store", "--root", str(root), "--runs", str(runs), *args],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_show_and_users(filled):
    root, runs, records = filled
    listing = cli(root, runs, "list")
    model_key = records[0]["artifacts"]["model"]["key"]
    model_line = next(line for line in listing.splitlines() if model_key in line)
    assert model_line.split()[5] == "2"  # both runs use the one model (columns: stage key size unit age runs)
    assert "5 artifact(s)" in listing  # model + 2 pair + 2 reference
    pair_key = records[1]["artifacts"]["pair"]["key"]
    shown = cli(root, runs, "show", pair_key[:6])
    assert f"model/{model_key}" in shown and "pairs.parquet" in shown and "runs/s1" in shown


def test_rm_is_a_dry_run_until_yes_and_takes_dependents(filled):
    root, runs, records = filled
    model_key = records[0]["artifacts"]["model"]["key"]
    dry = cli(root, runs, "rm", model_key)
    assert "dry run: 5 artifact(s)" in dry and (root / "model" / model_key).is_dir()
    pair_key = records[0]["artifacts"]["pair"]["key"]
    assert "removed 1 artifact(s)" in cli(root, runs, "rm", pair_key, "--yes")
    assert not (root / "pair" / pair_key).exists() and (root / "model" / model_key).is_dir()


def test_gc_keeps_what_runs_use_and_their_inputs(filled):
    root, runs, records = filled
    assert "dry run: 0 artifact(s)" in cli(root, runs, "gc")
    (runs / "s1" / "run.json").unlink()  # run s1 forgotten: its pair and reference are unused, the model is not
    out = cli(root, runs, "gc", "--yes")
    assert "removed 2 artifact(s)" in out
    left = {p.parent.name for p in root.glob("*/*/manifest.json")}
    assert left == {records[0]["artifacts"][s]["key"] for s in ("model", "pair", "reference")}


def test_unknown_key_is_one_line(filled):
    root, runs, _ = filled
    with pytest.raises(UserError, match="key 'zzz': no artifact has it"):
        store.main(["--root", str(root), "--runs", str(runs), "show", "zzz"])
