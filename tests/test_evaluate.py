"""Evaluation stage through the real lm-eval harness on the tiny model (and SmolLM2, slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.evaluation import eval_suite
from pipeline.stages import evaluate
from pipeline.store.artifacts import Artifact
from pipeline.errors import UserError
from pipeline.orchestration.orchestrate import Run
from pipeline.modeling.precision import resolve_precision
from tests.conftest import compose_config

# Small everything: ~28 pairs, 14 held-out items (8 few-shot + 6 test), 2 training steps, 3 items per task.
FAST = (
    "model=tiny", "logger=none", "data.num_problems=16", "data.num_eval_items=14", "pairing.test_fraction=0.2",
    "train.max_steps=2", "train.batch_size=2", "train.max_length=128", "train.max_prompt_length=64",
    "train.probe_pairs=2", "train.checkpoint_every=0", "train.progress=false",
    "eval.limit=3", "eval.max_gen_toks=16",
)


def run_pipeline(root: Path, run_dir: Path, *overrides: str) -> dict:
    cfg = compose_config(f"artifacts_dir={root}", *FAST, *overrides)
    return Run(cfg, run_dir).execute()


def artifact_of(record: dict, stage: str) -> Path:
    return Path(record["artifacts"][stage]["path"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """pair -> reference -> train -> evaluate on the tiny model; the store is shared by this module's tests."""
    root = tmp_path_factory.mktemp("eval-store")
    record = run_pipeline(root, root.parent / "run-dpop", "stages=[pair,reference,train,evaluate]", "method=dpop")
    return root, record


