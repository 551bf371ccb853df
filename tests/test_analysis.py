"""Analysis: artifacts -> tidy table -> figures and report, on small artifact dirs written in the stages' formats.

The fixture writes real artifacts through ``pipeline.store.artifacts.build`` (manifests included) with
hand-chosen numbers, and run records the way the orchestrator writes them; the tests check that
every number of the table and the leaderboard traces back to those numbers and keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis import fig_beta_lambda, fig_edit_distance, fig_logp_shift, leaderboard
from analysis.__main__ import main as analysis_main
from analysis.collect import collect, find_run_records
from analysis.report import FIGURES, generate
from pipeline.store.artifacts import build
from pipeline.errors import UserError

BUCKETS = ("low", "high")
TASKS = {"arith_mc": "acc,none", "arith_gen": "exact_match,none"}
STDERR = {"arith_mc": 0.01, "arith_gen": 0.02}  # lm-eval's standard errors in every fixture evaluation
AVERAGE_SE = "0.0112"  # by hand: sqrt(0.01^2 + 0.02^2) / 2 = 0.01118


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_pair(root: Path):
    def compute(work: Path):
        rows = []
        for i in range(12):
            low = i % 2 == 0
            ned = 0.04 + 0.01 * i if low else 0.7 + 0.02 * i
            rows.append({"pair_id": f"p{i}", "prompt": "q", "chosen": "a", "rejected": "b",
                         "source": "metamath_like" if low else "arc_like", "kind": "corrupt_step" if low else "wrong_answer",
                         "split": "test" if i < 4 else "train", "char_distance": int(ned * 100), "char_ned": ned,
                         "token_distance": int(ned * 30), "token_ned": ned * 0.9, "bucket": "low" if low else "high"})
        pd.DataFrame(rows).to_parquet(work / "pairs.parquet", index=False)
        write_json(work / "stats.json", {"bucket_unit": "char_ned", "bucket_edges": [0.0, 0.2, 1.0],
                                         "bucket_labels": list(BUCKETS)})
        (work / "histogram.png").write_bytes(b"png")
    return build(root, "pair", {"pairing": {"unit": "char_ned", "bucket_edges": [0.0, 0.2, 1.0]}}, {}, compute)


def make_eval(root: Path, tag: str, scores: dict[str, float], shift: float, baseline=None, items=None):
    """Evaluate artifact; ``shift`` sets the policy's log-prob shift on every held-out pair (0 = base);
    ``items``: task -> per-item headline scores, written as lm-eval's logged samples (one per doc_id)."""
    def compute(work: Path):
        (work / "samples").mkdir()
        for task, values in (items or {}).items():
            metric = TASKS[task].split(",")[0]
            write_jsonl(work / "samples" / f"{task}.jsonl", [
                {"doc_id": i, "filter": "none", "metrics": [metric], metric: v, "resps": [["x"]]}
                for i, v in enumerate(values)])
        write_json(work / "scores.json", {
            "tasks": {task: {metric: scores[task], metric.replace(",", "_stderr,"): STDERR[task]}
                      for task, metric in TASKS.items()},
            "average": float(np.mean(list(scores.values()))), "headline": TASKS, "settings": {"suite": "local"},
            "model": "base" if baseline is None else "trained"})
        rows = []
        for i, bucket in enumerate(("low", "high", "low", "high")):
            ref_c, ref_r = -10.0 - i, -12.0 - i
            rows.append({"pair_id": f"p{i}", "bucket": bucket, "kind": "k", "policy_chosen_logp": ref_c + shift,
                         "policy_rejected_logp": ref_r + 2 * shift, "ref_chosen_logp": ref_c, "ref_rejected_logp": ref_r,
                         "rho_chosen": shift + 0.1 * i, "rho_rejected": 2 * shift - 0.1 * i, "margin": -shift,
                         "reward_correct": bool(shift < 0 or i % 2), "chosen_after_diff_mean_logp": -0.4 + shift / 10 - 0.1 * i,
                         "ref_chosen_after_diff_mean_logp": -0.4, "chosen_logit_shift": shift / 2 + 0.05 * i,
                         "chosen_after_diff_tokens": 1 if i == 2 else 10,  # p2: only end-of-turn after the edit
                         "rejected_logit_shift": shift - 0.05 * i})
        pd.DataFrame(rows).to_parquet(work / "preference_pairs.parquet", index=False)
        write_json(work / "preference.json", {"overall": {"reward_accuracy": 0.5, "n": 4},
                                              "by_bucket": {b: {"reward_accuracy": 0.5} for b in BUCKETS}})
        return {"model": "base" if baseline is None else "trained",
                **({"baseline": {"key": baseline.key, "path": str(baseline.path)}} if baseline else {})}
    return build(root, "evaluate", {"tag": tag}, {}, compute)


