"""pipeline/orchestration/cluster.py on CPU: GPUs shared out to parallel jobs (by hand), and no export outside a submitit job."""

from __future__ import annotations

import pytest

from pipeline.orchestration.cluster import gpu_slices, join_job_tasks, visible_devices
from pipeline.errors import UserError


def test_parallel_jobs_get_disjoint_gpus_in_order():
    assert gpu_slices(1, ["0", "1", "2", "3"]) == [["0"], ["1"], ["2"], ["3"]]
    assert gpu_slices(2, ["0", "1", "2", "3", "4"]) == [["0", "1"], ["2", "3"]]  # GPU 4 left over
    assert gpu_slices(3, ["4", "6", "7"]) == [["4", "6", "7"]]  # the ids listed, not 0..n-1
    assert gpu_slices(1, ["GPU-1a2b"]) == [["GPU-1a2b"]]  # UUIDs pass through


def test_more_gpus_per_job_than_visible_is_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"^hydra\.launcher\.gpus_per_node=2: only 1 GPU\(s\) visible \(0\)") as error:
        gpu_slices(2, ["0"])
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="expected at least 1 GPU per job"):
        gpu_slices(0, ["0"])


def test_visible_devices_reads_cuda_visible_devices():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_outside_a_submitit_job_nothing_is_exported(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert join_job_tasks() == 1
    import os
    assert "RANK" not in os.environ
