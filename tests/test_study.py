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

# No warm-up: with 2 steps its first (lr 0) would leave one update, taken at the reference, where DPO and
# DPOP have the same gradient, and the DPOP - DPO rows would be exactly 0.
TINY = ["model=tiny", "logger=none", "data.num_problems=100", "train.max_steps=2", "train.warmup_ratio=0",
        "train.probe_every=1", "train.max_length=128", "train.max_prompt_length=64", "hydra.sweeper.params.seed='0,1'"]


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


def holm_by_definition(p: np.ndarray) -> np.ndarray:
    """Holm, written as its definition: max over the p-values at or below p_i of (m - rank) * p_j, capped at 1."""
    present = p[~np.isnan(p)]
    ranked = np.sort(present)
    out = []
    for value in p:
        if np.isnan(value):
            out.append(np.nan)
            continue
        out.append(min(1.0, max((len(ranked) - k) * ranked[k] for k in range(len(ranked)) if ranked[k] <= value)))
    return np.array(out)


def test_study_table_matches_an_independent_computation(study_sweep):
    table = pd.read_csv(study_sweep / "report" / "tables" / "study.csv")
    finals = final_probe_values(study_sweep)
    finals["after_diff_shift"] = finals["chosen_after_diff_mean_logp"] - finals["ref_chosen_after_diff_mean_logp"]
    short = finals["chosen_after_diff_tokens"] < 3  # the default guard: >= 3 chosen tokens after the difference
    finals.loc[short, "after_diff_shift"] = np.nan
    record = json.loads(next(study_sweep.glob("*/run.json")).read_text())
    pairs = pd.read_parquet(Path(record["artifacts"]["pair"]["path"]) / "pairs.parquet").set_index("pair_id")
    finals["prompt"] = finals["pair_id"].map(pairs["prompt"])
    mine = table[table["kind"] == "all"]
    checked = 0
    for (bucket, method), group in finals.groupby(["trained_on", "method"]):
        for quantity in ("after_diff_shift", "chosen_shift", "rejected_shift"):
            seeds = group.groupby("seed")[quantity].mean()  # the run level: one value per training run
            low, high = stats.t.interval(0.95, len(seeds) - 1, loc=seeds.mean(), scale=stats.sem(seeds))
            per_pair = group.groupby("pair_id")[quantity].mean().dropna()
            pair_low, pair_high = stats.t.interval(0.95, len(per_pair) - 1, loc=per_pair.mean(), scale=stats.sem(per_pair))
            per_prompt = per_pair.groupby(finals.drop_duplicates("pair_id").set_index("pair_id")["prompt"]).mean()
            (row,) = mine[(mine.bucket == bucket) & (mine.method == method) & (mine.quantity == quantity)].itertuples()
            assert (row.mean, row.run_low, row.run_high) == pytest.approx((seeds.mean(), low, high), rel=1e-9, abs=1e-12)
            assert row.run_p == pytest.approx(stats.ttest_1samp(seeds, 0).pvalue, rel=1e-9)
            assert (row.pair_low, row.pair_high, row.pairs) == pytest.approx((pair_low, pair_high, len(per_pair)), rel=1e-9)
            assert (row.prompts, row.prompt_low) == pytest.approx(
                (len(per_prompt), stats.t.interval(0.95, len(per_prompt) - 1, loc=per_prompt.mean(),
                                                   scale=stats.sem(per_prompt))[0]), rel=1e-9)
            assert (row.seed_min, row.seed_max, row.seeds, row.data_seed) == pytest.approx(
                (seeds.min(), seeds.max(), 2, 0))
            if quantity == "after_diff_shift":
                assert row.short_excluded == group.drop_duplicates("pair_id")["chosen_after_diff_tokens"].lt(3).sum() \
                    - group.drop_duplicates("pair_id")["chosen_after_diff_mean_logp"].isna().sum()
            checked += 1
        if method == "dpo":  # DPOP minus DPO per seed (same seed = same data order)
            dpop = finals[(finals.trained_on == bucket) & (finals.method == "dpop")].groupby("seed")["after_diff_shift"].mean()
            gap = dpop - group.groupby("seed")["after_diff_shift"].mean()
            (row,) = mine[(mine.bucket == bucket) & (mine.method == "dpop - dpo")].itertuples()
            assert (row.mean, row.run_low) == pytest.approx(
                (gap.mean(), stats.t.interval(0.95, 1, loc=gap.mean(), scale=stats.sem(gap))[0]), rel=1e-9)
    assert checked == 2 * 2 * 3
    assert table["run_p_holm"].to_numpy() == pytest.approx(holm_by_definition(table["run_p"].to_numpy()), nan_ok=True)
    kinds = {kind for kind in table["kind"] if kind != "all"}  # the buckets' pair kinds, each its own rows
    assert kinds and kinds <= set(pairs["kind"])


def test_report_has_the_study_section_figure_and_verdict(study_sweep):
    report = (study_sweep / "report" / "report.md").read_text()
    assert "## S1: Smaug study" in report and "figures/s1_smaug_study.png" in report
    assert (study_sweep / "report" / "figures" / "s1_smaug_study.png").is_file()
    verdicts = [line for line in report.splitlines() if line.startswith("Bucket ")]
    assert {line.split(" ")[1].rstrip(",") for line in verdicts} == {"low", "high"}
    assert all("data draw data.seed=0" in line and "over 2 runs" in line for line in verdicts)
    assert all(line.endswith(("DPOP keeps them).", "Smaug's failure mode is not shown here.")) for line in verdicts)
    (confound,) = [line for line in report.splitlines() if line.startswith("Buckets differ")]
    assert "training pairs" in confound and "epochs (2 steps x 4 pairs)" in confound