def make_train(root: Path, tag: str, slope: float):
    def compute(work: Path):
        write_jsonl(work / "metrics.jsonl", [
            {"step": s, "train/loss": 0.69 - 0.1 * s, "train/rewards/margins": 0.1 * s,
             **{f"train/logps_shift/{side}/{b}": slope * s for side in ("chosen", "rejected") for b in BUCKETS}}
            for s in (1, 2)])
        write_jsonl(work / "trajectories.jsonl", [
            {"step": s, "pair_id": f"p{i}", "bucket": BUCKETS[i], "kind": "k", "chosen_shift": slope * s,
             "rejected_shift": (slope - 1) * s, "chosen_logit_shift": slope, "rejected_logit_shift": -1.0}
            for s in (0, 1, 2) for i in range(2)])
        write_json(work / "summary.json", {"steps": 2, "final": {"train/loss": 0.49}})
    return build(root, "train", {"tag": tag}, {}, compute)


def make_sweep(tmp_path: Path, jobs: list[dict], name: str = "sweep", base_items=None) -> tuple[Path, dict]:
    """Sweep dir with ``<n>/run.json`` per job; returns it and the artifacts made, by job number."""
    root, sweep = tmp_path / "artifacts", tmp_path / "runs" / name / "2024-01-01_00-00-00"
    pair = make_pair(root)
    base = make_eval(root, "base", {"arith_mc": 0.5, "arith_gen": 0.25}, 0.0, items=base_items)
    made = {"pair": pair, "base": base}
    for n, job in enumerate(jobs):
        tag = f"{job['method']}-{job.get('beta')}-{job.get('lambda_')}-{job.get('seed', 0)}"
        artifacts = {"pair": pair}
        if job.get("status", "ok") == "ok":
            artifacts["train"] = make_train(root, tag, job["slope"])
            artifacts["evaluate"] = make_eval(root, tag, job["scores"], job["slope"], baseline=base,
                                              items=job.get("items"))
        made[n] = artifacts
        config = {"method": {"name": job["method"], "loss": job["method"], "beta": job.get("beta", 0.3),
                             "lambda_": job.get("lambda_"), **job.get("method_extra", {})},
                  "pairing": {"bucket_filter": None}, "seed": job.get("seed", 0), "sweep_name": name}
        record = {"sweep_name": name, "method": job["method"], "config": config, "status": job.get("status", "ok"),
                  "artifacts": {s: {"key": a.key, "path": str(a.path), "cached": False} for s, a in artifacts.items()}}
        if job.get("status") == "failed":
            record["error"] = "RuntimeError: boom"
        (sweep / str(n)).mkdir(parents=True)
        write_json(sweep / str(n) / "run.json", record)
    return sweep, made


TWO_METHODS = [
    {"method": "dpo", "slope": -0.5, "scores": {"arith_mc": 0.25, "arith_gen": 0.125}},
    {"method": "dpop", "lambda_": 50, "slope": 0.25, "scores": {"arith_mc": 0.75, "arith_gen": 0.5}},
    {"method": "dpo", "status": "failed"},
]


@pytest.fixture
def sweep(tmp_path):
    return make_sweep(tmp_path, TWO_METHODS)


