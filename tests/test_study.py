"""The Smaug study (sweeps/reproduce_smaug.yaml, analysis/study.py): a real multirun on the tiny model, its
numbers recomputed here from the trajectories alone, and the verdict's logic on hand-made intervals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import study

TINY = ["model=tiny", "logger=none", "data.num_problems=100", "train.max_steps=2", "train.probe_every=1",
        "train.max_length=128", "train.max_prompt_length=64", "hydra.sweeper.params.seed='0,1'"]


@pytest.fixture(scope="module")
def study_sweep(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("study")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "sweep=reproduce_smaug", *TINY,
                             f"artifacts_dir={cwd / 'store'}"], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep_dir,) = (cwd / "runs" / "reproduce_smaug").iterdir()
    return sweep_dir


def final_probe_values(sweep_dir: Path) -> pd.DataFrame:
    """Every job's last probe step, read straight from run records and trajectories.jsonl."""
    rows = []
    for record_path in sorted(sweep_dir.glob("*/run.json")):
        record = json.loads(record_path.read_text())
        config = record["config"]
        train = Path(record["artifacts"]["train"]["path"])
        lines = [json.loads(line) for line in (train / "trajectories.jsonl").read_text().splitlines() if line.strip()]
        last = max(line["step"] for line in lines)
        for line in lines:
            if line["step"] == last:
                rows.append({**line, "method": config["method"]["name"], "seed": config["seed"],
                             "trained_on": config["pairing"]["bucket_filter"]})
    return pd.DataFrame(rows)


def test_sweep_runs_every_job_probing_the_trained_bucket(study_sweep):
    summary = pd.read_csv(study_sweep / "summary.csv")
    assert len(summary) == 8 and set(summary.status) == {"ok"}  # 2 methods x 2 buckets x 2 seeds here
    finals = final_probe_values(study_sweep)
    assert (finals["bucket"] == finals["trained_on"]).all()  # probes follow the bucket a job trains on
    record = json.loads(next(study_sweep.glob("*/run.json")).read_text())
    pairs = pd.read_parquet(Path(record["artifacts"]["pair"]["path"]) / "pairs.parquet")
    for (bucket, method, seed), group in finals.groupby(["trained_on", "method", "seed"]):
        expected = pairs[(pairs["split"] == "test") & (pairs["bucket"] == bucket)]["pair_id"]
        assert sorted(group["pair_id"]) == sorted(expected), (bucket, method, seed)  # every held-out pair


def test_study_table_matches_an_independent_computation(study_sweep):
    table = pd.read_csv(study_sweep / "report" / "tables" / "study.csv")
    finals = final_probe_values(study_sweep)
    finals["after_diff_shift"] = finals["chosen_after_diff_mean_logp"] - finals["ref_chosen_after_diff_mean_logp"]
    checked = 0
    for (bucket, method), group in finals.groupby(["trained_on", "method"]):
        for quantity in ("after_diff_shift", "chosen_shift", "rejected_shift"):
            per_pair = group.groupby("pair_id")[quantity].mean().dropna().to_numpy()  # undefined after-diff: left out
            low, high = stats.t.interval(0.95, len(per_pair) - 1, loc=per_pair.mean(), scale=stats.sem(per_pair))
            seeds = group.groupby("seed")[quantity].mean()
            (row,) = table[(table.bucket == bucket) & (table.method == method) & (table.quantity == quantity)].itertuples()
            assert (row.mean, row.ci_low, row.ci_high) == pytest.approx((per_pair.mean(), low, high), rel=1e-9, abs=1e-12)
            assert (row.seed_min, row.seed_max, row.pairs, row.seeds) == pytest.approx(
                (seeds.min(), seeds.max(), len(per_pair), 2))
            checked += 1
        if method == "dpo":
            dpop = finals[(finals.trained_on == bucket) & (finals.method == "dpop")].groupby("pair_id")["after_diff_shift"].mean()
            gap = (dpop - group.groupby("pair_id")["after_diff_shift"].mean()).dropna().to_numpy()
            (row,) = table[(table.bucket == bucket) & (table.method == "dpop - dpo")].itertuples()
            assert row.mean == pytest.approx(gap.mean(), abs=1e-12)
    assert checked == 2 * 2 * 3


def test_report_has_the_study_section_figure_and_verdict(study_sweep):
    report = (study_sweep / "report" / "report.md").read_text()
    assert "## S1: Smaug study" in report and "figures/s1_smaug_study.png" in report
    assert (study_sweep / "report" / "figures" / "s1_smaug_study.png").is_file()
    verdicts = [line for line in report.splitlines() if line.startswith("Bucket ")]
    assert {line.split(" ")[1] for line in verdicts} == {"low", "high"}
    assert all(line.endswith(("DPOP keeps them).", "Smaug's failure mode does not appear here.")) for line in verdicts)


def interval_row(method: str, mean: float, half: float, quantity: str = "after_diff_shift",
                 seeds: tuple[float, float] | None = None) -> dict:
    seed_min, seed_max = seeds if seeds else (mean - half / 2, mean + half / 2)  # by default the seeds agree
    return {"bucket": "low", "method": method, "quantity": quantity, "mean": mean, "ci_low": mean - half,
            "ci_high": mean + half, "pairs": 10, "seeds": 3, "seed_min": seed_min, "seed_max": seed_max}


@pytest.mark.parametrize("dpo, dpop, gap, reproduced", [
    ((-0.4, 0.1, "after_diff_shift", (-1.0, 0.2)), (0.2, 0.1), (0.6, 0.1), False),  # one seed's mean above 0
    ((-0.4, 0.1), (0.2, 0.1), (0.6, 0.1), True),    # DPO below 0, DPOP above, DPOP - DPO above 0
    ((-0.4, 0.1), (0.0, 0.1), (0.4, 0.1), True),    # DPOP unchanged within noise still "keeps" it
    ((-0.4, 0.5), (0.2, 0.1), (0.6, 0.1), False),   # DPO's drop within noise
    ((0.3, 0.1), (0.2, 0.1), (-0.1, 0.05), False),  # DPO raised it
    ((-0.4, 0.1), (-0.3, 0.1), (0.1, 0.05), False),  # DPOP lowered it too
])
def test_verdict_follows_the_intervals(dpo, dpop, gap, reproduced):
    table = pd.DataFrame([interval_row("dpo", *dpo), interval_row("dpop", *dpop), interval_row("dpop - dpo", *gap),
                          interval_row("dpo", -5.0, 1.0, "chosen_shift")])
    (sentence,) = study.verdict(table)
    assert sentence.endswith("does not appear here.") != reproduced, sentence
    seeds_agree = len(dpo) < 4 or dpo[3][1] < 0
    assert ("DPO lowered the chosen tokens" in sentence) == (dpo[0] + dpo[1] < 0 and seeds_agree)


def test_interval_is_students_t():
    values = np.array([1.0, 2.0, 4.0])  # mean 7/3, sample variance 7/3
    mean, low, high = study.interval(values)
    p = 0.975  # Student's t with 2 degrees of freedom has a closed-form quantile: (2p - 1) / sqrt(2p(1 - p))
    half = (2 * p - 1) / np.sqrt(2 * p * (1 - p)) * np.sqrt(7 / 3) / np.sqrt(3)
    assert (mean, low, high) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half), rel=1e-12)