def test_trained_evaluation_artifact(trained_run):
    root, record = trained_run
    path = artifact_of(record, "evaluate")
    scores = json.loads((path / "scores.json").read_text())
    assert scores["model"] == "trained" and scores["preset"] == "local"
    assert {"acc", "acc_norm"} <= set(scores["tasks"]["local_mc"])
    assert {"exact_match_strict-match", "exact_match_flexible-extract"} <= set(scores["tasks"]["local_gen"])
    headline_values = [scores["tasks"][task][metric] for task, metric in scores["headline"].items()]
    assert scores["headline"] == {"local_mc": "acc", "local_gen": "exact_match_strict-match"}
    assert scores["average"] == pytest.approx(sum(headline_values) / 2)
    assert scores["settings"]["limit"] == 3 and scores["settings"]["batch_size"] == 8
    # eval.apply_chat_template=null: the training prompts' format (pairing.apply_chat_template=true by default)
    assert scores["settings"]["apply_chat_template"] is True and scores["settings"]["training_chat_template"] is True
    assert scores["settings"]["num_fewshot"] == {"local_mc": 3, "local_gen": 2}

    raw = json.loads((path / "lm_eval_results.json").read_text())
    assert raw["n-shot"] == {"local_mc": 3, "local_gen": 2}
    assert set(raw["versions"]) == {"local_mc", "local_gen"}
    data_files = raw["configs"]["local_mc"]["dataset_kwargs"]["data_files"]
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in data_files.values())
    assert raw["config"]["fewshot_seed"] == 1234 and raw["prefopt_settings"]["apply_chat_template"] is True
    samples = [json.loads(line) for line in (path / "samples" / "local_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 1  # 3 items (a multiple-choice sample holds all its choices)
    assert samples[0]["arguments"][0][0].count("Question:") == 4  # 3 shots + the item

    # Preference metrics on the held-out test pairs, against the cached reference.
    pairs = pd.read_parquet(artifact_of(record, "pair") / "pairs.parquet")
    table = pd.read_parquet(path / "preference_pairs.parquet")
    assert len(table) == int((pairs["split"] == "test").sum()) > 0
    preference = json.loads((path / "preference.json").read_text())
    assert preference["overall"]["pairs"] == len(table) and "by_bucket" in preference


def test_baseline_is_recorded_with_zero_shift(trained_run):
    """The base model's evaluation is the reference artifact's scores; scoring the base model for real
    (the same per-pair layout) gives exactly those numbers, so its shifts are exactly 0 by measurement."""
    from pipeline.modeling import models
    from pipeline.modeling.scoring import forward_settings, score_pairs
    root, record = trained_run
    manifest = json.loads((artifact_of(record, "evaluate") / "manifest.json").read_text())
    baseline = Path(manifest["baseline"]["path"])
    assert baseline.parent == root / "evaluate" and baseline.name == manifest["baseline"]["key"]
    base_manifest = json.loads((baseline / "manifest.json").read_text())
    assert base_manifest["model"] == "base" and "train" not in base_manifest["upstream"]
    table = pd.read_parquet(baseline / "preference_pairs.parquet")
    pairs = pd.read_parquet(artifact_of(record, "pair") / "pairs.parquet")
    test_pairs = pairs[pairs["split"] == "test"].reset_index(drop=True)
    cfg = compose_config(*FAST)
    model_artifact = Artifact("model", "", artifact_of(record, "model"), True)
    scored = score_pairs(models.load_causal_lm(model_artifact, cfg.model), models.load_tokenizer(model_artifact),
                         test_pairs, 128, 64, settings=forward_settings(cfg), progress=False)
    assert list(table["pair_id"]) == scored.pair_ids
    assert table["policy_chosen_logp"].tolist() == scored.seq_logps("chosen").tolist()
    assert table["policy_rejected_logp"].tolist() == scored.seq_logps("rejected").tolist()
    assert (table["rho_chosen"] == 0).all() and (table["rho_rejected"] == 0).all()
    assert json.loads((baseline / "scores.json").read_text())["model"] == "base"
    # the seeds the scores depend on: the data draw for both, the run seed (data order) for the trained model only
    assert json.loads((baseline / "scores.json").read_text())["seeds"] == {"data": cfg.data.seed}
    trained = json.loads((artifact_of(record, "evaluate") / "scores.json").read_text())
    assert trained["seeds"] == {"data": cfg.data.seed, "run": record["config"]["seed"]}


def test_multiple_choice_accuracy_matches_a_direct_forward(trained_run):
    """lm-eval's acc on the base model, recomputed by hand: each choice's log-likelihood from a plain
    transformers forward of context + continuation, the argmax against the gold index."""
    import torch
    from pipeline.modeling import models
    root, record = trained_run
    baseline = Path(json.loads((artifact_of(record, "evaluate") / "manifest.json").read_text())["baseline"]["path"])
    model_artifact = Artifact("model", "", artifact_of(record, "model"), True)
    cfg = compose_config(*FAST)
    model, tokenizer = models.load_causal_lm(model_artifact, cfg.model, dtype="fp32"), models.load_tokenizer(model_artifact)
    correct = []
    for sample in (json.loads(line) for line in (baseline / "samples" / "local_mc.jsonl").read_text().splitlines()):
        scores = []
        for context, continuation in sample["arguments"]:
            # lm-eval moves the context's trailing whitespace into the continuation (the chat template's
            # "assistant\n" ends in one), then scores the continuation's tokens of the joint encoding
            spaces = len(context) - len(context.rstrip())
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            ids_context = tokenizer(context, add_special_tokens=False).input_ids
            ids_all = tokenizer(context + continuation, add_special_tokens=False).input_ids
            answer = len(ids_all) - len(ids_context)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids_all])).logits[0].double()
            logps = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids_all) - 1), torch.tensor(ids_all[1:])]
            scores.append(float(logps[-answer:].sum()))
        lm_eval_scores = [resp[0][0] for resp in sample["resps"]]
        assert scores == pytest.approx(lm_eval_scores, abs=1e-3)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == int(sample["target"])))
    acc = json.loads((baseline / "scores.json").read_text())["tasks"]["local_mc"]["acc"]
    assert acc == pytest.approx(sum(correct) / len(correct))


