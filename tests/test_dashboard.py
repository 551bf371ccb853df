"""The W&B workspace built offline from a real tiny sweep names only metrics its runs really logged."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.orchestration import dashboard
from pipeline.orchestration.orchestrate import Run

TINY = ("model=tiny", "logger=wandb", "data.num_problems=40", "data.num_eval_items=16", "train.max_steps=2",
        "train.probe_every=1", "eval.limit=4", "train.max_length=128", "train.max_prompt_length=64",
        "stages=[pair,reference,train,evaluate]", "sweep_name=dash")


def logged_bytes(wandb_dir: Path, needles: set[str]) -> bytes:
    """The offline runs' record logs (wandb-core may still be flushing right after finish: wait, bounded)."""
    deadline = time.monotonic() + 60
    while True:
        raw = b"".join(p.read_bytes() for p in wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
        if all(n.encode() in raw for n in needles) or time.monotonic() > deadline:
            return raw
        time.sleep(0.5)


def test_every_panel_names_a_logged_metric(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    for method in ("dpo", "bnf"):
        record = Run(make_config(*TINY, f"method={method}"), tmp_path / "runs" / method).execute()
        assert record["status"] == "ok"
    facts = dashboard.sweep_facts(tmp_path / "runs")
    assert facts["buckets"] == ["high", "low"] and facts["sweep_name"] == "dash" and facts["headlines"]
    panels = dashboard.panel_metrics(facts)
    names = {name for section in panels.values() for panel in section for name in panel}
    raw = logged_bytes(tmp_path / "wb", names)
    missing = sorted(name for name in names if name.encode() not in raw)
    assert not missing, f"panels name metrics no run logged: {missing}"
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert Run(make_config(*TINY, "method=dpo"), tmp_path / "rerun").execute()["status"] == "ok"  # all cached
    assert sorted((tmp_path / "wb" / "wandb").glob("offline-run-*")) == runs  # no duplicate W&B runs
    assert dashboard.main([str(tmp_path / "runs")]) == 0  # offline: the definition is written, not published
    spec = json.loads((tmp_path / "runs" / "report" / "dashboard.json").read_text())
    text = json.dumps(spec)
    assert "train/logps_shift/chosen/low" in text and "eval/average" in text and spec["project"] == "prefopt"
