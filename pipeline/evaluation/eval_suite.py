"""lm-eval task configs: the offline local suite and the hub presets.

Local suite (``eval.suite=local``): leaderboard-shaped tasks built from the pair artifact's held-out
items, written as lm-eval YAML files with ``dataset_path: json`` and ABSOLUTE ``data_files`` into a
small content-addressed artifact (stage ``eval_suite``), so that the base and every trained model
read the same files and the bare ``lm_eval`` command line can use them too
(``lm_eval --include_path <suite>/tasks --tasks local_mc,local_gen``).

- ``multiple_choice`` (ARC's shape): "Question: ...\\nAnswer:" scored over the choices; acc, acc_norm.
- ``generate`` (GSM8K's shape): greedy generation of a step-by-step solution ending in
  ``#### <answer>``; exact_match after the strict-match and flexible-extract filters of lm-eval's
  gsm8k.yaml.

The first ``eval.fewshot_pool`` items of each file form the few-shot split (``train``); the rest are
the test split, so a test item is never its own or another test item's shot.

Hub presets (``eval.suite=hub``) name the harness's own tasks; ``missing_hub_datasets`` says which of
their datasets are absent from the local caches, so an offline run stops before lm-eval starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline.store.artifacts import Artifact, build
from pipeline.environment import env_flag
from pipeline.errors import UserError

TASK_VERSION = 1  # lm-eval task metadata version
STAGE = "eval_suite"
TASK_DIR = "tasks"
SHAPES = ("multiple_choice", "generate")
# The generation stops where a new question would start, or at an end-of-turn token.
STOP_SEQUENCES = ["Question:", "</s>", "<|im_end|>", "<|endoftext|>"]


def local_suite_settings(eval_cfg: DictConfig) -> dict[str, Any]:
    """The eval keys that change the task files (and so the suite key): not the headline metrics."""
    tasks = OmegaConf.to_container(eval_cfg.tasks, resolve=True)
    return {
        "tasks": {name: {k: v for k, v in spec.items() if k != "headline"} for name, spec in tasks.items()},
        "fewshot_pool": int(eval_cfg.fewshot_pool),
        "max_gen_toks": int(eval_cfg.max_gen_toks),
    }


def read_items(path: Path) -> list[dict[str, Any]]:
    items = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return items


def check_items(path: Path, items: list[dict[str, Any]], shape: str) -> None:
    needed = ("question", "choices", "answer") if shape == "multiple_choice" else ("question", "solution")
    for number, item in enumerate(items, start=1):
        absent = [key for key in needed if key not in item]
        if absent:
            raise UserError(f"{path}:{number}: missing field(s) {absent}; expected {list(needed)}")
        if shape == "multiple_choice" and not (isinstance(item["answer"], int) and 0 <= item["answer"] < len(item["choices"])):
            raise UserError(f"{path}:{number}: answer={item['answer']!r} is not an index into choices")
        if shape == "generate" and "####" not in item["solution"]:
            raise UserError(f"{path}:{number}: solution has no '#### <answer>' line")


def task_config(name: str, spec: dict[str, Any], fewshot_file: Path, test_file: Path, max_gen_toks: int) -> dict[str, Any]:
    """One lm-eval task config (the keys of lm-eval 0.4 task YAMLs, cf. arc_easy.yaml and gsm8k.yaml)."""
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(fewshot_file), "test": str(test_file)}},
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "num_fewshot": int(spec["num_fewshot"]),
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "metadata": {"version": TASK_VERSION},
    }
    if spec["shape"] == "multiple_choice":
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_target": "answer",
            "doc_to_choice": "choices",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    return {
        **common,
        "output_type": "generate_until",
        "doc_to_target": "{{solution}}",
        "generation_kwargs": {"until": STOP_SEQUENCES, "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": int(max_gen_toks)},
        "repeats": 1,
        "metric_list": [{
            "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
            "ignore_case": True, "ignore_punctuation": False,
            "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
        }],
        "filter_list": [
            {"name": "strict-match", "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"}]},
        ],
    }


def build_local_suite(eval_cfg: DictConfig, pair: Artifact, root: Path) -> Artifact:
    """The suite artifact: few-shot/test JSONL splits per task (the task YAMLs lm-eval reads are generated
    from the settings at evaluation time by ``task_dir``, never read from the store)."""
    settings = local_suite_settings(eval_cfg)
    sources = {name: Path(pair.path) / spec["source"] for name, spec in settings["tasks"].items()}
    for name, path in sources.items():
        if not path.is_file():
            raise UserError(f"{path}: not found; the local eval suite (task {name}) needs held-out items from the data "
                            "(synthetic data writes them); use eval=none (preference metrics only) or eval=open_llm_v1 (hub)")
        if settings["tasks"][name]["shape"] not in SHAPES:
            raise UserError(f"eval.tasks.{name}.shape={settings['tasks'][name]['shape']!r}: expected one of {list(SHAPES)}")

    def compute(workdir: Path) -> dict[str, Any]:
        counts = {}
        for name, spec in settings["tasks"].items():
            items = read_items(sources[name])
            check_items(sources[name], items, spec["shape"])
            pool = settings["fewshot_pool"]
            if len(items) <= pool or spec["num_fewshot"] > pool:
                raise UserError(f"{sources[name]}: {len(items)} items; eval.fewshot_pool={pool} must be >= "
                                f"eval.tasks.{name}.num_fewshot={spec['num_fewshot']} and leave test items")
            for split, rows in (("fewshot", items[:pool]), ("test", items[pool:])):
                (workdir / f"{name}_{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            counts[name] = {"fewshot": pool, "test": len(items) - pool}
        return {"items": counts}

    # Keyed by the items' content, not the pair artifact: re-bucketing the pairs keeps the suite (and the
    # lm-eval scores built on it).
    from pipeline.store.artifacts import sha256_file
    content = {name: sha256_file(path) for name, path in sorted(sources.items())}
    return build(root, STAGE, {**settings, "items": content}, {}, compute)


_GENERATED: list[tempfile.TemporaryDirectory] = []  # alive until the process ends: lm-eval reads them lazily


def task_dir(eval_cfg: DictConfig, suite: Artifact) -> Path:
    """A fresh folder with one lm-eval task YAML per task, generated from the settings and pointing at the
    suite's data files where the suite is now.

    lm-eval never reads a task YAML from the store: a task file can carry code (``!function``), and a
    shared store may hold a planted one. Generated at each evaluation, the suite also keeps working
    after the store is moved or copied to another machine.
    """
    settings = local_suite_settings(eval_cfg)
    folder = tempfile.TemporaryDirectory(prefix="prefopt-tasks-")
    _GENERATED.append(folder)
    path = Path(folder.name)
    for name, spec in settings["tasks"].items():
        config = task_config(name, spec, suite.path / f"{name}_fewshot.jsonl", suite.path / f"{name}_test.jsonl",
                             settings["max_gen_toks"])
        (path / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------- hub presets


def hub_dataset_paths(task_manager, names: list[str]) -> dict[str, set[str]]:
    """Dataset ids each named task/group/tag reads, from lm-eval's task index (no dataset loaded)."""
    from lm_eval.tasks._index import Kind

    index = task_manager.task_index

    def visit(spec: Any, found: set[str], seen: set[str]) -> None:
        if isinstance(spec, dict):
            if spec.get("dataset_path"):
                found.add(str(spec["dataset_path"]))
                return
            spec = spec.get("task") or spec.get("group")
        if not isinstance(spec, str) or spec in seen:
            return
        seen.add(spec)
        entry = index.get(spec)
        if entry is None:
            raise UserError(f"eval.tasks: {spec!r} is not a task, group or tag of lm-eval")
        if entry.kind == Kind.TAG:
            for member in sorted(entry.tags):
                visit(member, found, seen)
        elif entry.kind == Kind.GROUP:
            for child in (entry.cfg or {}).get("task", []):
                visit(child, found, seen)
        elif entry.cfg and entry.cfg.get("dataset_path"):
            found.add(str(entry.cfg["dataset_path"]))

    result = {}
    for name in names:
        found: set[str] = set()
        visit(name, found, set())
        result[name] = found
    return result


