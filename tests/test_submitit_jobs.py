"""Real submitit jobs on this machine's CPUs (submitit's local executor, as on SLURM: a controller process
starts the job's tasks, signals them before the time limit, restarts them when the job asks to be requeued).

- A job of two tasks (``hydra.launcher.tasks_per_node=2``) is one gloo DDP launch: it must train the tiny
  model to the very weights ``accelerate launch --multi_gpu --num_processes 2`` gives (accelerate's own
  launcher, the independent reference), print each stage once and write one run record.
- A job preempted mid-training (SIGUSR2 to every task, what SLURM sends before a time limit or a preemption)
  is checkpointed and requeued by submitit, resumes from the last training checkpoint and ends with weights
  bit-identical to the uninterrupted run.

Slow (a few launches of two processes each); `make test-dist` runs them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.test_multiprocess import only_artifact

pytestmark = pytest.mark.slow

TASKS = 2
OVERRIDES = ("stages=[pair,reference,train]", "model=tiny", "train=smoke", "logger=none", "train.progress=false",
             "data.num_problems=40", "data.num_eval_items=4", "pairing.test_fraction=0.2", "train.max_length=96",
             "train.max_prompt_length=48", "train.max_steps=8", "train.checkpoint_every=2")


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(store: Path, run_dir: Path) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(TASKS), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "pipeline", *OVERRIDES, f"artifacts_dir={store}", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def submitit_sweep(cwd: Path, store: Path, sweep_name: str, tasks: int = TASKS) -> subprocess.Popen:
    """``python -m pipeline -m`` with submitit's local launcher: one job of ``tasks`` tasks."""
    command = [sys.executable, "-m", "pipeline", "--multirun", "hydra/launcher=submitit_local_cpu",
               f"hydra.launcher.tasks_per_node={tasks}", f"sweep_name={sweep_name}", *OVERRIDES,
               f"artifacts_dir={store}"]
    return subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    return out


def job_folder(cwd: Path, sweep_name: str) -> tuple[Path, Path]:
    """(the job's run folder, its submitit folder) of a one-job sweep."""
    (sweep_dir,) = (cwd / "runs" / sweep_name).iterdir()
    return sweep_dir / "0", submitit_folder(sweep_dir)


def submitit_folder(sweep_dir: Path) -> Path:
    """The job's submitit folder, named by its job id (beside it, submitit's own ``%j`` template folder)."""
    (folder,) = [path for path in (sweep_dir / ".submitit").iterdir() if path.name.isdigit()]
    return folder


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (read from /proc: the job's tasks are the controller's children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def weights(artifact: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted((artifact / "model").glob("*.safetensors"))
            for name, tensor in load_file(str(file)).items()}


def timing_free(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "train/tokens_per_second"}
            for line in path.read_text().splitlines() if line.strip()]


def rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def assert_same_training(got: Path, expected: Path) -> None:
    assert got.name == expected.name  # the same key: the same config, two processes
    a, b = weights(expected), weights(got)
    assert a and a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert timing_free(got / "metrics.jsonl") == timing_free(expected / "metrics.jsonl")


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The store of an uninterrupted ``accelerate launch`` of two processes."""
    root = tmp_path_factory.mktemp("accelerate")
    accelerate_launch(root / "store", root / "run")
    return root / "store"


def test_two_task_job_trains_like_accelerate_launch(launched, tmp_path):
    store = tmp_path / "store"
    finish(submitit_sweep(tmp_path, store, "tasks"))
    run_dir, submitit_dir = job_folder(tmp_path, "tasks")
    logs = [(submitit_dir / f"{submitit_dir.name}_{rank}_log.out").read_text() for rank in range(TASKS)]
    for stage in ("pair", "reference", "train"):  # rank 0 alone prints (each task has its own log)
        assert [log.count(f"[{stage}] artifact ") for log in logs] == [1, 0], stage
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok" and set(record["artifacts"]) == {"model", "pair", "reference", "train"}
    trained = only_artifact(store, "train")
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["processes"] == TASKS and manifest["config"]["processes"] == TASKS
    assert json.loads((trained / "summary.json").read_text())["global_batch"] == 4 * TASKS
    assert_same_training(trained, only_artifact(launched, "train"))
    # the reference stage shards its rows over the tasks and writes the single-process artifact
    one, two = only_artifact(launched, "reference"), only_artifact(store, "reference")
    assert (one / "reference.safetensors").read_bytes() == (two / "reference.safetensors").read_bytes()


def test_preempted_job_is_requeued_and_resumes_bit_identically(launched, tmp_path):
    store = tmp_path / "store"
    process = submitit_sweep(tmp_path, store, "preempted")
    signalled, deadline = [], time.monotonic() + 600
    while not signalled and process.poll() is None and time.monotonic() < deadline:
        work = next((store / "train").glob("*.partial"), None) if (store / "train").is_dir() else None
        if work is not None and rows(work / "metrics.jsonl") >= 3:  # past the step-2 checkpoint
            submitit_dir = submitit_folder(next((tmp_path / "runs" / "preempted").iterdir()))
            signalled = children(int(submitit_dir.name))  # the controller's pid is the local job id
            for pid in signalled:  # as SLURM does: every task of the job gets the signal
                os.kill(pid, signal.SIGUSR2)
        time.sleep(0.005)
    assert len(signalled) == TASKS, "the job finished before it could be preempted"
    finish(process)

    run_dir, submitit_dir = job_folder(tmp_path, "preempted")
    log = (submitit_dir / f"{submitit_dir.name}_0_log.out").read_text()
    assert "this job is preempted" in log and "Requeued job" in log
    assert log.count("Starting with JobEnvironment") == 2  # the first run and the requeued one
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok"
    trained = only_artifact(store, "train")
    assert json.loads((trained / "summary.json").read_text())["resumed_from_step"] == 2
    assert_same_training(trained, only_artifact(launched, "train"))