def test_tidy_table_traces_numbers_to_artifact_keys(sweep):
    sweep_dir, made = sweep
    tables = collect(sweep_dir)
    results = tables["results"]

    def value(job, metric):
        row = results[(results["job"] == job) & (results["metric"] == metric)]
        assert len(row) == 1, (job, metric)
        return row.iloc[0]

    avg = value("0", "eval/average")
    assert avg["value"] == pytest.approx(0.1875) and avg["artifact_key"] == made[0]["evaluate"].key
    assert avg["method"] == "dpo" and avg["status"] == "ok" and avg["stage"] == "evaluate"
    assert value("1", "eval/arith_mc/acc,none")["value"] == 0.75
    assert value("1", "eval/average")["lambda_"] == 50.0
    assert value("1", "train/loss" if False else "final/train/loss")["artifact_key"] == made[1]["train"].key
    assert value("0", "probes/final/chosen_shift")["value"] == pytest.approx(-1.0)  # slope -0.5 x step 2
    assert value("0", "pairs/low/rho_chosen_mean")["value"] == pytest.approx(-0.5 + 0.1)  # pairs 0 and 2
    # the baseline appears once, as method "reference", with the base artifact's key
    reference = results[results["method"] == "reference"]
    assert set(reference["job"]) == {"reference"}
    assert value("reference", "eval/average")["value"] == pytest.approx(0.375)
    assert set(reference["artifact_key"]) == {made["base"].key}
    # the failed job: one row, status failed, no metric
    failed = results[results["job"] == "2"]
    assert len(failed) == 1 and failed.iloc[0]["status"] == "failed" and pd.isna(failed.iloc[0]["metric"])
    # per-step, probe and pair tables carry their artifact keys
    assert set(tables["steps"]["artifact_key"]) == {made[0]["train"].key, made[1]["train"].key}
    assert len(tables["probes"]) == 2 * 3 * 2
    assert set(tables["pairs"].loc[tables["pairs"]["job"] == "reference", "artifact_key"]) == {made["base"].key}
    assert json.loads(tables["pairings"].iloc[0]["bucket_edges"]) == [0.0, 0.2, 1.0]
    assert list(tables["jobs"].sort_values("label_rank")["label"].unique()) == ["reference", "dpo", "dpop"]