def dataset_cached(dataset_id: str) -> bool:
    """True when the hub cache or the datasets cache holds the dataset (or it is a local path)."""
    if os.path.exists(dataset_id):
        return True
    from datasets import config as datasets_config
    from huggingface_hub import constants
    hub_dir = Path(constants.HF_HUB_CACHE) / ("datasets--" + dataset_id.replace("/", "--"))
    datasets_dir = Path(datasets_config.HF_DATASETS_CACHE) / dataset_id.replace("/", "___")
    return any(path.is_dir() and any(path.iterdir()) for path in (hub_dir, datasets_dir))


def offline() -> bool:
    return env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE")


def require_hub_datasets(task_manager, names: list[str], preset: str) -> None:
    """Offline, stop with one line listing the datasets a hub preset needs but the caches lack."""
    if not offline():
        return
    needed = hub_dataset_paths(task_manager, names)
    missing = sorted({dataset for datasets in needed.values() for dataset in datasets if not dataset_cached(dataset)})
    if missing:
        raise UserError(f"eval={preset}: offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and {len(missing)} dataset(s) "
                        f"are not in the local cache: {', '.join(missing)}; run once with network access "
                        "(unset HF_HUB_OFFLINE HF_DATASETS_OFFLINE), or use eval=local / eval=none")


