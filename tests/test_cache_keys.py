"""Cache keys follow the settings and the code: every config key either changes exactly the keys of the
stages that read it or is listed here as changing none; editing a module recomputes its dependents only;
hub revisions enter keys as commits; recompute=[...] replaces artifacts in place, once per command."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.stages import analyse
from pipeline.evaluation import eval_suite
from pipeline.stages import evaluate
from pipeline.stages import model as model_stage
from pipeline.stages import pair
from pipeline.stages import reference
from pipeline.stages import train
from pipeline.store.artifacts import canonical_json
from pipeline.errors import UserError
from pipeline.orchestration.orchestrate import Run
from tests.conftest import REPO_ROOT, compose_config

SUBSETS = {"model": lambda c: model_stage.config_subset(c.model), "pair": pair.config_subset,
           "reference": reference.config_subset, "train": train.config_subset,
           "evaluate": lambda c: evaluate.config_subset(c, "trained"), "analyse": analyse.config_subset,
           # lm-eval's own artifact (the local suite's settings reach it through the suite's key)
           "eval_suite": lambda c: eval_suite.local_suite_settings(c.eval),
           "lm_eval": lambda c: evaluate.lm_eval_subset(c, "trained", None)}

# Each leaf of the default config -> the stages whose key it changes. set(): it changes no result: labels
# (model.name, eval.name, logger.*, sweep_name), where things go (artifacts_dir, stages, recompute),
# memory or display (gradient_checkpointing, checkpoint_every, progress), keys unused by the chosen
# source or option (hub_id, revision, materialize with the GGUF source; lora.* with LoRA off;
# train.epochs while max_steps is set). method.name and bucket_filter reach analyse: it prints them.
DEFAULT = {
    'data.name': {'pair'},
    'data.source': {'pair'},
    'data.seed': {'pair'},
    'data.num_problems': {'pair'},
    'data.num_eval_items': {'pair'},
    'data.eval_choices': {'pair'},
    'data.eval_max_operand': {'pair'},
    'data.kind_mix.corrupt_step': {'pair'},
    'data.kind_mix.wrong_solution': {'pair'},
    'data.kind_mix.mc_distractor': {'pair'},
    'pairing.unit': {'pair'},
    'pairing.bucket_edges': {'pair'},
    'pairing.quantiles': {'pair'},
    'pairing.bucket_labels': {'pair'},
    'pairing.bucket_filter': {'analyse', 'train'},
    'pairing.test_fraction': {'pair'},
    'pairing.apply_chat_template': {'pair', 'evaluate', 'lm_eval'},  # eval.apply_chat_template=null follows it
    'model.name': set(),
    'model.source': {'model'},
    'model.hub_id': set(),
    'model.revision': set(),
    'model.materialize': set(),
    'model.gguf_package': {'model'},
    'model.gguf_file': {'model'},
    'model.dtype': {'evaluate', 'lm_eval'},
    'model.gradient_checkpointing': set(),
    'model.trust_remote_code': {'model'},
    'model.attn_implementation': {'evaluate', 'lm_eval', 'reference', 'train'},
    'model.lora.enabled': {'train'},
    'model.lora.r': set(),
    'model.lora.alpha': set(),
    'model.lora.dropout': set(),
    'model.lora.target_modules': set(),
    'method.name': {'analyse'},
    'method.loss': {'train'},
    'method.needs_reference': {'train'},
    'method.needs_vocab_term': {'train'},
    'method.accepts_unpaired': {'train'},
    'method.beta': {'analyse', 'train'},
    'method.lambda_': {'analyse', 'train'},
    'train.max_length': {'evaluate', 'reference', 'train'},
    'train.max_prompt_length': {'evaluate', 'reference', 'train'},
    'train.precision': {'evaluate', 'reference', 'train'},
    'train.prefix_sharing': {'evaluate', 'reference', 'train'},
    'train.logprob_chunk': {'evaluate', 'reference', 'train'},
    'train.pack_tokens': {'train'},
    'train.disable_dropout': {'train'},
    'train.lr': {'train'},
    'train.weight_decay': {'train'},
    'train.adam_betas': {'train'},
    'train.adam_eps': {'train'},
    'train.max_grad_norm': {'train'},
    'train.schedule': {'train'},
    'train.warmup_ratio': {'train'},
    'train.batch_size': {'train'},
    'train.grad_accumulation': {'train'},
    'train.max_steps': {'train'},
    'train.drop_one_side': {'train'},
    'train.epochs': set(),
    'train.probe_every': {'train'},
    'train.probe_pairs': {'train'},
    'train.checkpoint_every': set(),
    'train.progress': set(),
    # Keyed by train.run() under fsdp only (mode, passed-through settings, process count; tests/test_fsdp.py
    # reads them in the manifest), so DDP keys stay as they were: config_subset leaves them out.
    'train.distributed': set(),
    'train.accelerate_config': set(),
    'eval.name': set(),
    'eval.suite': {'evaluate', 'lm_eval'},
    'eval.tasks.local_mc.source': {'evaluate', 'eval_suite'},
    'eval.tasks.local_mc.shape': {'evaluate', 'eval_suite'},
    'eval.tasks.local_mc.num_fewshot': {'evaluate', 'eval_suite', 'lm_eval'},
    'eval.tasks.local_mc.headline': {'evaluate'},
    'eval.tasks.local_gen.source': {'evaluate', 'eval_suite'},
    'eval.tasks.local_gen.shape': {'evaluate', 'eval_suite'},
    'eval.tasks.local_gen.num_fewshot': {'evaluate', 'eval_suite', 'lm_eval'},
    'eval.tasks.local_gen.headline': {'evaluate'},
    'eval.fewshot_pool': {'evaluate', 'eval_suite'},
    'eval.max_gen_toks': {'evaluate', 'eval_suite'},
    'eval.limit': {'evaluate', 'lm_eval'},
    'eval.batch_size': {'evaluate', 'lm_eval'},
    'eval.apply_chat_template': {'evaluate', 'lm_eval'},
    'eval.fewshot_as_multiturn': {'evaluate', 'lm_eval'},  # read by lm-eval: the chat template is on by default
    'eval.fewshot_seed': {'evaluate', 'lm_eval'},
    'eval.backend': {'evaluate', 'lm_eval'},
    # vLLM's engine settings are keyed only when eval.backend=vllm (unused, and unkeyed, with hf)
    'eval.vllm.tensor_parallel_size': set(),
    'eval.vllm.data_parallel_size': set(),
    'eval.vllm.gpu_memory_utilization': set(),
    'logger.name': set(),
    'logger.project': set(),
    'logger.entity': set(),
    'logger.mode': set(),
    'logger.tags': set(),
    'stages': set(),
    'seed': {'analyse', 'pair', 'train'},
    'artifacts_dir': set(),
    'recompute': set(),
    'store_verify': set(),
    'sweep_name': set(),
}
# With LoRA on, its settings and the frozen base's dtype change what trains (and the scored reference).
WITH_LORA = {**DEFAULT, "model.dtype": {"reference", "train", "evaluate", "lm_eval"}, "model.lora.r": {"train"},
             "model.lora.alpha": {"train"}, "model.lora.dropout": {"train"}, "model.lora.target_modules": {"train"}}



# data=local: every adapter key of conf/data/local.yaml reaches the pair key, the hub's location keys do
# not (and the synthetic generator's keys are absent, so the run seed no longer reaches the pairs: the
# split hashes the prompt); a hub preset: the other way round for data.path.
_NOT_DATA = {**{k: v for k, v in DEFAULT.items() if not k.startswith("data.")}, "seed": {"analyse", "train"}}
HUB_LOCATION = ("data.hub_id", "data.subset", "data.split", "data.revision")


def data_expectations(overrides: tuple[str, ...], unused: tuple[str, ...]) -> dict[str, set[str]]:
    raw = OmegaConf.to_container(compose_config(*overrides), resolve=False)
    return {**_NOT_DATA, **{f"data.{k}": (set() if f"data.{k}" in unused else {"pair"})
                            for k, _ in leaves(raw["data"])}}


LOCAL_DATA = (f"data.path={REPO_ROOT / 'tests' / 'fixtures' / 'hh_rlhf.jsonl'}",)


def leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def mutated(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if value is None:
        return 1
    if isinstance(value, list):
        return value + [value[-1]] if value else [1]
    return f"{value}x"


@lru_cache(maxsize=None)
def composed(overrides: tuple[str, ...]):
    return compose_config(*overrides)


def keys_changed_by(overrides: tuple[str, ...], key: str, value) -> set[str]:
    cfg = copy.deepcopy(composed(overrides))
    base = {stage: canonical_json(subset(cfg)) for stage, subset in SUBSETS.items()}
    OmegaConf.update(cfg, key, mutated(value), force_add=True)
    changed = set()
    for stage, subset in SUBSETS.items():
        try:
            if canonical_json(subset(cfg)) != base[stage]:
                changed.add(stage)
        except UserError:  # the stage reads the key and rejects the new value
            changed.add(stage)
    return changed


CASES = {
    "default": ((), lambda: DEFAULT),
    "lora": (("model.lora.enabled=true",), lambda: WITH_LORA),
    "local_data": (("data=local",) + LOCAL_DATA, lambda: data_expectations(("data=local",) + LOCAL_DATA, HUB_LOCATION)),
    "hub_data": (("data=arc_dpop",), lambda: data_expectations(("data=arc_dpop",), ("data.path",))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_setting_changes_exactly_the_keys_of_the_stages_that_read_it(case):
    overrides, expectation = CASES[case]
    expected = expectation()
    raw = OmegaConf.to_container(composed(overrides), resolve=False)
    found = dict(leaves(raw))
    assert set(found) == set(expected), f"settings without an entry here: {sorted(set(found) ^ set(expected))}"
    changed = {key: keys_changed_by(overrides, key, value) for key, value in found.items()}
    wrong = {key: (sorted(changed[key]), sorted(expected[key])) for key in found if changed[key] != expected[key]}
    assert not wrong, f"key -> (stages whose key changed, expected): {wrong}"


def test_equal_numbers_and_labels_share_keys():
    from pipeline.store.artifacts import artifact_key
    one, one_float = compose_config("method=dpo", "method.beta=1"), compose_config("method=dpo", "method.beta=1.0")
    assert canonical_json(train.config_subset(one)) == canonical_json(train.config_subset(one_float))
    renamed = compose_config("method=dpo", "method.beta=1", "method.name=dpo_again")
    assert canonical_json(train.config_subset(renamed)) == canonical_json(train.config_subset(one))
    assert artifact_key("train", {"beta": 1, "lr": [1e-6, 2]}, {}) == artifact_key("train", {"beta": 1.0, "lr": [1e-6, 2.0]}, {})
    assert artifact_key("train", {"beta": 1}, {}) != artifact_key("train", {"beta": 1.5}, {})
    # numbers stay exact: two seeds that differ beyond float precision are two keys
    assert artifact_key("pair", {"seed": 2**53}, {}) != artifact_key("pair", {"seed": 2**53 + 1}, {})
    assert artifact_key("pair", {"flag": True}, {}) != artifact_key("pair", {"flag": 1}, {})


# ---------------------------------------------------------------- code


PROBE = """
import json, sys, time
started = time.perf_counter()
from pipeline.store.code_version import code_identity
identities = {s: code_identity(s) for s in sys.argv[1:]}
elapsed = time.perf_counter() - started
libraries_loaded = sorted(m for m in ("torch", "transformers", "pandas", "matplotlib") if m in sys.modules)
from pipeline.store.artifacts import artifact_key
from pipeline.orchestration.orchestrate import OPTIONAL_UPSTREAM, REQUIRED_UPSTREAM
keys = {}
for stage in ("model", "pair", "reference", "train", "evaluate", "analyse"):  # a full run's chain of upstream keys
    upstream = {u: keys[u] for u in REQUIRED_UPSTREAM[stage] + OPTIONAL_UPSTREAM.get(stage, ())}
    keys[stage] = artifact_key(stage, {}, upstream, identities[stage])