def test_python_m_analysis_writes_every_figure_table_and_report(sweep, capsys):
    sweep_dir, made = sweep
    assert analysis_main([str(sweep_dir)]) == 0
    report = Path(capsys.readouterr().out.strip())
    out = sweep_dir / "report"
    assert report == out / "report.md"
    figures = out / "figures"
    for stem in ("f1_edit_distance", "f2_logp_shift", "f3_after_diff_logp", "f4_loglik_shift", "f5_logit_shift",
                 "f6_leaderboard"):
        for suffix in (".png", ".pdf"):
            assert (figures / f"{stem}{suffix}").stat().st_size > 1000, stem + suffix
    assert not list(figures.glob("f7_*"))  # beta and lambda do not vary
    tables = collect(sweep_dir)
    assert_plotted_values_match_the_tidy_table(tables)
    assert_f1_histograms_match_the_pair_table(tables)
    assert_violins_match_the_pair_table(tables, "f4_loglik_shift", "rho_chosen", "rho_rejected")
    assert_violins_match_the_pair_table(tables, "f5_logit_shift", "chosen_logit_shift", "rejected_logit_shift")
    assert_leaderboard_bars_match_the_results(tables)
    table = (figures / "f6_leaderboard.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert list(lines) == ["reference", "dpo", "dpop"]
    assert lines["reference"].rstrip(" |").endswith(f"0.3750 (se {AVERAGE_SE})") and "0.1875" in lines["dpo"] and "0.6250" in lines["dpop"]
    assert "arith_mc" in table and "\\pm" not in table
    assert "\\toprule" in (figures / "f6_leaderboard.tex").read_text()
    results = pd.read_csv(out / "tables" / "results.csv")
    assert set(results["job"].astype(str)) == {"0", "1", "2", "reference"}
    assert (out / "tables" / "results.parquet").is_file()
    text = report.read_text()
    assert "figures/f2_logp_shift.png" in text and "0.1875" in text and "failed" in text
    for stage in ("pair", "train", "evaluate"):  # links to every manifest used, relative and resolvable
        assert (out / f"../../../../artifacts/{stage}/{made[0][stage].key}/manifest.json").resolve().is_file()
        assert f"{stage}/{made[0][stage].key}/manifest.json" in text
    html = (out / "report.html").read_text()
    assert '<img src="figures/f1_edit_distance.png"' in html and "<table>" in html


def test_f7_and_mean_std_only_when_beta_varies(tmp_path):
    jobs = [{"method": "dpo", "beta": beta, "seed": seed, "slope": -beta,
             "scores": {"arith_mc": beta + 0.1 * seed, "arith_gen": beta}}
            for beta in (0.1, 1.0) for seed in (0, 1)]
    sweep_dir, _ = make_sweep(tmp_path, jobs)
    tables = collect(sweep_dir)
    assert fig_beta_lambda.varied(tables) == [("dpo", "beta")]
    paths = fig_beta_lambda.make(tables, tmp_path / "fig")
    assert sorted(p.name for p in paths) == ["f7_beta_lambda.pdf", "f7_beta_lambda.png"]
    from analysis.plotting import DRAWN
    titles = {"eval average": "eval/average", "held-out reward accuracy": "pairs/reward_accuracy",
              "held-out mean rho(chosen)": "pairs/rho_chosen_mean", "final chosen log-prob shift": "probes/final/chosen_shift"}
    results = tables["results"]
    for ax in DRAWN["f7_beta_lambda"].axes:  # each point: the mean over seeds of the metric at that beta
        rows = results[(results["method"] == "dpo") & (results["metric"] == titles[ax.get_title()])]
        expected = rows.groupby("beta")["value"].mean()
        (line,) = [c.lines[0] for c in ax.containers if c.get_label() == "dpo"]  # errorbar's data line
        assert list(line.get_xdata()) == [0.1, 1.0] == list(expected.index)
        assert list(line.get_ydata()) == pytest.approx(list(expected.values)), ax.get_title()
    eval_axes = [ax for ax in DRAWN["f7_beta_lambda"].axes if ax.get_title() == "eval average"]
    (line,) = [c.lines[0] for c in eval_axes[0].containers if c.get_label() == "dpo"]
    assert list(line.get_ydata()) == pytest.approx([0.125, 1.025])  # by hand: beta + 0.05 * mean seed
    table = dict(leaderboard.report_tables(tables))["leaderboard"]
    rows = {r[0]: r for r in table[1]}
    # two seeds per beta: average = beta + 0.05*seed -> mean beta + 0.025, std 0.0354
    assert rows["dpo (beta=0.1)"][-1] == "0.1250 ± 0.0354"
    assert rows["dpo (beta=1)"][-1] == "1.0250 ± 0.0354"
    assert rows["reference"][-1] == f"0.3750 (se {AVERAGE_SE})"


def error_bar_halves(container) -> list[float]:
    """Half-lengths of an errorbar container's bars (NaN-free ones), from the drawn segments."""
    return [abs(seg[1][1] - seg[0][1]) / 2 for seg in container.lines[2][0].get_segments()] if container.lines[2] else []


def test_figures_show_lm_eval_stderr_for_single_jobs(tmp_path):
    """F6's bars and F7's eval-average points of one job carry lm-eval's standard error (several seeds:
    their std, tested above)."""
    jobs = [{"method": "dpo", "beta": beta, "slope": -beta, "scores": {"arith_mc": beta, "arith_gen": beta}}
            for beta in (0.1, 1.0)]
    sweep_dir, _ = make_sweep(tmp_path, jobs)
    tables = collect(sweep_dir)
    from analysis.plotting import DRAWN
    fig_beta_lambda.make(tables, tmp_path / "fig")
    (eval_ax,) = [ax for ax in DRAWN["f7_beta_lambda"].axes if ax.get_title() == "eval average"]
    (points,) = [c for c in eval_ax.containers if c.get_label() == "dpo"]
    assert error_bar_halves(points) == pytest.approx([float(AVERAGE_SE)] * 2, abs=1e-4)
    leaderboard.make(tables, tmp_path / "fig")
    bars = [c for c in DRAWN["f6_leaderboard"].axes[0].containers if getattr(c, "errorbar", None) is not None]
    assert len(bars) == 3  # reference, dpo (beta=0.1), dpo (beta=1)
    for container in bars:  # arith_mc, arith_gen, average
        assert error_bar_halves(container.errorbar) == pytest.approx([0.01, 0.02, float(AVERAGE_SE)], abs=1e-4)


def test_leaderboard_states_every_method_setting(tmp_path):
    """Each row names the loss and all of the method's hyper-parameters from the run records, also those
    that every job shares (not only what the label shows); capability flags and unset values are left out."""
    jobs = [{"method": "dpop", "lambda_": 50, "seed": seed, "slope": 0.1, "scores": {"arith_mc": 0.5, "arith_gen": 0.5}}
            for seed in (0, 1)]
    jobs.append({"method": "bnf", "beta": None, "slope": 0.2, "scores": {"arith_mc": 0.25, "arith_gen": 0.75},
                 "method_extra": {"normalisation": "batch_min", "guards": True, "needs_vocab_term": True}})
    sweep_dir, _ = make_sweep(tmp_path, jobs)
    paths = leaderboard.make(collect(sweep_dir), tmp_path / "fig")
    lines = (tmp_path / "fig" / "f6_leaderboard.md").read_text().splitlines()
    assert lines[0] == "| method | loss | settings | arith_mc | arith_gen | average |"
    assert lines[1] == "|---|---|---|---:|---:|---:|"
    # one job: lm-eval's stderr beside the score; two seeds: their std instead
    assert lines[2:] == ["| reference | – | base model, untrained | 0.5000 (se 0.0100) | 0.2500 (se 0.0200) | "
                         f"0.3750 (se {AVERAGE_SE}) |",
                         "| dpop | dpop | beta=0.3, lambda_=50 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 |",
                         "| bnf | bnf | guards=True, normalisation=batch_min | 0.2500 (se 0.0100) | 0.7500 (se 0.0200) | "
                         f"0.5000 (se {AVERAGE_SE}) |"]
    tex = next(p for p in paths if p.suffix == ".tex").read_text()
    assert r"\begin{tabular}{lllrrr}" in tex and r"bnf & bnf & guards=True, normalisation=batch\_min & 0.2500" in tex


def test_missing_inputs_skip_cleanly(tmp_path):
    root = tmp_path / "artifacts"
    pair = make_pair(root)
    run_dir = tmp_path / "runs" / "adhoc" / "t"
    run_dir.mkdir(parents=True)
    write_json(run_dir / "run.json", {"sweep_name": "adhoc", "method": "dpo", "status": "ok",
                                      "config": {"method": {"name": "dpo", "beta": 0.1}, "seed": 0},
                                      "artifacts": {"pair": {"key": pair.key, "path": str(pair.path)}}})
    assert [job for job, _ in find_run_records(run_dir)] == ["t"]
    tables = collect(run_dir)
    for key, module, _, _ in FIGURES:
        paths = module.make(tables, tmp_path / "fig")
        assert (len(paths) == 2) if key == "F1" else paths == [], key
    assert fig_logp_shift.make({"jobs": tables["jobs"]}, tmp_path / "fig") == []
    assert fig_edit_distance.make({"jobs": tables["jobs"]}, tmp_path / "fig") == []
    report = generate(run_dir, tmp_path / "out")
    assert "F1" in report.read_text() and "Leaderboard" not in report.read_text()


def test_bad_dir_is_one_line_user_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="no run.json found"):
        collect(tmp_path / "empty")
    assert analysis_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "empty") in err
    with pytest.raises(UserError, match="not a directory"):
        collect(tmp_path / "missing")


