"""hydra/launcher=submitit_local_gpu: parallel local jobs get disjoint GPUs, in a real Hydra multirun through
submitit's local executor (on CPU: the jobs only see CUDA_VISIBLE_DEVICES, which run.json records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def sweep(tmp_path: Path, visible: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": visible}
    command = [sys.executable, "-m", "pipeline", "--multirun", "hydra/launcher=submitit_local_gpu",
               "hydra.launcher.cpus_per_task=1", "stages=[model]", "model=tiny", "logger=none", "sweep_name=gpus",
               f"artifacts_dir={tmp_path / 'store'}", *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_parallel_local_jobs_get_their_own_gpus(tmp_path):
    result = sweep(tmp_path, "3,5", "seed=1,2,3")
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "runs" / "gpus").iterdir()
    records = {json.loads((sweep_dir / str(job) / "run.json").read_text())["config"]["seed"]:
               json.loads((sweep_dir / str(job) / "run.json").read_text()) for job in range(3)}
    assert all(record["status"] == "ok" for record in records.values())
    given = [records[seed]["cuda_visible_devices"] for seed in (1, 2, 3)]
    # two at once on GPUs 3 and 5 (never the same one), the third on whichever the first to finish handed back
    assert sorted(given[:2]) == ["3", "5"] and given[2] in ("3", "5"), given


def test_more_gpus_per_job_than_visible_is_one_line(tmp_path):
    result = sweep(tmp_path, "0", "hydra.launcher.gpus_per_node=2", "seed=1,2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: hydra.launcher.gpus_per_node=2: only 1 GPU(s) visible (0); "
                                                     "expected at most 1 (the GPUs CUDA_VISIBLE_DEVICES lists, or all)")