print(json.dumps({"code": {s: i["hash"] for s, i in identities.items()}, "keys": keys,
                  "modules": {s: i["modules"] for s, i in identities.items()},
                  "elapsed": elapsed, "libraries_loaded": libraries_loaded}))
"""
STAGES = ("model", "pair", "reference", "train", "eval_suite", "lm_eval", "evaluate", "analyse")


def probe(root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", PROBE, *STAGES], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def changed(before: dict, after: dict, part: str) -> set[str]:
    return {stage for stage in after[part] if after[part][stage] != before[part][stage]}


def append(path: Path, text: str = "\nEDITED = True\n") -> None:
    with path.open("a") as handle:
        handle.write(text)


def test_editing_code_recomputes_exactly_what_depends_on_it(tmp_path):
    copy_root = tmp_path / "repo"
    for name in ("pipeline", "analysis", "tests"):
        shutil.copytree(REPO_ROOT / name, copy_root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "README.md", copy_root / "README.md")
    before = probe(copy_root)
    assert before["libraries_loaded"] == [], "computing code identities must not import the libraries"
    # the lazily imported analysis package is in the analyse stage's closure, and only there
    assert "analysis.fig_after_diff" in before["modules"]["analyse"]
    assert "pipeline.training.losses" in before["modules"]["train"] and "pipeline.training.losses" not in before["modules"]["reference"]

    (copy_root / "README.md").write_text("edited")
    append(copy_root / "tests" / "test_losses.py")
    # documentation inside the code: a comment, reflowed lines, a module and a function docstring
    losses = copy_root / "pipeline" / "training" / "losses.py"
    source = losses.read_text()
    edited = '"""Reworded."""\n# a new comment\n' + source.split('"""', 2)[2]
    edited, replaced = re.subn(r'(\ndef \w+\([^)]*\)[^:]*:\n\s+)"""[^"]*"""', r'\1"""Reworded too."""', edited, count=1)
    assert replaced == 1 and edited != source
    losses.write_text(edited.replace("\ndef ", "\n# spaced out\n\ndef ", 1))
    assert probe(copy_root)["keys"] == before["keys"], "comments and docstrings must not change a key"

    append(copy_root / "pipeline" / "training" / "losses.py")
    after_loss = probe(copy_root)
    # train's code changed; evaluate and analyse recompute through the train key they build on
    assert changed(before, after_loss, "code") == {"train"}
    assert changed(before, after_loss, "keys") == {"train", "evaluate", "analyse"}

    append(copy_root / "analysis" / "fig_after_diff.py")
    after_figure = probe(copy_root)
    assert changed(after_loss, after_figure, "code") == {"analyse"}
    assert changed(after_loss, after_figure, "keys") == {"analyse"}


