"""pipeline/store/tracking.py: W&B offline runs carry the logged keys; logger=none is a true no-op."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pandas as pd
from omegaconf import OmegaConf

from pipeline.store.tracking import Tracker, flat_run_config, start_run


def wandb_cfg(**logger):
    return OmegaConf.create({
        "logger": {"name": "wandb", "project": "prefopt-test", "entity": None, "mode": None, "tags": ["t"], **logger},
        "sweep_name": "unit-sweep", "seed": 3,
        "method": {"name": "dpop", "beta": 0.3, "lambda_": 50.0},
        "pairing": {"bucket_filter": None},
    })


def test_flat_config_exposes_grouping_fields():
    flat = flat_run_config(wandb_cfg())
    assert (flat["method"], flat["beta"], flat["lambda_"], flat["seed"]) == ("dpop", 0.3, 50.0, 3)
    assert flat["logger"]["project"] == "prefopt-test"  # the full config is kept too


def test_offline_run_writes_logged_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tracker = start_run(wandb_cfg(), job_type="train", name="unit-run")
    try:
        assert tracker.enabled
        tracker.log({"train/loss": 0.6931, "train/rewards/margins_unique_key": 1.25}, step=0)
        tracker.log({"train/loss": 0.5}, step=1)
        tracker.summary({"final/summary_unique_key": 7})
        tracker.log_table("probe_table_unique", pd.DataFrame({"pair_id": ["a", "b"], "margin": [0.1, 0.2]}))
        run_dir = tracker.directory
    finally:
        tracker.finish()
    tracker.finish()  # finishing twice is harmless (multirun cleanup paths may call it again)
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    (log_file,) = run_dir.glob("run-*.wandb")
    # The offline record log (protobuf; `wandb sync` uploads it later). wandb-core may still be
    # flushing it right after finish() on a loaded machine: wait for it, bounded.
    deadline = time.monotonic() + 60
    while b"probe_table_unique" not in log_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    raw = log_file.read_bytes()
    for needle in (b"train/loss", b"train/rewards/margins_unique_key", b"final/summary_unique_key",
                   b"unit-sweep", b"dpop", b"probe_table_unique"):
        assert needle in raw, needle
    assert list(run_dir.glob("files/media/table/probe_table_unique*.table.json"))


def test_logger_none_is_a_true_noop(tmp_path):
    # In a fresh interpreter: wandb must never be imported, and no file may appear.
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["WANDB_DIR"] = {str(tmp_path)!r}
        os.environ["WANDB_MODE"] = "offline"
        from omegaconf import OmegaConf
        from pipeline.store.tracking import start_run
        cfg = OmegaConf.create({{"logger": {{"name": "none"}}, "sweep_name": "s", "seed": 0}})
        tracker = start_run(cfg, "train")
        tracker.log({{"train/loss": 1.0}}, step=0); tracker.summary({{"a": 1}}); tracker.finish()
        assert "wandb" not in sys.modules, "wandb was imported"
        print(type(tracker).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == Tracker.__name__
    assert list(tmp_path.iterdir()) == []
