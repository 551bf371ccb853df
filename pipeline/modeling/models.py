"""Loading models and tokenizers from a model artifact: dtypes, attention, LoRA, the output head.

The model artifact itself is built by the model stage (pipeline/stages/model.py). Its layout: ``model/``
(HF dir: safetensors, config, tokenizer with chat template and pad token) or ``source.json`` {hub_id,
revision} for hub models loaded in place from the HF cache. Callers use ``model_location``,
``load_tokenizer`` and ``load_causal_lm``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from pipeline.store.artifacts import Artifact
from pipeline.errors import UserError

MODEL_DIR = "model"
SOURCE_FILE = "source.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}











# ---------------------------------------------------------------- sources










ATTENTION = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def attention_setting(model_cfg: DictConfig) -> dict[str, Any]:
    """``model.attn_implementation`` for the keys of the stages that run the model; {} when it is null
    (transformers' default), so setups that leave it unset keep their keys."""
    value = model_cfg.get("attn_implementation")
    if value not in ATTENTION:
        raise UserError(f"model.attn_implementation={value!r}: expected null (transformers' default) or one of "
                        f"{list(ATTENTION[1:])}")
    return {} if value is None else {"attn_implementation": value}


def from_pretrained_safetensors(location: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` that reads safetensors only (a .bin file is a pickle, which
    can run code when loaded), with one line for a repository or folder that has only .bin weights."""
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(location, use_safetensors=True, **kwargs)
    except (OSError, EnvironmentError) as error:
        if "safetensors" not in str(error) or not has_only_bin_weights(location, kwargs.get("revision")):
            raise
        raise UserError(f"{location}: only .bin (pickle) weights, no .safetensors; this pipeline loads safetensors "
                        "only. Pick a revision with safetensors weights or convert them (transformers: "
                        "load once yourself and save_pretrained(..., safe_serialization=True))") from None


def has_only_bin_weights(location: str, revision: str | None) -> bool:
    directory = Path(location)
    if directory.is_dir():
        names = [p.name for p in directory.iterdir()]
    else:
        try:
            from huggingface_hub import list_repo_files
            names = list_repo_files(location, revision=revision)
        except Exception:  # offline or unreachable: the snapshot in the HF cache, if any
            from huggingface_hub import scan_cache_dir
            names = [f.file_name for repo in scan_cache_dir().repos if repo.repo_id == location
                     for rev in repo.revisions for f in rev.files]
    return any(n.endswith(".bin") for n in names) and not any(n.endswith(".safetensors") for n in names)


def ensure_pad_token(tokenizer) -> None:
    # Padding positions are masked out everywhere, so reusing EOS as pad changes no number.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ---------------------------------------------------------------- loading


def model_location(artifact: Artifact) -> str:
    """Local HF directory of a model artifact, or the hub id for models loaded in place."""
    return _location_and_revision(artifact)[0]


def _location_and_revision(target: Artifact | str | Path) -> tuple[str, str | None]:
    if isinstance(target, Artifact):
        directory = Path(target.path) / MODEL_DIR
        if directory.is_dir():
            return str(directory), None
        source_file = Path(target.path) / SOURCE_FILE
        if not source_file.is_file():
            raise UserError(f"{target.path}: neither {MODEL_DIR}/ nor {SOURCE_FILE} found; not a model artifact")
        source = json.loads(source_file.read_text())
        return source["hub_id"], source.get("revision")
    return str(target), None


def load_tokenizer(target: Artifact | str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model artifact (or HF dir / hub id), always with a pad token."""
    from transformers import AutoTokenizer
    location, revision = _location_and_revision(target)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


@contextmanager
def quiet_hf_progress():
    """Silence transformers' per-load 'Loading weights' bars (stages print their own progress)."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"model.dtype={name!r}: expected one of {list(DTYPES)}")
    return DTYPES[name]


def keep_output_head_fp32(model) -> None:
    """Run the vocabulary projection in fp32 even under bf16 autocast.

    bf16 logits are rounded to ~0.1 nats at typical magnitudes, so the same sequence scored in two
    batch layouts (reference stage vs training forward) differed by up to 0.27 nats per sequence at
    step 0, which DPOP's beta * lambda (15) turns into a large spurious gradient. Patching the
    instance's forward keeps state-dict names (and save_pretrained) unchanged.
    """
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            bias = head.bias.float() if head.bias is not None else None
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward


def lora_enabled(model_cfg: DictConfig) -> bool:
    lora = model_cfg.get("lora")
    return bool(lora is not None and lora.get("enabled"))


def policy_dtype(model_cfg: DictConfig) -> str:
    """The dtype the policy's weights train in: fp32 master weights whenever the full model trains.

    Plain AdamW on bf16 weights rounds almost every update away (an update of lr ~ 5e-7 is far below
    bf16's 3 significant digits), so ``model.dtype`` bf16/fp16 only sets how a frozen model loads:
    the base under LoRA (whose adapters are fp32) and evaluation. The forward still runs in bf16 under
    ``train.precision`` autocast. The reference stage loads the same way, so step 0 matches it exactly.
    """
    return str(model_cfg.dtype) if lora_enabled(model_cfg) else "fp32"


def load_causal_lm(target: Artifact | str | Path, model_cfg: DictConfig, dtype: str | torch.dtype | None = None,
                   trainable: bool = False):
    """Load the causal LM from safetensors.

    ``trainable=False``: eval mode, gradients off (a frozen reference). ``trainable=True``: train
    mode, weights in ``policy_dtype`` (fp32 master weights for full fine-tuning), gradient
    checkpointing when ``model.gradient_checkpointing``, LoRA adapters when ``model.lora.enabled``.
    """
    location, revision = _location_and_revision(target)
    if dtype is None:
        dtype = policy_dtype(model_cfg) if trainable else model_cfg.dtype
    with quiet_hf_progress():
        model = from_pretrained_safetensors(location, revision=revision, dtype=torch_dtype(dtype),
                                            trust_remote_code=bool(model_cfg.trust_remote_code),
                                            **attention_setting(model_cfg))
    keep_output_head_fp32(model)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model
    model.train()
    if model_cfg.gradient_checkpointing:
        model.config.use_cache = False  # the KV cache is useless when training and clashes with checkpointing
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = model_cfg.get("lora")
    if lora_enabled(model_cfg):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=int(lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    return model