def test_baseline_is_shared_by_a_second_trained_model(trained_run):
    root, record = trained_run
    first = json.loads((artifact_of(record, "evaluate") / "manifest.json").read_text())["baseline"]
    baseline_manifest = (Path(first["path"]) / "manifest.json").read_text()
    second = run_pipeline(root, root.parent / "run-dpo", "stages=[pair,reference,train,evaluate]", "method=dpo")
    assert second["artifacts"]["train"]["key"] != record["artifacts"]["train"]["key"]
    assert second["artifacts"]["evaluate"]["key"] != record["artifacts"]["evaluate"]["key"]
    manifest = json.loads((artifact_of(second, "evaluate") / "manifest.json").read_text())
    assert manifest["baseline"] == first
    assert (Path(first["path"]) / "manifest.json").read_text() == baseline_manifest  # not recomputed
    evaluations = sorted(p.name for p in (root / "evaluate").iterdir() if (p / "manifest.json").is_file())
    assert len(evaluations) == 3  # one baseline + two trained models


def test_prompt_format_follows_training_unless_set(trained_run):
    """Default: evaluation prompts use the chat template exactly when the training prompts did; an explicit
    eval.apply_chat_template overrides it, enters the lm_eval key and is recorded beside the training format."""
    root, record = trained_run
    default = Path(json.loads((artifact_of(record, "evaluate") / "manifest.json").read_text())["baseline"]["path"])
    plain_record = run_pipeline(root, root.parent / "run-plain", "stages=[evaluate]", "eval.apply_chat_template=false")
    plain = artifact_of(plain_record, "evaluate")
    untemplated_record = run_pipeline(root, root.parent / "run-untemplated", "stages=[evaluate]",
                                      "pairing.apply_chat_template=false")
    untemplated = artifact_of(untemplated_record, "evaluate")
    lm_eval_key = lambda path: json.loads((path / "manifest.json").read_text())["lm_eval"]["key"]  # noqa: E731
    assert lm_eval_key(default) != lm_eval_key(plain)  # the prompt format is in the key
    assert lm_eval_key(plain) == lm_eval_key(untemplated)  # same weights, items and prompts: one lm-eval run

    def first_prompt(path: Path, task: str) -> str:
        sample = json.loads((path / "samples" / f"{task}.jsonl").read_text().splitlines()[0])
        return sample["arguments"][0][0]  # [context, continuation or generation kwargs]

    for task in ("local_mc", "local_gen"):
        assert "<|im_start|>user" in first_prompt(default, task) and "<|im_start|>assistant" in first_prompt(default, task)
        assert "<|im_start|>" not in first_prompt(plain, task)
        assert "<|im_start|>" not in first_prompt(untemplated, task)
    settings = {name: json.loads((path / "scores.json").read_text())["settings"]
                for name, path in (("default", default), ("plain", plain), ("untemplated", untemplated))}
    assert settings["default"]["apply_chat_template"] is True and settings["default"]["fewshot_as_multiturn"] is True
    assert (settings["plain"]["apply_chat_template"], settings["plain"]["training_chat_template"]) == (False, True)
    assert (settings["untemplated"]["apply_chat_template"], settings["untemplated"]["training_chat_template"]) == (False, False)


def test_prompt_format_setting_rejects_non_booleans(tmp_path):
    cfg = compose_config(f"artifacts_dir={tmp_path}", "model=tiny", "logger=none", "eval.apply_chat_template=yes")
    with pytest.raises(UserError, match=r"^eval\.apply_chat_template='yes': expected true, false or null"):
        Run(cfg, tmp_path / "run").execute()
    assert not (tmp_path / "evaluate").exists()


def test_eval_none_writes_only_preference_metrics(trained_run):
    root, _ = trained_run
    record = run_pipeline(root, root.parent / "run-none", "stages=[evaluate]", "eval=none")
    path = artifact_of(record, "evaluate")
    scores = json.loads((path / "scores.json").read_text())
    assert scores["tasks"] == {} and scores["average"] is None and scores["preference"]["pairs"] > 0
    assert (path / "preference.json").is_file() and not (path / "lm_eval_results.json").exists()