def test_analyse_stage_is_cached_on_rerun(tmp_path):
    from pipeline.stages import analyse

    sweep_dir, made = make_sweep(tmp_path, TWO_METHODS[1:2])
    cfg = OmegaConf.create({"method": {"name": "dpop", "beta": 0.3, "lambda_": 50}, "pairing": {"bucket_filter": None},
                            "seed": 0, "sweep_name": "x"})
    upstream = {"pair": made["pair"], "train": made[0]["train"], "evaluate": made[0]["evaluate"]}
    first = analyse.run(cfg, upstream, tmp_path / "artifacts")
    assert not first.cached and (first.path / "report.md").is_file()
    assert (first.path / "figures" / "f2_logp_shift.pdf").is_file()
    results = pd.read_parquet(first.path / "tables" / "results.parquet")
    assert set(results["artifact_key"].dropna()) == {made[0]["train"].key, made[0]["evaluate"].key, made["base"].key}
    links = [line for line in (first.path / "report.md").read_text().splitlines() if "manifest.json" in line]
    assert links and all((first.path / line.split("](")[1].rstrip(")")).resolve().is_file() for line in links)
    again = analyse.run(OmegaConf.merge(cfg, {"sweep_name": "y"}), upstream, tmp_path / "artifacts")
    assert again.cached and again.key == first.key