# ---------------------------------------------------------------- config checks (pipeline/orchestration/validate.py CHECKS)


def check_eval_config(cfg: DictConfig) -> None:
    """eval.* values that need no data: suite, shapes, shots, limit, batch size, headlines."""
    eval_cfg = OmegaConf.select(cfg, "eval")
    if eval_cfg is None:
        return
    suite = eval_cfg.get("suite")
    if suite not in ("local", "hub", "none"):
        raise UserError(f"eval.suite={suite!r}: expected one of ['local', 'hub', 'none']")
    check_backend(cfg)
    chat = eval_cfg.get("apply_chat_template")
    if chat is not None and not isinstance(chat, bool):
        raise UserError(f"eval.apply_chat_template={chat!r}: expected true, false or null (null = the training prompts' "
                        "format, pairing.apply_chat_template)")
    for key in ("batch_size",):
        value = eval_cfg.get(key)
        if not (isinstance(value, int) and value > 0):
            raise UserError(f"eval.{key}={value!r}: expected an integer > 0")
    limit = eval_cfg.get("limit")
    whole = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    if limit is not None and not (whole or (isinstance(limit, float) and 0 < limit < 1)):
        raise UserError(f"eval.limit={limit!r}: expected null, a count > 0, or a fraction in (0, 1)")
    if suite == "none":
        return
    if not eval_cfg.get("tasks"):
        raise UserError(f"eval.tasks: empty for eval.suite={suite}; name at least one task, or use eval=none")
    for name, spec in eval_cfg.tasks.items():
        shots = spec.get("num_fewshot")
        if shots is not None and not (isinstance(shots, int) and shots >= 0):
            raise UserError(f"eval.tasks.{name}.num_fewshot={shots!r}: expected an integer >= 0 (or null for a hub task's own)")
        if not spec.get("headline"):
            raise UserError(f"eval.tasks.{name}.headline: required (the metric that enters the average), e.g. acc_norm")
        if suite == "local":
            if spec.get("shape") not in SHAPES:
                raise UserError(f"eval.tasks.{name}.shape={spec.get('shape')!r}: expected one of {list(SHAPES)}")
            if shots is None or shots > int(eval_cfg.fewshot_pool):
                raise UserError(f"eval.tasks.{name}.num_fewshot={shots!r}: local tasks need 0 <= shots <= "
                                f"eval.fewshot_pool={eval_cfg.fewshot_pool}")
    if suite == "local" and not (isinstance(eval_cfg.get("max_gen_toks"), int) and eval_cfg.max_gen_toks > 0):
        raise UserError(f"eval.max_gen_toks={eval_cfg.get('max_gen_toks')!r}: expected an integer > 0")


BACKENDS = ("hf", "vllm")


def check_backend(cfg: DictConfig) -> None:
    """eval.backend: hf, or vllm where the vllm package is installed and the run is a single process."""
    backend = OmegaConf.select(cfg, "eval.backend", default="hf")
    if backend not in BACKENDS:
        raise UserError(f"eval.backend={backend!r}: expected one of {list(BACKENDS)}")
    stages = OmegaConf.select(cfg, "stages", default=[]) or []
    if backend != "vllm" or "evaluate" not in stages or OmegaConf.select(cfg, "eval.suite") == "none":
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("eval.backend=vllm: run it from ONE process (vLLM splits the model itself: "
                        "eval.vllm.tensor_parallel_size / data_parallel_size), not under accelerate launch")
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise UserError("eval.backend=vllm: the vllm package is not installed (an optional extra for CUDA machines: "
                        "pip install vllm); install it or use eval.backend=hf")


def check_eval_hub_datasets(cfg: DictConfig) -> None:
    """Offline hub presets fail here, before any model loads, naming the missing datasets."""
    stages = OmegaConf.select(cfg, "stages", default=[]) or []
    if "evaluate" not in stages or OmegaConf.select(cfg, "eval.suite") != "hub" or not offline():
        return
    from lm_eval.tasks import TaskManager
    require_hub_datasets(TaskManager(), list(cfg.eval.tasks), str(cfg.eval.name))