def test_local_suite_without_eval_items_is_a_user_error(tmp_path):
    pair = Artifact("pair", "nokey", tmp_path / "pair", cached=True)
    pair.path.mkdir()
    cfg = compose_config(f"artifacts_dir={tmp_path}")
    with pytest.raises(UserError, match=r"eval_mc\.jsonl: not found.*eval=none.*eval=open_llm_v1"):
        eval_suite.build_local_suite(cfg.eval, pair, tmp_path / "store")


@pytest.fixture
def empty_hf_caches(tmp_path, monkeypatch):
    """Point the hub and datasets caches at empty folders, whatever the machine has cached."""
    from datasets import config as datasets_config
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def test_offline_open_llm_v1_names_missing_datasets(empty_hf_caches, tmp_path):
    store = tmp_path / "store"
    cfg = compose_config(f"artifacts_dir={store}", "model=tiny", "logger=none", "eval=open_llm_v1", "stages=[evaluate]")
    with pytest.raises(UserError) as caught:
        Run(cfg, tmp_path / "run").execute()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("eval=open_llm_v1: offline")
    for dataset in ("allenai/ai2_arc", "Rowan/hellaswag", "cais/mmlu", "truthfulqa/truthful_qa",
                    "allenai/winogrande", "openai/gsm8k"):
        assert dataset in message
    assert not store.exists()  # stopped by the config checks, before any model or data was built


def test_cached_hub_dataset_is_not_reported_missing(empty_hf_caches):
    from lm_eval.tasks import TaskManager
    import lm_eval
    manager = TaskManager(include_path=str(Path(lm_eval.__file__).parent / "tasks" / "arc"), include_defaults=False)
    with pytest.raises(UserError, match="allenai/ai2_arc"):
        eval_suite.require_hub_datasets(manager, ["arc_challenge"], "open_llm_v1")
    (empty_hf_caches / "hub" / "datasets--allenai--ai2_arc" / "snapshots").mkdir(parents=True)
    eval_suite.require_hub_datasets(manager, ["arc_challenge"], "open_llm_v1")  # now cached: no error


def test_flat_scores_and_headlines():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                 "exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.75}}}
    scores = evaluate.flat_scores(results)
    assert scores == {"t": {"acc": 0.5, "exact_match_strict-match": 0.25, "exact_match_flexible-extract": 0.75}}
    settings = {"suite": "hub", "name": "x", "batch_size": 1, "limit": None, "apply_chat_template": False,
                "fewshot_as_multiturn": True, "fewshot_seed": 1, "tasks": {"t": {"headline": "acc", "num_fewshot": 0}}}
    assert evaluate.scores_document(scores, settings, "base")["average"] == 0.5
    settings["tasks"]["t"]["headline"] = "acc_norm"
    with pytest.raises(UserError, match="acc_norm"):
        evaluate.scores_document(scores, settings, "base")


@pytest.mark.slow
def test_smollm2_solves_some_local_problems(tmp_path):
    """SmolLM2-135M-Instruct (the default) on the default data's held-out items, through real lm-eval.

    Multiple choice (ARC-shaped: one-step arithmetic, 4 numeric options within 4 of the answer, gold
    position and answer rank balanced, chance 0.25) must be clearly above chance: acc - 3 stderr > 0.25
    (measured 0.63 +- 0.03 on 200 items, BENCHMARKS.md; the items before this suite were at chance, 0.27 +-
    0.05). Generation (GSM8K-shaped, one or two steps): free-form numbers have a chance level near 0, so
    exact answers on a few of 48 problems show real ability (measured 0.29 +- 0.05 on 100).
    """
    from pipeline.modeling import models
    from pipeline.stages import model as model_stage
    from pipeline.stages import pair as pair_stage
    store = tmp_path / "store"
    cfg = compose_config(f"artifacts_dir={store}", "logger=none")
    model_artifact = model_stage.run(cfg, {}, store)
    pair = pair_stage.run(cfg, {"model": model_artifact}, store)
    settings = evaluate.eval_settings(cfg.eval, cfg.pairing)
    settings["apply_chat_template"] = False  # the format the numbers below were measured in (BENCHMARKS.md)
    settings["limit"] = 48  # the default sweep's CPU budget
    manager, tasks, _ = evaluate.load_tasks(settings, pair, store)
    model = models.load_causal_lm(model_artifact, cfg.model)
    results = evaluate.run_lm_eval(model, models.load_tokenizer(model_artifact), manager, tasks, settings)
    scores = evaluate.flat_scores(results)
    print("SmolLM2 local scores:", scores)
    solved = round(scores["local_gen"]["exact_match_flexible-extract"] * 48)
    assert solved >= 3, f"SmolLM2 solved {solved} of 48 generated problems"
    mc = scores["local_mc"]
    assert mc["acc"] - 3 * mc["acc_stderr"] > 0.25, f"SmolLM2 multiple choice {mc} is not clearly above chance"


