"""``train.distributed=fsdp``: the policy's parameters, gradients and optimiser state sharded over the ranks (FSDP2).

``ddp`` (the default) is whatever the launch gives: one process, or DDP under ``accelerate launch --multi_gpu``.
``fsdp`` shards the model with torch's FSDP2 ``fully_shard``, through accelerate's own FSDP2 recipe
(``accelerate.utils.fsdp2_prepare_model``) applied to the ``FullyShardedDataParallelPlugin`` that
``build_plugin`` makes from the config:

- full sharding (``reshard_after_forward=True``): each decoder layer (the model's ``_no_split_modules``
  classes) is one unit; accelerate puts the final norm and the output head (with the input embedding when
  tied) in a tail unit that stays unsharded after the forward;
- mixed precision keeps fp32 master weights AND fp32 compute weights (``MixedPrecisionPolicy`` with fp32
  params and fp32 gradient reduction); ``train.precision=bf16`` computes in bf16 through autocast, as
  under DDP, so FSDP and DDP runs compute the same numbers and step 0 reproduces the reference stage
  (bf16 all-gathered weights would round the head's weights and the norms' too);
- activation checkpointing is the model's own (``model.gradient_checkpointing``: transformers checkpoints
  each layer's ``forward``, so FSDP2's hooks stay outside it, and keeps the RNG state, so dropout recomputes
  the same mask); the plugin's own checkpoint wrapper (``preserve_rng_state=False``) is not used.

Why the sharding is not left to ``Accelerator(fsdp_plugin=...)``: accelerate 1.15 switches to FSDP only when
its distributed type is MULTI_GPU (or another accelerator); under a CPU launch (MULTI_CPU) it ignores the
plugin without a word and trains unsharded. Applying accelerate's recipe ourselves shards on every device,
and ``shard`` checks afterwards that every parameter IS sharded over the ranks.

The chunked log-prob head (pipeline/modeling/logprob_head.py) reads ``lm_head.weight`` after the model's forward has
returned, outside every FSDP hook. Its forward is fine (the head sits in accelerate's tail unit, which is
not resharded after its forward, so the weight is the all-gathered parameter), but its backward is not: the
backward of another pair of the micro-batch reshards the tail unit first, and the head's backward then read
freed storage ("setStorage: ... out of bounds for storage of size 0"). ``logprob_head.score_sharded`` gathers
the unit again in a gradient hook on the head's outputs; the weight's gradient then accumulates on the
gathered parameter and is reduce-scattered with the unit's (tests/test_fsdp.py: losses, gradient norms and
updates against one process).

Checkpoints (``full_state``/``load_full_state``): full state dicts, gathered to rank 0 and written as the
trainer's one safetensors file (no pickle, the same format as under DDP); on resume every rank reads the
file and keeps its own shard. Full rather than sharded because the file is then independent of the rank
count and of FSDP, and because it is what the existing checkpoint code already writes and tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError

DISTRIBUTED = ("ddp", "fsdp")
# The fsdp_config keys of an accelerate config file (`accelerate config`) that reach the plugin, and the
# plugin field each one sets. The rest of the plugin is the pipeline's (see the module docstring).
PASSED_THROUGH = {
    "fsdp_offload_params": "cpu_offload",
    "fsdp_reshard_after_forward": "reshard_after_forward",
    "fsdp_transformer_layer_cls_to_wrap": "transformer_cls_names_to_wrap",
}
# Keys of an accelerate fsdp_config that are set by the pipeline itself (value accepted only if it agrees).
FIXED = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_state_dict_type": "FULL_STATE_DICT",
         "fsdp_cpu_ram_efficient_loading": False, "fsdp_sync_module_states": None, "fsdp_use_orig_params": None,
         "fsdp_activation_checkpointing": False}


def mode(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "train.distributed", default="ddp") or "ddp")


def is_fsdp(cfg: DictConfig) -> bool:
    return mode(cfg) == "fsdp"


def accelerate_settings(path: Any) -> dict[str, Any]:
    """The plugin fields set by the ``fsdp_config`` of the accelerate config YAML at ``path`` (one line if it
    is missing, does not parse, or sets something the pipeline decides itself)."""
    import yaml
    key = "train.accelerate_config"
    file = Path(os.path.expanduser(str(path)))
    if not file.is_file():
        raise UserError(f"{key}={path}: file not found (expected an accelerate config YAML, e.g. from `accelerate config`)")
    try:
        document = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{key}={path}: not valid YAML{where}") from None
    if not isinstance(document, dict):
        raise UserError(f"{key}={path}: expected a YAML mapping (an accelerate config), got {type(document).__name__}")
    fsdp = document.get("fsdp_config") or {}
    if not isinstance(fsdp, dict):
        raise UserError(f"{key}={path}: fsdp_config must be a mapping of fsdp_* settings")
    settings = {}
    for name, value in fsdp.items():
        if name in PASSED_THROUGH:
            field = PASSED_THROUGH[name]
            if field == "transformer_cls_names_to_wrap" and isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            settings[field] = value
        elif name in FIXED:
            expected = FIXED[name]
            if expected is not None and str(value).upper() != str(expected).upper():
                hint = "; set model.gradient_checkpointing=true instead" if name == "fsdp_activation_checkpointing" else ""
                raise UserError(f"{key}={path}: fsdp_config.{name}={value!r} is fixed by the pipeline to {expected!r}{hint}")
        else:
            raise UserError(f"{key}={path}: fsdp_config.{name} is not passed through; expected only "
                            f"{sorted(PASSED_THROUGH)} (and {sorted(FIXED)} at the pipeline's values)")
    return settings


def check_config(cfg: DictConfig) -> None:
    """``train.distributed`` and ``train.accelerate_config``, before anything loads (pipeline/orchestration/validate.py)."""
    if OmegaConf.select(cfg, "train") is None:
        return
    value = OmegaConf.select(cfg, "train.distributed", default="ddp")
    if value not in DISTRIBUTED:
        raise UserError(f"train.distributed={value!r}: expected one of {list(DISTRIBUTED)}")
    path = OmegaConf.select(cfg, "train.accelerate_config", default=None)
    if path is not None:
        if value != "fsdp":
            raise UserError(f"train.accelerate_config={path}: read only with train.distributed=fsdp "
                            f"(got train.distributed={value}); set train.accelerate_config=null")
        accelerate_settings(path)
    stages = OmegaConf.select(cfg, "stages", default=None)
    if value == "fsdp" and (stages is None or "train" in list(stages)):
        check_processes(int(os.environ.get("WORLD_SIZE", "1")))


def check_processes(processes: int) -> None:
    """FSDP shards over the processes of the launch: one process would train unsharded while claiming FSDP."""
    if processes < 2:
        raise UserError(f"train.distributed=fsdp: needs a launch of several processes (got {processes}); run "
                        "`accelerate launch --multi_gpu --num_processes N -m pipeline ...` or torchrun, "
                        "or set train.distributed=ddp")


# ----------------------------------------------------------------------------- the plugin

def wrap_classes(model: torch.nn.Module) -> list[str]:
    """The transformer-layer class names FSDP wraps one unit each: the model's ``_no_split_modules`` present in it."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(module).__name__ for module in model.modules()}
    found = [name for name in names if name in present]
    if not found:
        raise UserError(f"train.distributed=fsdp: model {type(model).__name__} names no transformer layer class "
                        f"(_no_split_modules={names}); set fsdp_transformer_layer_cls_to_wrap in train.accelerate_config")
    return found