def test_labels_pool_jobs_that_differ_only_by_seeds():
    from analysis.collect import _labels
    configs = [{"method": {"name": "dpo", "beta": beta}, "seed": seed, "data": {"seed": seed}}
               for beta, seed in [(0.1, 0), (0.1, 1), (0.3, 0)]]
    labels = _labels([{"method": "dpo"}] * 3, configs)
    assert labels == ["dpo (beta=0.1)", "dpo (beta=0.1)", "dpo (beta=0.3)"]


def assert_plotted_values_match_the_tidy_table(tables):
    """F3's bars and F2's lines, read back from the drawn figures, against means computed here from the
    tidy tables (not through the figure modules' own helpers)."""
    from analysis.plotting import DRAWN
    pairs = tables["pairs"].assign(bucket=lambda d: d["bucket"].astype(str))
    f3 = DRAWN["f3_after_diff_logp"].axes[0]
    heights = {(container.get_label(), round(patch.get_x() + patch.get_width() / 2)): patch.get_height()
               for container in f3.containers if hasattr(container, "patches") for patch in container.patches}
    buckets = sorted(pairs["bucket"].unique(), key=lambda b: ["low", "high"].index(b) if b in ("low", "high") else 9)
    for label in pairs.loc[pairs["method"] != "reference", "label"].unique():
        for x, bucket in enumerate(buckets):
            kept = pairs[(pairs["label"] == label) & (pairs["bucket"] == bucket) & (pairs["chosen_after_diff_tokens"] >= 3)]
            mine = kept["chosen_after_diff_mean_logp"].mean()  # the default guard: >= 3 tokens after the difference
            assert heights[(label, x)] == pytest.approx(mine), (label, bucket)
    f2 = DRAWN["f2_logp_shift"]
    traj = tables["probes"]
    checked = 0
    for ax in f2.axes:
        bucket = ax.get_title().removeprefix("bucket ")
        for line in ax.get_lines():
            if " " not in str(line.get_label()):
                continue
            label, side = str(line.get_label()).rsplit(" ", 1)
            rows = traj[(traj["label"] == label) & (traj["bucket"].astype(str) == bucket)]
            expected = rows.groupby(["job", "step"])[f"{side}_shift"].mean().groupby("step").mean()
            assert list(line.get_xdata()) == list(expected.index)
            assert list(line.get_ydata()) == pytest.approx(list(expected.values))
            checked += 1
    assert checked >= 4 and heights


