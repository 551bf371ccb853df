"""The command line: `--help` generated from conf/ and sweeps/, and `sweep=<name>` running a named sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.orchestration import cli
from pipeline.errors import UserError
from tests.conftest import CONF_DIR, REPO_ROOT


def test_help_lists_stages_every_option_sweeps_and_launchers():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    text = result.stdout
    assert result.returncode == 0 and text.startswith("prefopt:")
    assert "Powered by Hydra" not in text and "artifacts_dir: artifacts" not in text  # no bare config dump
    for stage, _ in cli.STAGES:
        assert f"  {stage} " in text
    lines = text.splitlines()
    for group in (d for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra"):
        section = lines[lines.index(f"  {group.name}:") + 1:]
        section = section[:next(i for i, l in enumerate(section) if not l.startswith("    "))]
        assert len(section) == len(list(group.glob("*.yaml")))
        for option in group.glob("*.yaml"):
            line = next(l for l in section if l.strip().lstrip("*").startswith(option.stem + " "))
            assert cli.first_comment(option)[:40] in line, (group.name, option.stem)
    for sweep in (REPO_ROOT / "sweeps").glob("*.yaml"):
        assert f"    {sweep.stem} " in text
    for launcher in ("joblib_local", "slurm", "submitit_local_cpu"):
        assert f"    {launcher} " in text
    assert "*smollm2_135m" in text and "*dpop" in text  # defaults marked
    assert text.count("python -m pipeline ") >= 3  # examples


def test_sweep_argument_becomes_a_multirun_of_the_named_file():
    argv = cli.rewrite_argv(["pipeline", "-m", "sweep=seeds", "train.max_steps=2"])
    assert argv == ["pipeline", "--multirun", "--config-dir", str(REPO_ROOT / "sweeps"), "--config-name", "seeds",
                    "train.max_steps=2"]
    assert cli.rewrite_argv(["pipeline", "method=dpo"]) == ["pipeline", "method=dpo"]
    with pytest.raises(UserError, match="sweep='nope': expected one of"):
        cli.rewrite_argv(["pipeline", "sweep=nope"])


def test_named_sweep_runs_without_config_dir(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "sweep=smoke", "stages=[pair]", "sweep_name=named",
                             "data.num_problems=20", "data.num_eval_items=4", "logger=none"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "runs" / "named").iterdir()
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert sorted(summary.method) == ["bnf", "dpo"] and list(summary.status) == ["ok", "ok"]  # the smoke grid


def test_entry_point_leaves_the_hugging_face_environment_alone(tmp_path):
    """The user's HF cache and hub settings are theirs: importing the entry point sets none of them."""
    probe = ("import os, pipeline.__main__; "
             "print(os.environ.get('HF_HOME'), os.environ.get('HF_HUB_OFFLINE'), os.environ.get('WANDB_MODE'))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    bare = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert bare.stdout.split() == ["None", "None", "offline"], bare.stderr
    mine = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**env, "HF_HOME": "/my/hf", "WANDB_MODE": "online"},
                          capture_output=True, text=True, timeout=60)
    assert mine.stdout.split() == ["/my/hf", "None", "online"], mine.stderr