def test_lm_eval_scores_do_not_depend_on_buckets_or_lengths(trained_run):
    """Re-bucketing the pairs or changing train.max_length recomputes the preference metrics, not lm-eval;
    so does a different headline metric; eval.limit changes lm-eval's key."""
    root, record = trained_run
    base = json.loads((artifact_of(record, "evaluate") / "manifest.json").read_text())["baseline"]
    lm_eval = json.loads((Path(base["path"]) / "manifest.json").read_text())["lm_eval"]
    lm_manifest = (Path(lm_eval["path"]) / "manifest.json").read_text()
    again = run_pipeline(root, root.parent / "run-rebucket", "stages=[pair,reference,evaluate]",
                         "pairing.bucket_edges=[0.0,0.1,0.5,1.0]", "train.max_length=120")
    assert again["artifacts"]["pair"]["key"] != record["artifacts"]["pair"]["key"]
    evaluation = artifact_of(again, "evaluate")
    assert not again["artifacts"]["evaluate"]["cached"] and evaluation != Path(base["path"])
    assert json.loads((evaluation / "manifest.json").read_text())["lm_eval"] == lm_eval
    assert (Path(lm_eval["path"]) / "manifest.json").read_text() == lm_manifest  # cached, not recomputed
    # the preference part did recompute: the new pairing's three buckets
    pairs = pd.read_parquet(artifact_of(again, "pair") / "pairs.parquet")
    table = pd.read_parquet(evaluation / "preference_pairs.parquet")
    assert table["bucket"].tolist() == pairs.loc[pairs["split"] == "test", "bucket"].tolist()
    assert set(json.loads((evaluation / "preference.json").read_text())["by_bucket"]) == set(table["bucket"])
    assert set(table["bucket"]) <= {"b0", "b1", "b2"}
    # the lm-eval files the evaluate artifact carries are lm-eval's
    assert (evaluation / "lm_eval_results.json").read_text() == (Path(lm_eval["path"]) / "lm_eval_results.json").read_text()

    headline = run_pipeline(root, root.parent / "run-headline", "stages=[evaluate]", "eval.tasks.local_mc.headline=acc_norm")
    scores = json.loads((artifact_of(headline, "evaluate") / "scores.json").read_text())
    assert json.loads((artifact_of(headline, "evaluate") / "manifest.json").read_text())["lm_eval"] == lm_eval
    assert scores["average"] == pytest.approx((scores["tasks"]["local_mc"]["acc_norm"]
                                               + scores["tasks"]["local_gen"]["exact_match_strict-match"]) / 2)

    limited = run_pipeline(root, root.parent / "run-limit", "stages=[pair,reference,evaluate]", "eval.limit=2")
    limited_lm = json.loads((artifact_of(limited, "evaluate") / "manifest.json").read_text())["lm_eval"]
    assert limited_lm["key"] != lm_eval["key"]
    assert len((Path(limited_lm["path"]) / "samples" / "local_mc.jsonl").read_text().splitlines()) == 2


