"""Stage "evaluate": lm-eval benchmarks and preference metrics of a model, as an artifact.

Two evaluation artifacts per run when "train" is among the stages:
- the BASELINE: the base model (the reference), keyed only by the model, pair and reference artifacts
  and the eval settings, so every method, beta and seed of a sweep shares one (computed once);
- the TRAINED model's evaluation, keyed by the train artifact too; its manifest names the baseline
  (``extra["baseline"] = {"key", "path"}``) so analysis can put the two side by side.
Without "train" the stage returns the baseline itself.

Each evaluation is two artifacts, so that the expensive part depends only on what changes it:
- ``lm_eval/<key>`` (lm-eval's scores and samples), keyed by the weights (model or train artifact), the
  settings simple_evaluate receives, the task names, ``model.dtype`` and, for the local suite, the suite
  artifact's key (the held-out items' content): not the pairs, bucket edges, ``train.max_length``, the
  headline metrics or ``eval.name``. Re-bucketing reruns no benchmark (``open_llm_v1`` takes hours);
- ``evaluate/<key>``, keyed by everything (pair, reference, scoring settings): the preference metrics
  (seconds) plus copies of the lm-eval files, so readers find every file in one place; its manifest names
  the ``lm_eval`` artifact (``extra["lm_eval"]``).

Artifact files of ``evaluate`` (``lm_eval`` holds ``lm_eval_results.json``, ``samples/`` and the flat scores
``lm_eval_scores.json``):
- ``lm_eval_results.json``: lm-eval's raw results (versions, n-shot, task configs, config incl. batch
  size, limit and seeds) plus ``prefopt_settings`` (chat template, few-shot seed, shots, limit, batch).
- ``scores.json``: {"tasks": {task: {metric: value}}, "headline": {task: metric}, "average": plain
  mean of the headline metrics, "settings": {lm-eval's arguments, incl. apply_chat_template as resolved, and
  training_chat_template: the training prompts' format}, "model": "base" | "trained", "preference": {...},
  "seeds": {"data": data.seed, "run": seed (trained models only: their data order)}}.
- ``samples/<task>.jsonl``: lm-eval's logged samples (prompts, responses, per-item metrics).
- ``preference.json`` / ``preference_pairs.parquet``: reward accuracy, margins and log-prob shifts on
  the held-out test pairs, from the reference artifact's cached per-token scores (never recomputed);
  held-out one-sided rows (``data.schema=unpaired``) add the shift of the side they have, never a margin.
  For the base model the policy IS the reference, so every shift is exactly 0.

``eval=none`` keeps the stage: it writes the preference metrics and a scores.json without tasks.
"""

from __future__ import annotations

import json
import logging
import shutil
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.evaluation import eval_suite
from pipeline.store.artifacts import Artifact
from pipeline.store.distributed import build_shared, process_state
from pipeline.evaluation.lm_eval_parallel import data_parallel, rank_independent_requests
from pipeline.errors import UserError
from pipeline.modeling.models import attention_setting
from pipeline.modeling.precision import resolve_precision
from pipeline.modeling.scoring import forward_settings

STAGE = "evaluate"
LM_EVAL_STAGE = "lm_eval"  # the harness's part alone (see evaluate_model)
SUITES = ("local", "hub", "none")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # model.dtype -> vLLM's name


# ---------------------------------------------------------------- settings


def eval_settings(eval_cfg: DictConfig, pairing_cfg: DictConfig | None = None) -> dict[str, Any]:
    """The eval settings with ``apply_chat_template`` resolved to true or false.

    ``eval.apply_chat_template: null`` means the training prompts' format, ``pairing.apply_chat_template``:
    a model trained on chat-templated prompts is scored on chat-templated prompts unless told otherwise.
    ``training_chat_template`` records that format beside it (scores.json), so a reader sees whether they match.
    """
    settings = OmegaConf.to_container(eval_cfg, resolve=True)
    if settings["suite"] not in SUITES:
        raise UserError(f"eval.suite={settings['suite']!r}: expected one of {list(SUITES)}")
    training = None if pairing_cfg is None else bool(pairing_cfg.apply_chat_template)
    chat = settings.get("apply_chat_template")
    if chat is None:
        if training is None:
            raise ValueError("eval.apply_chat_template=null follows pairing.apply_chat_template: pass the pairing settings")
        chat = training
    elif not isinstance(chat, bool):
        raise UserError(f"eval.apply_chat_template={chat!r}: expected true, false or null (null = the training "
                        "prompts' format, pairing.apply_chat_template)")
    settings["apply_chat_template"] = chat
    settings["training_chat_template"] = training
    return settings


