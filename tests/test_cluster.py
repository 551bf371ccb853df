"""pipeline/cluster.py on CPU: GPUs shared out to parallel jobs (by hand), and no export outside a submitit job."""

from __future__ import annotations

import pytest

from pipeline.cluster import join_job_tasks, job_devices, parallel_slots, visible_devices
from pipeline.errors import UserError


def test_parallel_jobs_get_disjoint_gpus_in_order():
    devices = ["0", "1", "2", "3"]
    assert [job_devices(slot, 4, 1, devices) for slot in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    assert [job_devices(slot, 2, 2, devices) for slot in range(2)] == [["0", "1"], ["2", "3"]]
    assert job_devices(0, 1, 3, ["4", "6", "7"]) == ["4", "6", "7"]  # the ids listed, not 0..n-1
    assert parallel_slots(3, devices) == 1


def test_more_parallel_jobs_than_gpus_is_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"^hydra\.launcher\.gpus_per_node=1: 3 jobs at once need 3 GPUs, 2 visible") as error:
        job_devices(0, 3, 1, ["0", "1"])
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"gpus_per_node=2: only 1 GPU\(s\) visible"):
        job_devices(0, 1, 2, ["0"])
    with pytest.raises(UserError, match="expected at least 1 GPU per job"):
        parallel_slots(0, ["0"])


def test_visible_devices_reads_cuda_visible_devices():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_outside_a_submitit_job_nothing_is_exported(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert join_job_tasks() == 1
    import os
    assert "RANK" not in os.environ