def plant_task_files(suite: Path, templates: Path, marker: Path) -> None:
    """A third party's lm-eval task files in the suite's folder (where task YAMLs used to live): real task
    YAMLs, one with a code hook that creates ``marker`` when lm-eval loads it."""
    for folder in (suite, suite / "tasks"):
        folder.mkdir(exist_ok=True)
        for template in templates.glob("*.yaml"):
            hook = "process_docs: !function evil.process_docs\n" if template.stem == "local_mc" else ""
            (folder / template.name).write_text(template.read_text() + hook)
        (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                        "def process_docs(dataset):\n    return dataset\n")


def test_a_planted_task_file_in_the_store_is_never_run(trained_run, tmp_path, capsys):
    """lm-eval reads task YAMLs generated at evaluation time, never from the store: a planted `!function`
    hook is not run even when its author also rewrote the manifest; without that it is not even accepted."""
    from pipeline.store.artifacts import MANIFEST, describe_files

    root, record = trained_run
    base = json.loads((artifact_of(record, "evaluate") / "manifest.json").read_text())["baseline"]
    lm_eval = Path(json.loads((Path(base["path"]) / "manifest.json").read_text())["lm_eval"]["path"])
    suite = json.loads((lm_eval / MANIFEST).read_text())["suite"]
    suite_path, marker = Path(suite["path"]), tmp_path / "pwned"
    assert (lm_eval / "tasks" / "local_mc.yaml").is_file()  # the YAML lm-eval read, kept for the record

    # 1. Planted with a consistent manifest: the suite is accepted, lm-eval runs on it, the hook does not.
    plant_task_files(suite_path, lm_eval / "tasks", marker)
    original_manifest = (suite_path / MANIFEST).read_text()
    manifest = json.loads(original_manifest)
    manifest["files"] = describe_files(suite_path)
    (suite_path / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    limited = run_pipeline(root, tmp_path / "run-planted", "stages=[pair,reference,evaluate]", "eval.limit=1")
    limited_lm = Path(json.loads((artifact_of(limited, "evaluate") / "manifest.json").read_text())["lm_eval"]["path"])
    assert json.loads((limited_lm / MANIFEST).read_text())["suite"]["key"] == suite["key"]  # evaluated on that suite
    assert "[store]" not in capsys.readouterr().out
    assert not marker.exists()
    assert "!function" not in (limited_lm / "tasks" / "local_mc.yaml").read_text()

    # 2. Planted behind the manifest's back: the suite no longer matches it and is rebuilt without the files.
    (suite_path / MANIFEST).write_text(original_manifest)  # the same files, the manifest as the pipeline wrote it
    run_pipeline(root, tmp_path / "run-planted-again", "stages=[pair,reference,evaluate]", "eval.limit=1")
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[store] eval_suite/")]
    assert len(notices) == 1 and "treated as absent and recomputed" in notices[0], notices
    assert not marker.exists() and not (suite_path / "evil.py").exists() and not (suite_path / "tasks").exists()


def test_per_item_scores_average_to_lm_evals_scores(trained_run):
    """analysis reads lm-eval's logged samples item by item (the paired comparison to the base model); their
    means must be lm-eval's own aggregate for every metric, filters included (exact_match_strict-match)."""
    from analysis.collect import item_scores
    root, record = trained_run
    for path in (artifact_of(record, "evaluate"),
                 Path(json.loads((artifact_of(record, "evaluate") / "manifest.json").read_text())["baseline"]["path"])):
        scores = json.loads((path / "scores.json").read_text())["tasks"]
        means = item_scores(path / "samples").groupby(["task", "metric"])["value"].agg(["mean", "count"])
        expected = {(task, metric): value for task, metrics in scores.items() for metric, value in metrics.items()
                    if "stderr" not in metric}
        assert set(means.index) == set(expected)
        assert {key: means.loc[key, "mean"] for key in expected} == pytest.approx(expected)
        assert set(means["count"]) == {3}  # eval.limit=3 items per task