CLOSURE_PROBE = """
import json
from pipeline.store.code_version import import_closure
print(json.dumps(import_closure("pipeline.stage")))
"""
FAKE_PACKAGES = {
    "pipeline/__init__.py": "",
    "pipeline/stage.py": """
        from pipeline import a                 # a module named through its package
        from pipeline.b import thing           # a name from a module
        import pipeline.c as c
        from . import d                        # relative
        from .sub.e import f                   # relative, into a subpackage (its __init__ runs too)
        import json, numpy                     # not ours

        def later():
            from analysis import g             # inside a function, the other package
            import importlib
            return importlib.import_module("pipeline.h")

        class K:
            def method(self):
                try:
                    import pipeline.i
                except ImportError:
                    pass
        """,
    "pipeline/a.py": "from pipeline.j import x  # transitive\n",
    "pipeline/b.py": "thing = 1\n", "pipeline/c.py": "", "pipeline/d.py": "",
    "pipeline/sub/__init__.py": "", "pipeline/sub/e.py": "f = 1\n", "pipeline/h.py": "", "pipeline/i.py": "",
    "pipeline/j.py": "x = 1\n", "pipeline/unused.py": "import pipeline.stage\n",
    "analysis/__init__.py": "", "analysis/g.py": "",
}


def test_import_closure_follows_every_import_form(tmp_path):
    for name, text in FAKE_PACKAGES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    (tmp_path / "pipeline" / "store").mkdir()
    (tmp_path / "pipeline" / "store" / "__init__.py").write_text("")
    shutil.copy(REPO_ROOT / "pipeline" / "store" / "code_version.py", tmp_path / "pipeline" / "store" / "code_version.py")
    out = subprocess.run([sys.executable, "-c", CLOSURE_PROBE], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = {"pipeline", "pipeline.stage", "pipeline.a", "pipeline.b", "pipeline.c", "pipeline.d", "pipeline.sub",
                "pipeline.sub.e", "pipeline.h", "pipeline.i", "pipeline.j", "analysis", "analysis.g"}
    assert set(json.loads(out.stdout)) == expected


def test_a_project_stage_must_be_registered(tmp_path):
    from pipeline.store.artifacts import build
    namespace = {"__name__": "pipeline.new_stage", "build": build}
    exec("def run(root):\n    return build(root, 'new_stage', {}, {}, lambda workdir: None)\n", namespace)
    with pytest.raises(RuntimeError, match="STAGE_MODULES"):
        namespace["run"](tmp_path)
    # every registered stage names a real module and its libraries
    from pipeline.store.code_version import STAGE_LIBRARIES, STAGE_MODULES, code_identity
    assert set(STAGE_LIBRARIES) == set(STAGE_MODULES)
    for stage in STAGE_MODULES:
        assert STAGE_MODULES[stage] in code_identity(stage)["modules"]


# ---------------------------------------------------------------- hub revisions

SHA_MAIN, SHA_NEW, SHA_DATA = "1" * 40, "2" * 40, "3" * 40
HUB_PROBE = """
import json, sys
from omegaconf import OmegaConf
from pipeline.stages import model as model_stage, pair
from pipeline.store.artifacts import artifact_key
from pipeline.errors import UserError
from pipeline.store.hub_revision import resolve_revision
from tests.conftest import compose_config

def error(call):
    try:
        call()
    except UserError as e:
        return str(e)

model = compose_config("model=mistral_7b", "model.hub_id=org/model").model
subset = model_stage.resolved_subset(model)
data = pair.resolved_subset(compose_config("data=arc_dpop", "data.hub_id=org/data"))
artifact = model_stage.run(OmegaConf.create({"model": model}), {}, sys.argv[1])
print(json.dumps({
    "main": resolve_revision("org/model", None), "named": resolve_revision("org/model", "main"),
    "pinned": resolve_revision("org/model", "%(new)s"),
    "model_subset_revision": subset["source"]["revision"], "model_key": artifact_key("model", subset, {}),
    "data_revision": data["data"]["revision"],
    "source_json": json.loads((artifact.path / "source.json").read_text()),
    "manifest_revision": artifact.manifest["config"]["source"]["revision"],
    "unknown": error(lambda: resolve_revision("org/absent", "main")),
    "stale": error(lambda: resolve_revision("org/stale", "main")),
    "unknown_data": error(lambda: resolve_revision("org/absent", "v1", "dataset", "data.revision")),
}))
"""


def fake_hub_cache(hub: Path, repo_type: str, repo_id: str, ref: str, sha: str, files: dict[str, str]) -> None:
    """The layout huggingface_hub writes: <type>s--org--name/refs/<ref> holds the commit, snapshots/<commit>/ the files."""
    repo = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    for name, text in files.items():
        (repo / "snapshots" / sha / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / sha / name).write_text(text)


def hub_probe(hf_home: Path, store: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", HUB_PROBE % {"new": SHA_NEW}, str(store)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_revisions_resolve_to_commits_from_the_local_cache(tmp_path):
    hub = tmp_path / "hf" / "hub"
    fake_hub_cache(hub, "model", "org/model", "main", SHA_MAIN, {"config.json": "{}"})
    fake_hub_cache(hub, "dataset", "org/data", "main", SHA_DATA, {"data/train.jsonl": "{}\n"})
    (hub / "models--org--stale" / "refs").mkdir(parents=True)
    (hub / "models--org--stale" / "refs" / "main").write_text("4" * 40)  # a ref whose snapshot is gone
    first = hub_probe(tmp_path / "hf", tmp_path / "store")
    assert first["main"] == first["named"] == first["model_subset_revision"] == SHA_MAIN
    assert first["pinned"] == SHA_NEW and first["data_revision"] == SHA_DATA
    # the artifact records the commit (source.json and the manifest), not the branch
    assert first["source_json"]["revision"] == first["manifest_revision"] == SHA_MAIN
    assert first["source_json"]["requested_revision"] == "main"
    for name, key in (("unknown", "model.revision"), ("stale", "model.revision"), ("unknown_data", "data.revision")):
        assert first[name] and "\n" not in first[name] and first[name].startswith(key), first[name]
    # "main" moves to a new commit: a new model key
    fake_hub_cache(hub, "model", "org/model", "main", SHA_NEW, {"config.json": "{}"})
    moved = hub_probe(tmp_path / "hf", tmp_path / "store")
    assert moved["main"] == SHA_NEW and moved["model_key"] != first["model_key"]


# ---------------------------------------------------------------- recompute


def test_recompute_forces_a_stage_and_is_recorded(make_config, tmp_path):
    overrides = ("model=tiny", "logger=none", "data.num_problems=12", "data.num_eval_items=4", "stages=[pair]")
    first = Run(make_config(*overrides), tmp_path / "r1").execute()
    again = Run(make_config(*overrides), tmp_path / "r2").execute()
    assert again["artifacts"]["pair"]["cached"]
    old_manifest = json.loads((Path(first["artifacts"]["pair"]["path"]) / "manifest.json").read_text())
    forced = Run(make_config(*overrides, "recompute=[pair]"), tmp_path / "r3").execute()
    assert forced["forced"] == ["pair"] and forced["artifacts"]["pair"]["forced"]
    assert not forced["artifacts"]["pair"]["cached"] and forced["artifacts"]["model"]["cached"]
    assert forced["artifacts"]["pair"]["key"] == first["artifacts"]["pair"]["key"]
    stage_dir = Path(forced["artifacts"]["pair"]["path"])
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["forced_by"] == str((tmp_path / "r3").resolve()) and old_manifest["forced_by"] is None
    assert manifest["started_at"] >= old_manifest["started_at"] and manifest["files"]
    assert sorted(p.name for p in stage_dir.parent.iterdir() if not p.name.endswith(".lock")) == [stage_dir.name]
    with pytest.raises(UserError, match="recompute"):
        Run(make_config(*overrides, "recompute=[nosuch]"), tmp_path / "r4").execute()


def test_recompute_evaluate_covers_its_artifacts():
    from pipeline.orchestration.orchestrate import forced_artifacts
    assert forced_artifacts(["train", "evaluate"]) == ["train", "evaluate", "lm_eval", "eval_suite"]


def test_a_sweep_recomputes_a_shared_artifact_once(tmp_path):
    """Two jobs of one multirun share the pair artifact: recompute=[pair] recomputes it in the first job only."""
    common = ["model=tiny", "logger=none", "data.num_problems=12", "data.num_eval_items=4", "stages=[pair]",
              f"artifacts_dir={tmp_path / 'artifacts'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def pipeline(*args):
        out = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    pipeline(*common, "sweep_name=plain")
    pipeline("--multirun", *common, "recompute=[pair]", "train.lr=0.1,0.2", "sweep_name=forced")
    sweep = next((tmp_path / "runs" / "forced").iterdir())
    records = [json.loads((sweep / job / "run.json").read_text()) for job in ("0", "1")]
    assert [r["artifacts"]["pair"]["cached"] for r in records] == [False, True]
    assert records[0]["artifacts"]["pair"]["key"] == records[1]["artifacts"]["pair"]["key"]
    manifest = json.loads((Path(records[0]["artifacts"]["pair"]["path"]) / "manifest.json").read_text())
    assert manifest["forced_by"] == str(sweep.resolve())


def test_a_forced_recompute_never_leaves_readers_without_the_artifact(tmp_path):
    """The replacement is one atomic exchange: a reader polling the artifact always finds a manifest."""
    from pipeline.store.artifacts import build, forcing

    def compute(workdir: Path) -> None:
        (workdir / "data.txt").write_text("x" * 1000)

    first = build(tmp_path, "adhoc", {}, {}, compute)
    missing, done = [], threading.Event()

    def reader():
        while not done.is_set():
            if not (first.path / "manifest.json").is_file():
                missing.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(15):
            with forcing(["adhoc"], f"invocation-{round_}"):
                assert not build(tmp_path, "adhoc", {}, {}, compute).cached
    finally:
        done.set()
        thread.join()
    assert not missing, f"the artifact was missing {len(missing)} times during forced recomputes"
