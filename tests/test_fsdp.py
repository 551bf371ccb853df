"""train.distributed=fsdp (pipeline/training/sharding.py): the config checks, the plugin, the presets, and real
two-process FSDP2 training (gloo on CPU) checked against a plain single-process run.

The expected numbers come from ONE process with twice the micro-batch: MicroBatchStream then cuts the
same global micro-batches (same permutation, same pairs per optimiser step), and the mean loss over 8
pairs is what two ranks of 4 average their gradients to. So losses, gradient norms and weight updates
must agree to float rounding, although one run is sharded and the other not.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.training import sharding
from pipeline.errors import UserError
from pipeline.stages.train import CRASH_HOOK_ENV
from pipeline.orchestration.validate import validate
from tests.conftest import compose_config
from tests.test_multiprocess import OVERRIDES, launch, only_artifact, only_train_artifact, read_jsonl, stage_lines, weights


# ----------------------------------------------------------------------------- config (fast)

def test_unknown_distributed_value_is_one_line():
    with pytest.raises(UserError, match=r"^train.distributed='zero3': expected one of \['ddp', 'fsdp'\]$"):
        validate(compose_config("train.distributed=zero3"))


def test_fsdp_on_one_process_is_one_line(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match=r"^train.distributed=fsdp: needs a launch of several processes \(got 1\)"):
        validate(compose_config("train.distributed=fsdp"))
    validate(compose_config("train.distributed=fsdp", "stages=[pair,reference]"))  # nothing trains: nothing to refuse
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(compose_config("train.distributed=fsdp"))


def test_missing_or_broken_accelerate_config_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=rf"^train.accelerate_config={missing}: file not found"):
        validate(compose_config("train.distributed=fsdp", f"train.accelerate_config={missing}"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("fsdp_config: [unclosed\n")
    with pytest.raises(UserError, match=r"not valid YAML at line"):
        validate(compose_config("train.distributed=fsdp", f"train.accelerate_config={broken}"))
    fixed = tmp_path / "ac.yaml"
    fixed.write_text("fsdp_config:\n  fsdp_activation_checkpointing: true\n")
    with pytest.raises(UserError, match=r"fsdp_activation_checkpointing=True is fixed by the pipeline .*model.gradient_checkpointing"):
        validate(compose_config("train.distributed=fsdp", f"train.accelerate_config={fixed}"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("fsdp_config:\n  fsdp_min_num_params: 10\n")
    with pytest.raises(UserError, match=r"fsdp_config.fsdp_min_num_params is not passed through"):
        validate(compose_config("train.distributed=fsdp", f"train.accelerate_config={unknown}"))
    with pytest.raises(UserError, match=r"read only with train.distributed=fsdp"):
        validate(compose_config(f"train.accelerate_config={unknown}"))


def test_accelerate_config_settings_pass_through(tmp_path):
    path = tmp_path / "ac.yaml"  # the layout `accelerate config` writes
    path.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n"
                    "  fsdp_version: 2\n  fsdp_offload_params: true\n  fsdp_reshard_after_forward: false\n"
                    "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n  fsdp_state_dict_type: FULL_STATE_DICT\n")
    assert sharding.accelerate_settings(path) == {"cpu_offload": True, "reshard_after_forward": False,
                                                  "transformer_cls_names_to_wrap": ["LlamaDecoderLayer"]}


def test_plugin_shards_fully_keeps_fp32_and_wraps_the_models_layers(tiny_model_artifact, tiny_model_cfg, tmp_path):
    from torch.distributed.fsdp import CPUOffloadPolicy
    from pipeline.modeling.models import load_causal_lm
    model = load_causal_lm(tiny_model_artifact, tiny_model_cfg, trainable=True)
    cfg = OmegaConf.create({"train": {"distributed": "fsdp", "accelerate_config": None}})
    plugin = sharding.build_plugin(cfg, model)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full sharding (FSDP2's FULL_SHARD)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]  # from the model, not hard-coded
    policy = plugin.mixed_precision_policy
    assert policy.param_dtype == torch.float32 and policy.reduce_dtype == torch.float32  # fp32 master and compute weights
    assert plugin.activation_checkpointing is False and not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    path = tmp_path / "ac.yaml"
    path.write_text("fsdp_config:\n  fsdp_offload_params: true\n")
    offloaded = sharding.build_plugin(OmegaConf.create({"train": {"accelerate_config": str(path)}}), model)
    assert isinstance(offloaded.cpu_offload, CPUOffloadPolicy)


def test_presets_compose_and_are_fsdp():
    cfg = compose_config("model=qwen2_5_72b", "train=fsdp_8gpu")
    assert cfg.model.hub_id == "Qwen/Qwen2.5-72B-Instruct" and cfg.model.gradient_checkpointing is True
    assert cfg.train.distributed == "fsdp" and cfg.train.precision == "bf16" and cfg.train.batch_size == 1
    assert cfg.train.grad_accumulation > 1
    lora = compose_config("model=qwen2_5_72b", "train=fsdp_8gpu", "model.lora.enabled=true")
    assert lora.model.lora.enabled is True


# ----------------------------------------------------------------------------- two real ranks (slow)

# A large lr: updates far above rounding; a large adam_eps: AdamW's update of a gradient at rounding level
# (a token seen once, its embedding row's gradient ~1e-9) is then ~lr * g / eps, not ~lr (Adam's m / sqrt(v)
# is +-1 for ANY gradient far below eps=1e-8: a sign flip of rounding noise would move such a weight by lr),
# so weight updates compare the gradients linearly. 31 training pairs in global micro-batches of 8: step 4 takes the
# last 7, split 4 + 3 over the ranks, so the rank with 3 runs one padding forward (FSDP's collectives).
COMMON = (*OVERRIDES, "train.lr=1e-2", "train.adam_eps=1e-3", "pairing.test_fraction=0.3")
SHARDED = (*COMMON, "train.distributed=fsdp")
SINGLE = (*COMMON, "train.batch_size=8")  # one process, the same global micro-batches


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process_and_resume_bit_identically(tmp_path):
    single_root, root = tmp_path / "single", tmp_path / "fsdp"
    alone = launch(single_root, tmp_path / "run0", overrides=SINGLE, processes=1)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    sharded = launch(root, tmp_path / "run1", overrides=SHARDED)
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-3000:]
    assert stage_lines(sharded, "train")[0].endswith("(computed)")

    trained, expected = only_train_artifact(root), only_train_artifact(single_root)
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["config"]["distributed"] == {"mode": "fsdp"} and manifest["config"]["processes"] == 2  # in the key
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["distributed"] == "fsdp" and summary["global_batch"] == 8 and summary["train_pairs"] == 31
    assert not (trained / "checkpoints").exists()

    # Losses and (pre-clipping) gradient norms of every step, then the updates of every weight.
    ours, theirs = read_jsonl(trained / "metrics.jsonl"), read_jsonl(expected / "metrics.jsonl")
    assert [row["step"] for row in ours] == [1, 2, 3, 4]
    for mine, plain in zip(ours, theirs):
        for name in ("train/loss", "train/grad_norm"):
            assert mine[name] == pytest.approx(plain[name], rel=1e-5, abs=1e-6), (mine["step"], name)
    start = weights(only_artifact(root, "model") / "model")
    after, reference = weights(trained / "model"), weights(expected / "model")
    assert after.keys() == reference.keys() == start.keys()
    largest = max(float((reference[name] - start[name]).abs().max()) for name in start)
    assert largest > 1e-3  # the runs moved the weights: the comparison below is not one of two unchanged models
    for name in start:
        assert torch.allclose(after[name] - start[name], reference[name] - start[name], rtol=0, atol=1e-5), name
    # Probe trajectories (every rank scores them under FSDP, the main one writes them).
    probes, plain_probes = read_jsonl(trained / "trajectories.jsonl"), read_jsonl(expected / "trajectories.jsonl")
    assert len(probes) == len(plain_probes) > 0
    for mine, plain in zip(probes, plain_probes):
        assert mine["step"] == plain["step"] and mine["chosen_logp"] == pytest.approx(plain["chosen_logp"], abs=1e-4)

    # Crash after step 3 (full-state checkpoint at step 2), resume: the same weights as the uninterrupted run.
    resumed_root = tmp_path / "resumed"
    shutil.copytree(root, resumed_root, ignore=shutil.ignore_patterns("train"))
    crashed = launch(resumed_root, tmp_path / "run2", overrides=SHARDED, **{CRASH_HOOK_ENV: "3"})
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stderr
    assert (resumed_root / "train" / f"{trained.name}.partial" / "checkpoints" / "state.safetensors").is_file()
    resumed = launch(resumed_root, tmp_path / "run3", overrides=SHARDED)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished = only_train_artifact(resumed_root)
    assert finished.name == trained.name
    assert json.loads((finished / "manifest.json").read_text())["resumed_from_step"] == 2
    timing_free = lambda rows: [{k: v for k, v in row.items() if k != "train/tokens_per_second"} for row in rows]  # noqa: E731
    assert timing_free(read_jsonl(finished / "metrics.jsonl")) == timing_free(ours)
    final = weights(finished / "model")
    assert all(torch.equal(final[name], after[name]) for name in after)