def assert_f1_histograms_match_the_pair_table(tables):
    """F1: each panel's bar heights are the pair table's counts in 40 equal bins of [0, 1], per bucket;
    the dashed lines are the recorded bucket edges, on the bucketing unit's panels only."""
    from analysis.plotting import DRAWN
    data = tables["pair_data"]
    edges = json.loads(tables["pairings"].iloc[0]["bucket_edges"])
    bins = np.linspace(0, 1, 41)
    panels = 0
    for ax in DRAWN["f1_edit_distance"].axes:
        source = ax.get_title().split(" (n=")[0]
        column = ax.get_xlabel().split(" ")[0]
        subset = data[data["source"] == source]
        assert len(subset) > 0, source
        stacked = np.zeros(40)
        for container, bucket in zip(ax.containers, sorted(subset["bucket"].unique(), key=["low", "high"].index)):
            heights = np.array([patch.get_height() for patch in container.patches])
            counts, _ = np.histogram(subset.loc[subset["bucket"] == bucket, column], bins=bins)
            assert heights.tolist() == counts.tolist(), (source, column, bucket)
            assert [patch.get_y() for patch in container.patches] == stacked.tolist()  # stacked on earlier buckets
            stacked += counts
        assert stacked.sum() == len(subset)
        drawn_edges = [line.get_xdata()[0] for line in ax.get_lines()]
        assert drawn_edges == (edges if column == "char_ned" else []), (source, column)
        panels += 1
    assert panels == 2 * 2  # two sources x (char, token)


def assert_violins_match_the_pair_table(tables, name, chosen, rejected):
    """F4/F5: each violin spans its values' min..max with its mean marked, at label i -0.2 (chosen)
    / +0.2 (rejected); values from the tidy pairs table, reference excluded."""
    from analysis.plotting import DRAWN
    ax = DRAWN[name].axes[0]
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    pairs = tables["pairs"]
    assert set(labels) == set(pairs.loc[pairs["method"] != "reference", "label"])
    bodies = [c for c in ax.collections if "Poly" in type(c).__name__]
    means = [c for c in ax.collections if type(c).__name__ == "LineCollection"]
    assert len(bodies) == len(means) == 2 * len(labels)
    for body, mean in zip(bodies, means):
        vertices = body.get_paths()[0].vertices
        (x0, y), (x1, _) = mean.get_segments()[0]
        position = (x0 + x1) / 2
        i = round(position)
        side = chosen if position < i else rejected
        values = pairs.loc[pairs["label"] == labels[i], side].astype(float)
        assert y == pytest.approx(values.mean()), (name, labels[i], side)
        assert vertices[:, 1].min() == pytest.approx(values.min()) and vertices[:, 1].max() == pytest.approx(values.max())


def assert_leaderboard_bars_match_the_results(tables):
    """F6's bars: one per label and column, height = the label's headline metric (or average) in results."""
    from analysis.plotting import DRAWN
    ax = DRAWN["f6_leaderboard"].axes[0]
    columns = [tick.get_text() for tick in ax.get_xticklabels()]
    assert columns == list(TASKS) + ["average"]
    results = tables["results"]
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    assert [c.get_label() for c in bars] == ["reference", "dpo", "dpop"]
    for container in bars:
        for column, patch in zip(columns, container.patches):
            metric = "eval/average" if column == "average" else f"eval/{column}/{TASKS[column]}"
            rows = results[(results["label"] == container.get_label()) & (results["metric"] == metric)]
            assert len(rows) == 1 and patch.get_height() == pytest.approx(rows["value"].iloc[0]), (container, column)
        # error bars: one job per label here, so lm-eval's stderr (the average's: root sum of squares / n)
        (segments,) = [c.get_segments() for c in container.errorbar.lines[2]]
        expected = [STDERR[c] if c in STDERR else float(np.sqrt(sum(v * v for v in STDERR.values())) / len(STDERR))
                    for c in columns]
        assert [(seg[1][1] - seg[0][1]) / 2 for seg in segments] == pytest.approx(expected), container.get_label()