def headlines(settings: dict[str, Any]) -> dict[str, str]:
    """Task (or subgroup) -> the metric that enters the average."""
    chosen: dict[str, str] = {}
    for task, spec in settings["tasks"].items():
        headline = spec.get("headline")
        if isinstance(headline, dict):
            chosen.update(headline)
        elif headline:
            chosen[task] = headline
    return chosen


def lm_eval_arguments(settings: dict[str, Any]) -> dict[str, Any]:
    """The simple_evaluate arguments that change scores; recorded in the results."""
    chat = bool(settings["apply_chat_template"])
    return {
        "batch_size": int(settings["batch_size"]),
        "limit": settings["limit"],
        "apply_chat_template": chat,
        "fewshot_as_multiturn": chat and bool(settings["fewshot_as_multiturn"]),
        "fewshot_random_seed": int(settings["fewshot_seed"]),
        "num_fewshot": {task: spec.get("num_fewshot") for task, spec in settings["tasks"].items()},
    }


# ---------------------------------------------------------------- lm-eval


def load_tasks(settings: dict[str, Any], pair: Artifact, root: Path) -> tuple[Any, list[Any], dict[str, Any]]:
    """(task manager, task list for simple_evaluate, provenance) for the configured suite."""
    from lm_eval.tasks import TaskManager

    names = list(settings["tasks"])
    if settings["suite"] == "local":
        suite = eval_suite.build_local_suite(OmegaConf.create(settings), pair, root)
        tasks = eval_suite.task_dir(OmegaConf.create(settings), suite)
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        return manager, names, {"suite": {"key": suite.key, "path": str(suite.path)}, "task_files": str(tasks)}
    manager = TaskManager()
    eval_suite.require_hub_datasets(manager, names, settings["name"])
    built = []
    for name in names:
        loaded = manager.load([name])
        shots = settings["tasks"][name].get("num_fewshot")
        if shots is not None:  # per-task shots: simple_evaluate's num_fewshot would set one for all
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=int(shots))
        built.append(loaded["groups"].get(name) or loaded["tasks"][name])
    return manager, built, {}


def run_lm_eval(model, tokenizer, manager, tasks: list[Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """lm-eval's simple_evaluate on an HFLM wrapping the already-loaded model.

    Under several processes, lm-eval's own data-parallel path: each rank answers its share of the requests
    and rank 0 receives every result (the other ranks get None), with the single-process prompts
    (pipeline/evaluation/lm_eval_parallel.py).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    arguments = lm_eval_arguments(settings)
    # Passing a loaded model is intended (one loader for every stage); silence lm-eval's warning about it.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=arguments["batch_size"])
    data_parallel(lm)
    with rank_independent_requests():
        return _simple_evaluate(simple_evaluate, lm, manager, tasks, arguments)


def run_lm_eval_vllm(location: str, manager, tasks: list[Any], settings: dict[str, Any], dtype: str) -> dict[str, Any] | None:
    """``eval.backend=vllm``: lm-eval's vLLM backend on the saved weights (vLLM loads them itself).

    Optional extra (``pip install vllm`` on a CUDA machine); validate.py refuses the setting in one line where
    vLLM is not installed. vLLM's own parallelism comes from ``eval.vllm`` (tensor_parallel_size and
    data_parallel_size), not from the pipeline's processes: run it from one process.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.vllm_causallms import VLLM

    arguments = lm_eval_arguments(settings)
    options = dict(settings.get("vllm") or {})
    lm = VLLM(pretrained=location, dtype=VLLM_DTYPES[dtype], batch_size=arguments["batch_size"], **options)
    return _simple_evaluate(simple_evaluate, lm, manager, tasks, arguments)


def _simple_evaluate(simple_evaluate, lm, manager, tasks: list[Any], arguments: dict[str, Any]) -> dict[str, Any] | None:
    import datasets

    datasets.disable_progress_bars()  # "Generating split" bars per task file; lm-eval's own bars stay
    try:
        results = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, batch_size=arguments["batch_size"],
            limit=arguments["limit"], log_samples=True,
            apply_chat_template=arguments["apply_chat_template"],
            fewshot_as_multiturn=arguments["fewshot_as_multiturn"],
            fewshot_random_seed=arguments["fewshot_random_seed"],
        )
    finally:
        datasets.enable_progress_bars()
    if results is None:  # not rank 0 of a data-parallel run
        return None
    results["prefopt_settings"] = arguments
    results["prefopt_processes"] = lm.world_size  # how many processes shared the requests (not a score setting)
    return results