def interval_row(method: str, mean: float, half: float, quantity: str = "after_diff_shift", p: float = 0.001) -> dict:
    return {"data_seed": 0, "bucket": "low", "kind": "all", "method": method, "quantity": quantity, "mean": mean,
            "run_low": mean - half, "run_high": mean + half, "run_p_holm": p, "run_mde": 0.2, "pairs": 10, "seeds": 5,
            "short_excluded": 0}


@pytest.mark.parametrize("dpo, dpop, gap, reproduced", [
    ((-0.4, 0.1, "after_diff_shift", 0.2), (0.2, 0.1), (0.6, 0.1), False),  # DPO's drop not significant after Holm
    ((-0.4, 0.1), (0.2, 0.1), (0.6, 0.1), True),    # DPO below 0, DPOP above, DPOP - DPO above 0
    ((-0.4, 0.1), (0.0, 0.05, "after_diff_shift", 0.9), (0.4, 0.1), True),  # DPOP within the margin: non-inferior
    ((-0.4, 0.1), (0.0, 0.3, "after_diff_shift", 0.9), (0.4, 0.1), False),  # DPOP unchanged, but not shown non-inferior
    ((-0.4, 0.5, "after_diff_shift", 0.3), (0.2, 0.1), (0.6, 0.1), False),  # DPO's drop within noise
    ((0.3, 0.1), (0.2, 0.1), (-0.1, 0.05), False),  # DPO raised it
    ((-0.4, 0.1), (-0.3, 0.1), (0.1, 0.05), False),  # DPOP lowered it too
])
def test_verdict_follows_the_run_level_tests(dpo, dpop, gap, reproduced):
    table = pd.DataFrame([interval_row("dpo", *dpo), interval_row("dpop", *dpop), interval_row("dpop - dpo", *gap),
                          interval_row("dpo", -5.0, 1.0, "chosen_shift")])
    (sentence,) = study.verdict(table)
    assert sentence.endswith("is not shown here.") != reproduced, sentence
    assert ("DPO, chosen tokens after the first difference: lowered" in sentence) == \
        (dpo[0] + dpo[1] < 0 and (len(dpo) < 4 or dpo[3] < 0.05))
    assert "data draw data.seed=0" in sentence
    if "no change shown" in sentence:
        assert "smallest effect these runs detect (power 0.8, alpha 0.05) is 0.200" in sentence


def test_interval_is_students_t():
    values = np.array([1.0, 2.0, 4.0])  # mean 7/3, sample variance 7/3
    mean, low, high = study.interval(values)
    p = 0.975  # Student's t with 2 degrees of freedom has a closed-form quantile: (2p - 1) / sqrt(2p(1 - p))
    half = (2 * p - 1) / np.sqrt(2 * p * (1 - p)) * np.sqrt(7 / 3) / np.sqrt(3)
    assert (mean, low, high) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half), rel=1e-12)


def composed_sweep(name: str):
    from hydra import compose, initialize_config_dir
    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "sweeps"), version_base="1.3"):
        return compose(config_name=name, overrides=[f"hydra.searchpath=[file://{root / 'conf'}]"],
                       return_hydra_config=True)


def test_study_has_five_seeds_and_a_confirmatory_draw():
    pilot, confirm = composed_sweep("reproduce_smaug"), composed_sweep("reproduce_smaug_confirm")
    for cfg in (pilot, confirm):  # the run-level intervals need n >= 5 training runs per method and bucket
        assert len(str(cfg.hydra.sweeper.params.seed).split(",")) >= 5
    assert pilot.data.seed == 0 and confirm.data.seed != 0  # the pilot chose the settings on draw 0
    assert (confirm.train.max_steps, confirm.train.lr, confirm.hydra.sweeper.params["pairing.bucket_filter"]) == \
        (pilot.train.max_steps, pilot.train.lr, pilot.hydra.sweeper.params["pairing.bucket_filter"])


def test_the_seed_varies_the_training_order():
    from pipeline.training.training_loop import MicroBatchStream
    streams = {seed: MicroBatchStream(range(40), 4, seed) for seed in (0, 1)}
    orders = {seed: [stream.next() for _ in range(10)] for seed, stream in streams.items()}
    assert sorted(sum(orders[0], [])) == sorted(sum(orders[1], [])) == list(range(40))  # one epoch, every pair
    assert orders[0] != orders[1]


def test_the_study_does_not_pool_a_beta_or_lambda_sweep():
    """sweeps/smaug_fig3.yaml trains DPO at three betas on the low bucket: S1 must not read them as one method's runs."""
    from analysis import study
    jobs = pd.DataFrame({"status": "ok", "bucket_filter": "low", "method": ["dpo", "dpo", "dpop", "dpop"],
                         "beta": [0.3, 0.3, 0.3, 0.3], "lambda_": [None, None, 50.0, 50.0]})
    probes = pd.DataFrame({"method": ["dpo", "dpop"], "bucket_filter": "low", "bucket": "low"})
    assert study.applies({"jobs": jobs, "probes": probes})
    jobs.loc[1, "beta"] = 1.0
    assert not study.applies({"jobs": jobs, "probes": probes})
    jobs.loc[1, "beta"], jobs.loc[3, "lambda_"] = 0.3, 500.0
    assert not study.applies({"jobs": jobs, "probes": probes})
