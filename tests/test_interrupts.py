"""SIGTERM/SIGINT: an interrupted run is recorded as such, exits non-zero and resumes from a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import interrupts
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_raises_interrupted_with_the_exit_code(signum):
    with pytest.raises(interrupts.Interrupted) as caught:
        with interrupts.handled():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
    assert caught.value.exit_code == 128 + signum and caught.value.signal_name == signal.Signals(signum).name


def test_inside_deferred_the_first_signal_waits_for_the_safe_point_and_a_second_stops_at_once(capsys):
    with interrupts.handled(), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.stop_requested().signal_name == "SIGTERM"  # recorded, not raised
        assert "finishing the current step" in capsys.readouterr().out
        with pytest.raises(interrupts.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert interrupts.stop_requested() is None  # cleared on leaving the block
    assert signal.getsignal(signal.SIGTERM) is not interrupts.handle  # the previous handler is back


def test_the_run_record_says_interrupted(make_config, tmp_path, monkeypatch):
    """A stop that arrives while a stage computes: status interrupted (not failed), and nothing published."""
    from pipeline.store import artifacts
    from pipeline.orchestration.orchestrate import Run

    run = Run(make_config("model=tiny", "logger=none", "stages=[model]"), tmp_path / "run")
    original = artifacts.build

    def interrupted_build(root, stage, config, upstream, compute, resumable=False):
        def stopping(workdir):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return original(root, stage, config, upstream, stopping, resumable)

    import pipeline.stages.model as model_stage
    monkeypatch.setattr(model_stage, "build", interrupted_build)  # the signal arrives while the model stage computes
    with pytest.raises(interrupts.Interrupted), interrupts.handled():
        run.execute()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
    assert not list((tmp_path / "artifacts").glob("model/*/manifest.json"))


@pytest.mark.slow
def test_sigterm_during_training_checkpoints_the_step_and_a_rerun_resumes(tmp_path):
    args = ["model=tiny", "logger=none", "stages=[pair,reference,train]", "data.num_problems=40",
            "data.num_eval_items=4", "train.max_steps=60", "train.checkpoint_every=0", "train.batch_size=2",
            "train.max_length=96", "train.max_prompt_length=48", "train.progress=false", "train.precision=fp32",
            f"artifacts_dir={tmp_path / 'artifacts'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *args, f"hydra.run.dir={tmp_path / 'run1'}"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = None
    for _ in range(6000):  # until two training steps are logged
        found = list((tmp_path / "artifacts" / "train").glob("*.partial/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 2:
            metrics = found[0]
            break
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    assert metrics is not None
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "interrupted: SIGTERM" in err and "Traceback" not in err
    record = json.loads((tmp_path / "run1" / "run.json").read_text())
    assert record["status"] == "interrupted"
    stopped_at = len(metrics.read_text().splitlines())
    assert f"stopped after step {stopped_at} of 60" in out
    second = subprocess.run([sys.executable, "-m", "pipeline", *args, f"hydra.run.dir={tmp_path / 'run2'}"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr
    trained = Path(json.loads((tmp_path / "run2" / "run.json").read_text())["artifacts"]["train"]["path"])
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == 60