def flat_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's "acc,none" / "exact_match,strict-match" keys as "acc" / "exact_match_strict-match"."""
    scores: dict[str, dict[str, float]] = {}
    for task, entry in results.get("results", {}).items():
        metrics = {}
        for key, value in entry.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            metrics[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
        scores[task] = metrics
    return scores


def write_lm_eval_outputs(results: dict[str, Any], workdir: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", {})
    (workdir / "samples").mkdir(exist_ok=True)
    for task, rows in samples.items():
        with (workdir / "samples" / f"{task}.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=handle_non_serializable) + "\n")
    (workdir / "lm_eval_results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))


def scores_document(scores: dict[str, dict[str, float]], settings: dict[str, Any], label: str) -> dict[str, Any]:
    chosen = headlines(settings) if settings["suite"] != "none" else {}
    values = []
    for task, metric in chosen.items():
        if metric not in scores.get(task, {}):
            raise UserError(f"eval.tasks headline {task}:{metric}: lm-eval reported {sorted(scores.get(task, {}))} for {task}")
        values.append(scores[task][metric])
    return {
        "model": label,
        "preset": settings["name"],
        "tasks": scores,
        "headline": chosen,
        "average": sum(values) / len(values) if values else None,
        "settings": {**lm_eval_arguments(settings), "suite": settings["suite"],
                     "training_chat_template": settings.get("training_chat_template")},
    }


# ---------------------------------------------------------------- preference metrics


def preference_outputs(cfg: DictConfig, model, tokenizer, pair: Artifact, reference: Artifact, is_base: bool,
                       workdir: Path) -> dict[str, Any]:
    """Preference metrics on the held-out test pairs (and one-sided rows, pipeline/data/unpaired.py: each with the
    side it has); reference scores come from the reference artifact."""
    from pipeline.evaluation.preference_metrics import pair_table, summarise
    from pipeline.modeling.reference_scores import load_scored_rows
    from pipeline.modeling.scoring import score_pairs

    pairs, reference_all = load_scored_rows(pair, reference)  # pairs, then one-sided rows, in one order
    test_rows = [i for i, split in enumerate(pairs["split"]) if split == "test"]
    if not test_rows:
        raise UserError(f"{Path(pair.path) / 'pairs.parquet'}: no pairs (or unpaired rows) with split == 'test'; "
                        "preference metrics need held-out pairs (pairing.test_fraction > 0)")
    test_pairs = pairs.iloc[test_rows].reset_index(drop=True)
    reference_scored = reference_all.select(test_rows)  # cached: never recomputed
    if is_base:
        policy_scored = reference_scored  # the base model IS the reference: rho = 0 exactly, no forward pass
    else:
        scoring = scoring_settings(cfg)
        policy_scored = score_pairs(model, tokenizer, test_pairs, scoring["max_length"], scoring["max_prompt_length"],
                                    settings=forward_settings(cfg),
                                    desc="policy log-probs (test pairs)")
    table = pair_table(policy_scored, reference_scored, test_pairs)
    summary = summarise(table)
    table.to_parquet(workdir / "preference_pairs.parquet", index=False)
    (workdir / "preference.json").write_text(json.dumps(summary, indent=2, default=_json_number))
    return summary


def lm_eval_subset(cfg: DictConfig, label: str, suite_key: str | None) -> dict[str, Any]:
    """The ``lm_eval`` artifact's settings: what changes lm-eval's scores, nothing else.

    The arguments simple_evaluate receives, the task names, the dtype the weights load in, and for the
    local suite the suite artifact's key (its items' content, shots, pool and generation budget). Not the
    headline metrics (they only pick what enters the average), labels, pairs, buckets or train.max_length.
    """
    settings = eval_settings(cfg.eval, cfg.pairing)
    return {"arguments": lm_eval_arguments(settings), "suite": settings["suite"], "tasks": sorted(settings["tasks"]),
            **backend_settings(settings),
            "suite_key": suite_key, "model": label, "model_dtype": str(cfg.model.dtype), **attention_setting(cfg.model)}


def backend_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The backend changes scores; vLLM's engine settings count only when vLLM runs."""
    backend = settings.get("backend", "hf")
    return {"backend": backend, **({"vllm": settings.get("vllm")} if backend == "vllm" else {})}


def config_subset(cfg: DictConfig, label: str) -> dict[str, Any]:
    """No method, train or run-seed keys: the baseline is shared by every job of a sweep; ``eval.name`` is a label."""
    full = eval_settings(cfg.eval, cfg.pairing)
    settings = {k: v for k, v in full.items() if k not in ("name", "backend", "vllm")}
    settings.update(backend_settings(full))
    # The trained model is evaluated loaded in model.dtype (bf16 on the GPU presets): that changes scores.
    return {"eval": settings, "model": label, "scoring": scoring_settings(cfg), "model_dtype": str(cfg.model.dtype),
            **attention_setting(cfg.model)}


def scoring_settings(cfg: DictConfig) -> dict[str, Any]:
    # The truncation and autocast the reference scores were computed with, so policy and reference align.
    return {"max_length": int(cfg.train.max_length), "max_prompt_length": int(cfg.train.max_prompt_length),
            "precision": resolve_precision(cfg.train.precision), **forward_settings(cfg).key()}


def _json_number(value: Any) -> Any:
    return float(value) if hasattr(value, "__float__") else str(value)


# ---------------------------------------------------------------- one model


def evaluate_model(cfg: DictConfig, root: Path, label: str, model_source: Artifact, upstream: dict[str, Artifact],
                   baseline: Artifact | None = None) -> Artifact:
    """Evaluate one model (``label`` "base" or "trained") into its own artifact.

    Two artifacts, so that what is expensive depends only on what changes it: ``lm_eval`` (the harness's
    scores and samples) is keyed by the weights (``model_source``: the model or train artifact), the eval
    settings and the task suite's content — never by the pairs, buckets or ``train.max_length`` —; the
    ``evaluate`` artifact, keyed by everything, adds the preference metrics on the held-out pairs (quick)
    and carries copies of the lm-eval files, so readers find everything in one place.
    """
    from pipeline.modeling.models import load_causal_lm, load_tokenizer

    settings = eval_settings(cfg.eval, cfg.pairing)
    pair, reference = upstream["pair"], upstream["reference"]
    subset = config_subset(cfg, label)
    lm_artifact = None
    if settings["suite"] != "none":  # tasks first: a missing dataset stops us before any model loads
        manager, tasks, provenance = load_tasks(settings, pair, root)
        lm_subset = lm_eval_subset(cfg, label, (provenance.get("suite") or {}).get("key"))

        def compute_lm_eval(workdir: Path) -> dict[str, Any] | None:
            if settings.get("backend", "hf") == "vllm":
                from pipeline.modeling.models import model_location
                results = run_lm_eval_vllm(model_location(model_source), manager, tasks, settings, str(cfg.model.dtype))
            else:  # every process of a launch answers its share of lm-eval's requests
                model = load_causal_lm(model_source, cfg.model).to(process_state().device)
                tokenizer = load_tokenizer(model_source, bool(cfg.model.trust_remote_code))
                results = run_lm_eval(model, tokenizer, manager, tasks, settings)
            if results is None:  # not the main process: it writes nothing
                return None
            write_lm_eval_outputs(results, workdir)
            if "task_files" in provenance:  # the task YAMLs lm-eval read, for the record
                shutil.copytree(provenance["task_files"], workdir / eval_suite.TASK_DIR)
            (workdir / "lm_eval_scores.json").write_text(json.dumps(flat_scores(results), indent=2))
            return {"model": label, "processes": results["prefopt_processes"],
                    **{k: v for k, v in provenance.items() if k != "task_files"}}

        lm_artifact = build_shared(root, LM_EVAL_STAGE, lm_subset, {"weights": model_source}, compute_lm_eval)

    def compute(workdir: Path) -> dict[str, Any] | None:
        if not process_state().is_main_process:  # preference metrics take seconds: the main process alone
            return None
        extra: dict[str, Any] = {"model": label}
        if baseline is not None:
            extra["baseline"] = {"key": baseline.key, "path": str(baseline.path)}
        scores: dict[str, dict[str, float]] = {}
        if lm_artifact is not None:
            extra["lm_eval"] = {"key": lm_artifact.key, "path": str(lm_artifact.path)}
            scores = json.loads((lm_artifact.path / "lm_eval_scores.json").read_text())
            shutil.copy(lm_artifact.path / "lm_eval_results.json", workdir / "lm_eval_results.json")
            shutil.copytree(lm_artifact.path / "samples", workdir / "samples")
        model = None if label == "base" else load_causal_lm(model_source, cfg.model).to(process_state().device)
        tokenizer = load_tokenizer(model_source, bool(cfg.model.trust_remote_code))
        preference = preference_outputs(cfg, model, tokenizer, pair, reference, label == "base", workdir)["overall"]
        document = scores_document(scores, settings, label)
        document["preference"] = preference
        # what the scores depend on besides the suite: the data draw and, for a trained model, its run seed (data
        # order); both are in the upstream keys, recorded here so a reader of scores.json alone sees them
        data_seed = OmegaConf.select(cfg, "data.seed", default=None)
        document["seeds"] = {"data": data_seed, **({"run": int(cfg.seed)} if label != "base" else {})}
        (workdir / "scores.json").write_text(json.dumps(document, indent=2, default=_json_number))
        extra["average"] = document["average"]
        return extra

    return build_shared(root, STAGE, subset, upstream, compute)


# ---------------------------------------------------------------- stage


def run(cfg: DictConfig, upstream: dict[str, Artifact], root: Path) -> Artifact:
    base_inputs = {name: upstream[name] for name in ("model", "pair", "reference")}
    baseline = evaluate_model(cfg, root, "base", upstream["model"], base_inputs)
    artifact = baseline
    if "train" in upstream:
        artifact = evaluate_model(cfg, root, "trained", upstream["train"], dict(upstream), baseline=baseline)
    if not artifact.cached and process_state().is_main_process:  # a cached rerun adds no duplicate W&B run
        track(cfg, artifact, baseline)
    return artifact


def track(cfg: DictConfig, artifact: Artifact, baseline: Artifact) -> None:
    """Metrics (eval/<task>/<metric>) and a base-vs-trained results table, in the run's W&B group."""
    import pandas as pd

    from pipeline.store.tracking import start_run

    # One W&B run per evaluate artifact: a retry after a crash continues it instead of opening another.
    tracker = start_run(cfg, job_type=STAGE, run_id=f"evaluate-{artifact.key}")
    try:
        rows, metrics = [], {}
        for art in dict.fromkeys([baseline, artifact]):  # one row set per distinct artifact
            document = json.loads((art.path / "scores.json").read_text())
            for task, values in document["tasks"].items():
                for metric, value in values.items():
                    rows.append({"model": document["model"], "task": task, "metric": metric, "value": value,
                                 "artifact": art.key})
            for metric, value in (document.get("preference") or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    rows.append({"model": document["model"], "task": "preference", "metric": metric,
                                 "value": float(value), "artifact": art.key})
            if art == artifact:
                metrics = {f"eval/{row['task']}/{row['metric']}": row["value"] for row in rows if row["artifact"] == art.key}
                if document["average"] is not None:
                    metrics["eval/average"] = document["average"]
        tracker.log(metrics)
        tracker.summary(metrics)
        tracker.log_table("eval/results", pd.DataFrame(rows))
    finally:
        tracker.finish()
