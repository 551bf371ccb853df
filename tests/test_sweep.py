"""Real Hydra multiruns of `python -m pipeline` on the tiny model, through every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


TINY = ["model=tiny", "train.max_steps=3", "train.probe_every=3", "eval.limit=4", "data.num_problems=60",
        "data.num_eval_items=16", "logger=none"]


def run_pipeline(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def sweep_dirs(cwd: Path, sweep_name: str) -> list[Path]:
    return sorted((cwd / "runs" / sweep_name).iterdir())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def first_sweep(workdir):
    args = ["--multirun", "method=dpo,bnf", "sweep_name=two", *TINY]
    result = run_pipeline(args, workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return args, result


def test_two_job_multirun_runs_every_stage_and_writes_figures(workdir, first_sweep):
    _, result = first_sweep
    for stage in ("model", "pair", "reference", "train", "evaluate", "analyse"):
        assert f"[{stage}] artifact" in result.stdout
    (sweep_dir,) = sweep_dirs(workdir, "two")
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary.status) == ["ok", "ok"]
    assert sorted(summary.method) == ["bnf", "dpo"]
    # one pairing and one reference artifact shared by both methods
    assert summary.pair_key.nunique() == 1 and summary.reference_key.nunique() == 1
    assert summary.train_key.nunique() == 2
    assert (summary.eval_average_se > 0).all()  # lm-eval's stderr of each job's average, beside it
    figures = list((sweep_dir / "report" / "figures").glob("*.png"))
    assert figures, "the sweep report has no figures"
    assert (sweep_dir / "report" / "report.md").is_file()


def test_rerun_recomputes_nothing(workdir, first_sweep):
    args, _ = first_sweep
    result = run_pipeline(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " artifact " in line and line.startswith("[")]
    assert lines and all(line.endswith("(cached)") for line in lines), "\n".join(lines)
    reference_manifests = list((workdir / "artifacts" / "reference").glob("*/manifest.json"))
    assert len(reference_manifests) == 1, "the reference model ran more than once for the sweep"


def test_failing_job_does_not_stop_the_others(workdir, first_sweep):
    result = run_pipeline(["--multirun", "method=dpo", "method.beta=0.1,-1.0", "sweep_name=failing", *TINY], workdir)
    assert result.returncode != 0
    (sweep_dir,) = sweep_dirs(workdir, "failing")
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert sorted(summary.status) == ["failed", "ok"]
    assert "method.beta" in result.stderr  # the failing job is named with its reason
    failed = json.loads((sweep_dir / summary[summary.status == "failed"].job.astype(str).iloc[0] / "run.json").read_text())
    assert "method.beta" in failed["error"]


def test_submitit_local_launcher_runs_a_job(workdir):
    result = run_pipeline(["--multirun", "hydra/launcher=submitit_local_cpu", "stages=[pair]", "seed=0,1",
                           "sweep_name=submitit", *TINY], workdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (sweep_dir,) = sweep_dirs(workdir, "submitit")
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary.status) == ["ok", "ok"]
    assert summary.pair_key.nunique() == 2  # the seed is part of the pairing key


def test_report_renders_in_a_real_browser(workdir, first_sweep):
    """report.html in headless Chromium: every figure loads, the tables are there, a screenshot is kept."""
    from analysis.browser import check_report, find_browser
    if find_browser() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    sweep_dir = sweep_dirs(workdir, "two")[0]  # the first sweep (the rerun test adds a second)
    report = sweep_dir / "report" / "report.html"
    figures = sorted(p.name for p in (sweep_dir / "report" / "figures").glob("*.png"))
    seen = check_report(report)
    assert sorted(Path(src).name for src in seen["images"]) == figures and all(seen["images"].values())
    assert seen["tables"] >= 3
    assert seen["screenshot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and seen["screenshot"].parent == report.parent
    moved = sweep_dir / "report" / "figures" / figures[0]
    moved.rename(moved.with_suffix(".bak"))  # a figure the page names but cannot load
    try:
        assert check_report(report)["images"][f"figures/{figures[0]}"] is False
    finally:
        moved.with_suffix(".bak").rename(moved)


def test_store_and_runs_copied_elsewhere_regenerate_the_same_report(workdir, first_sweep, tmp_path):
    """Relocatable: run records find their artifacts relative to themselves when the store and the runs move
    together, and through --store when the store moves alone; the originals are hidden meanwhile."""
    import shutil

    from analysis.__main__ import main as analysis_main
    sweep_dir = sweep_dirs(workdir, "two")[0]
    moved = tmp_path / "elsewhere"
    shutil.copytree(workdir / "runs", moved / "runs")
    shutil.copytree(workdir / "artifacts", moved / "artifacts")
    apart = tmp_path / "store-alone"
    shutil.copytree(workdir / "artifacts", apart)
    original = pd.read_csv(sweep_dir / "report" / "tables" / "results.csv")
    columns = ["job", "metric", "value", "artifact_key"]
    hidden = workdir / "artifacts.hidden"
    (workdir / "artifacts").rename(hidden)  # the absolute paths in the records now lead nowhere
    try:
        copied_sweep = moved / "runs" / "two" / sweep_dir.name
        assert analysis_main([str(copied_sweep), "--out", str(tmp_path / "together")]) == 0
        together = pd.read_csv(tmp_path / "together" / "tables" / "results.csv")
        assert together[columns].equals(original[columns])
        assert set(together["artifact_path"].dropna().map(lambda p: Path(p).is_relative_to(moved))) == {True}
        shutil.rmtree(moved / "artifacts")  # now the runs alone, the store elsewhere
        assert analysis_main([str(copied_sweep), "--out", str(tmp_path / "apart"), "--store", str(apart)]) == 0
        assert pd.read_csv(tmp_path / "apart" / "tables" / "results.csv")[columns].equals(original[columns])
        assert analysis_main([str(copied_sweep), "--store", str(tmp_path / "nowhere")]) == 2
    finally:
        hidden.rename(workdir / "artifacts")


def test_summary_average_stderr_by_hand():
    from pipeline.orchestration.sweep import average_stderr
    scores = {"headline": {"mc": "acc", "gen": "exact_match_strict-match"},
              "tasks": {"mc": {"acc": 0.5, "acc_stderr": 0.03, "acc_norm": 0.4, "acc_norm_stderr": 0.9},
                        "gen": {"exact_match_strict-match": 0.2, "exact_match_stderr_strict-match": 0.04}}}
    assert average_stderr(scores) == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2
    del scores["tasks"]["gen"]["exact_match_stderr_strict-match"]
    assert average_stderr(scores) is None and average_stderr({}) is None