def mixed_precision_policy():
    """fp32 sharded master weights, fp32 all-gathered compute weights, fp32 gradient reduction (bf16 compute,
    when asked, is autocast's: see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=None)


def build_plugin(cfg: DictConfig, model: torch.nn.Module):
    """accelerate's ``FullyShardedDataParallelPlugin`` (FSDP2) for this run, with the passed-through settings."""
    from accelerate import FullyShardedDataParallelPlugin
    settings = {"fsdp_version": 2, "reshard_after_forward": True, "auto_wrap_policy": "transformer_based_wrap",
                "transformer_cls_names_to_wrap": wrap_classes(model), "mixed_precision_policy": mixed_precision_policy(),
                "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": False, "cpu_ram_efficient_loading": False,
                "cpu_offload": False}
    path = OmegaConf.select(cfg, "train.accelerate_config", default=None)
    if path is not None:
        settings.update(accelerate_settings(path))
    return FullyShardedDataParallelPlugin(**settings)


# ----------------------------------------------------------------------------- sharding

def shard(model: torch.nn.Module, plugin, device: torch.device, is_main: bool = True) -> torch.nn.Module:
    """``model`` sharded in place by accelerate's FSDP2 recipe with ``plugin``; every parameter checked sharded.

    accelerate's ``fsdp2_prepare_model`` reads what it needs of an ``Accelerator`` (the plugin, the device
    mesh, the mixed precision setting); it gets exactly that, so the same recipe runs on CPU (gloo) and GPU.
    Build the optimiser AFTER this: the parameters are replaced by sharded DTensors."""
    from accelerate.utils import fsdp2_prepare_model
    from torch.distributed.tensor import DTensor

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        check_processes(1)
    processes = torch.distributed.get_world_size()
    check_processes(processes)
    view = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, parallelism_config=None,
                           mixed_precision="no", is_main_process=is_main, device=device)
    model = fsdp2_prepare_model(view, model.to(device))
    unsharded = [name for name, p in model.named_parameters()
                 if not (isinstance(p, DTensor) and p.device_mesh.size() == processes)]
    if unsharded:  # never train unsharded while the run says FSDP
        raise RuntimeError(f"train.distributed=fsdp: parameters not sharded over {processes} ranks: {unsharded[:3]}")
    return model


def autocast_forward(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """bf16 autocast around the model's forward (what ``accelerator.prepare`` does under DDP), hooks outside it."""
    if precision != "bf16":
        return
    forward = model.forward

    def autocast(*args, **kwargs):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global gradient norm over every rank's shards (clipped to ``max_norm``), as a plain tensor."""
    from torch.distributed.tensor import DTensor
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------- checkpoints

def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_state(model: torch.nn.Module, optimizer=None, trainable_only: bool = True) -> tuple[dict, dict | None]:
    """(full model state dict, full optimiser state dict) on rank 0 (empty elsewhere); a collective: every rank calls it.

    The optimiser's state is keyed by parameter name (torch.distributed.checkpoint's layout), so it loads
    into any sharding of the same model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    weights = get_model_state_dict(model, options=_options())
    if trainable_only:
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        weights = {name: value for name, value in weights.items() if name in names}
    optim = get_optimizer_state_dict(model, optimizer, options=_options()) if optimizer is not None else None
    return weights, optim


def load_full_state(model: torch.nn.Module, optimizer, weights: dict, optim: dict) -> None:
    """Every rank: ``full_state``'s dicts (read from the checkpoint file) back into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