def test_paired_difference_to_the_base_model_by_hand(tmp_path):
    """Per-item differences against the base model's items; numbers derived by hand in the comments."""
    from analysis import paired
    base = [1, 1, 1, 1, 0, 0, 0, 0]  # acc 0.5
    jobs = [
        {"method": "dpo", "slope": -0.5, "scores": {"arith_mc": 0.25, "arith_gen": 0.1},
         "items": {"arith_mc": [0, 0, 1, 1, 0, 0, 0, 0]}},
        {"method": "dpop", "lambda_": 50, "slope": 0.25, "seed": 0, "scores": {"arith_mc": 0.75, "arith_gen": 0.1},
         "items": {"arith_mc": [1, 1, 1, 0, 1, 1, 1, 0]}},
        {"method": "dpop", "lambda_": 50, "slope": 0.25, "seed": 1, "scores": {"arith_mc": 0.75, "arith_gen": 0.1},
         "items": {"arith_mc": [1, 1, 1, 0, 1, 0, 0, 1]}},
    ]
    sweep_dir, made = make_sweep(tmp_path, jobs, base_items={"arith_mc": base, "arith_gen": [1, 0, 0, 0]})
    table = paired.paired_table(collect(sweep_dir)).set_index("label")
    assert list(table.index) == ["dpo", "dpop"] and set(table["task"]) == {"arith_mc"}  # no trained arith_gen items
    # DPOP: seeds averaged per item -> [1,1,1,0,1,.5,.5,.5]; d = [0,0,0,-1,1,.5,.5,.5], mean 0.1875,
    # squared deviations 2.46875, se sqrt(2.46875 / 7 / 8) = 0.209964; 4 up, 1 down: sign test 2 * 6/32 = 0.375
    dpop = table.loc["dpop"]
    assert (dpop["items"], dpop["seeds"], dpop["up"], dpop["down"]) == (8, 2, 4, 1)
    assert (dpop["base"], dpop["score"], dpop["difference"]) == pytest.approx((0.5, 0.6875, 0.1875))
    assert dpop["se"] == pytest.approx(0.209964, abs=1e-6)
    assert dpop["item_p"] == pytest.approx(0.375) and np.isnan(dpop["exact_low"])  # averaged scores: no 0/1 interval
    # run level: seed 0 differs by 2/8 = 0.25, seed 1 by 1/8 = 0.125; mean 0.1875, se 0.125 / 2 = 0.0625,
    # t(0.975, 1) = 12.706205; t = 3 with 1 df (Cauchy): p = 1 - 2 atan(3) / pi = 0.204833
    assert (dpop["run_low"], dpop["run_high"]) == pytest.approx((0.1875 - 0.794138, 0.1875 + 0.794138), abs=1e-5)
    assert dpop["run_p"] == pytest.approx(1 - 2 * np.arctan(3) / np.pi, rel=1e-9)
    assert dpop["base_key"] == made["base"].key
    assert dpop["artifact_keys"] == " ".join(sorted([made[1]["evaluate"].key, made[2]["evaluate"].key]))
    # DPO (one run, 0/1 scores): d = [-1,-1,0,0,0,0,0,0], 0 up 2 down: exact McNemar 2 * 0.25 = 0.5;
    # Clopper-Pearson for 0 of 2: [0, 1 - 0.025 ** 0.5], mapped by (2 theta - 1) * 2 / 8
    dpo = table.loc["dpo"]
    assert (dpo["up"], dpo["down"], dpo["difference"]) == (0, 2, pytest.approx(-0.25))
    assert dpo["item_p"] == pytest.approx(0.5)
    assert (dpo["exact_low"], dpo["exact_high"]) == pytest.approx((-0.25, (1 - 2 * 0.025 ** 0.5) * 0.25), rel=1e-9)
    assert np.isnan(dpo["run_low"]) and np.isnan(dpo["run_p"])  # one run: no run-level interval
    # Holm over the table's two item tests: 2 * 0.375 = 0.75, then max(0.75, 1 * 0.5) = 0.75
    assert list(table["item_p_holm"]) == pytest.approx([0.75, 0.75])
    report = generate(sweep_dir).read_text()
    assert "Difference to the base model, item by item" in report
    assert "| dpop | arith_mc (acc) | 8 | 0.500 | 0.688 | +0.188 | 4 / 1 | 0.375 (0.75) | [-0.607, +0.982] (0.205) |" in report
    assert "dpo on arith_mc (-0.250, 0 items up / 2 down): one run, so no verdict about the method" in report
    assert "dpop on arith_mc (+0.188, 4 items up / 1 down): no change shown, non-inferiority at -0.03 not shown" in report
    written = pd.read_csv(sweep_dir / "report" / "tables" / f"{paired.NAME}.csv")
    assert list(written["label"]) == ["dpo", "dpop"]
