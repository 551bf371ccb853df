"""Cache keys follow the settings and the code: every config key either changes exactly the keys of the
stages that read it or is listed here as changing none; editing a module recomputes its dependents only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import analyse, eval_suite, evaluate, models, pair, reference, train
from pipeline.artifacts import canonical_json
from pipeline.errors import UserError
from pipeline.orchestrate import Run
from tests.conftest import REPO_ROOT, compose_config

SUBSETS = {"model": lambda c: models.config_subset(c.model), "pair": pair.config_subset,
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
    'data.kind_mix.corrupt_step': {'pair'},
    'data.kind_mix.wrong_solution': {'pair'},
    'data.kind_mix.mc_distractor': {'pair'},
    'pairing.unit': {'pair'},
    'pairing.bucket_edges': {'pair'},
    'pairing.quantiles': {'pair'},
    'pairing.bucket_labels': {'pair'},
    'pairing.bucket_filter': {'analyse', 'train'},
    'pairing.test_fraction': {'pair'},
    'pairing.apply_chat_template': {'pair'},
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
    'train.epochs': set(),
    'train.probe_every': {'train'},
    'train.probe_pairs': {'train'},
    'train.checkpoint_every': set(),
    'train.progress': set(),
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
    'eval.fewshot_as_multiturn': {'evaluate'},
    'eval.fewshot_seed': {'evaluate', 'lm_eval'},
    'logger.name': set(),
    'logger.project': set(),
    'logger.entity': set(),
    'logger.mode': set(),
    'logger.tags': set(),
    'stages': set(),
    'seed': {'analyse', 'pair', 'train'},
    'artifacts_dir': set(),
    'recompute': set(),
    'sweep_name': set(),
}
# With LoRA on, its settings and the frozen base's dtype change what trains (and the scored reference).
WITH_LORA = {**DEFAULT, "model.dtype": {"reference", "train", "evaluate", "lm_eval"}, "model.lora.r": {"train"},
             "model.lora.alpha": {"train"}, "model.lora.dropout": {"train"}, "model.lora.target_modules": {"train"}}


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


def keys_changed_by(overrides: tuple[str, ...], key: str, value) -> set[str]:
    cfg = compose_config(*overrides)
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


@pytest.mark.parametrize("overrides, expected", [((), DEFAULT), (("model.lora.enabled=true",), WITH_LORA)],
                         ids=["default", "lora"])
def test_every_setting_changes_exactly_the_keys_of_the_stages_that_read_it(overrides, expected):
    raw = OmegaConf.to_container(compose_config(*overrides), resolve=False)
    found = dict(leaves(raw))
    assert set(found) == set(expected), f"settings without an entry here: {sorted(set(found) ^ set(expected))}"
    wrong = {key: (sorted(keys_changed_by(overrides, key, value)), sorted(expected[key]))
             for key, value in found.items() if keys_changed_by(overrides, key, value) != expected[key]}
    assert not wrong, f"key -> (stages whose key changed, expected): {wrong}"


def test_equal_numbers_and_labels_share_keys():
    one, one_float = compose_config("method=dpo", "method.beta=1"), compose_config("method=dpo", "method.beta=1.0")
    assert canonical_json(train.config_subset(one)) == canonical_json(train.config_subset(one_float))
    renamed = compose_config("method=dpo", "method.beta=1", "method.name=dpo_again")
    assert canonical_json(train.config_subset(renamed)) == canonical_json(train.config_subset(one))


PROBE = """
import json, sys
from pipeline.code_version import code_identity
print(json.dumps({s: code_identity(s)["hash"] for s in sys.argv[1:]}))
"""
STAGES = ("model", "pair", "reference", "train", "eval_suite", "evaluate", "analyse")


def code_hashes(root: Path) -> dict[str, str]:
    import json
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", PROBE, *STAGES], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_editing_code_recomputes_exactly_what_depends_on_it(tmp_path):
    copy = tmp_path / "repo"
    for name in ("pipeline", "analysis"):
        shutil.copytree(REPO_ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "README.md", copy / "README.md")
    before = code_hashes(copy)
    (copy / "README.md").write_text("edited")
    assert code_hashes(copy) == before
    with (copy / "pipeline" / "losses.py").open("a") as handle:
        handle.write("\nEDITED = True\n")
    after_loss = code_hashes(copy)
    # Only train's code changed; evaluate and analyse recompute through their upstream train key.
    assert {s for s in STAGES if after_loss[s] != before[s]} == {"train"}
    with (copy / "analysis" / "fig_after_diff.py").open("a") as handle:
        handle.write("\nEDITED = True\n")
    after_figure = code_hashes(copy)
    assert {s for s in STAGES if after_figure[s] != after_loss[s]} == {"analyse"}


def test_recompute_forces_a_stage_and_is_recorded(make_config, tmp_path):
    overrides = ("model=tiny", "logger=none", "data.num_problems=12", "data.num_eval_items=4", "stages=[pair]")
    first = Run(make_config(*overrides), tmp_path / "r1").execute()
    again = Run(make_config(*overrides), tmp_path / "r2").execute()
    assert again["artifacts"]["pair"]["cached"]
    forced = Run(make_config(*overrides, "recompute=[pair]"), tmp_path / "r3").execute()
    assert forced["forced"] == ["pair"] and forced["artifacts"]["pair"]["forced"]
    assert not forced["artifacts"]["pair"]["cached"] and forced["artifacts"]["model"]["cached"]
    assert forced["artifacts"]["pair"]["key"] == first["artifacts"]["pair"]["key"]
    manifest = Path(forced["artifacts"]["pair"]["path"]) / "manifest.json"
    assert '"forced": true' in manifest.read_text()
    with pytest.raises(UserError, match="recompute"):
        Run(make_config(*overrides, "recompute=[nosuch]"), tmp_path / "r4").execute()
