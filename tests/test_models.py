"""Model stage: the tiny model's determinism and chat template, caching, sources, loading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.modeling import models

from pipeline.stages import model as model_stage
from pipeline.store.artifacts import artifact_key
from pipeline.errors import UserError
from pipeline.modeling.tiny_model import build_tiny_model

from conftest import CONF_DIR


def model_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_tiny_model_is_deterministic_from_seed(tiny_model_cfg):
    model_a, tok_a = build_tiny_model(tiny_model_cfg.tiny)
    model_b, tok_b = build_tiny_model(tiny_model_cfg.tiny)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[name], state_b[name]) for name in state_a)
    other, _ = build_tiny_model(model_cfg("tiny", **{"tiny.seed": 1}).tiny)
    assert not torch.equal(other.state_dict()["model.embed_tokens.weight"], state_a["model.embed_tokens.weight"])
    parameters = sum(p.numel() for p in model_a.parameters())
    assert 50_000 < parameters < 5_000_000


def test_tiny_tokenizer_chat_template_and_special_tokens(tiny_model_artifact):
    tokenizer = models.load_tokenizer(tiny_model_artifact)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Ava has 12 apples."}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nAva has 12 apples.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=True).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # the marker itself, no extra BOS
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1
    assert tokenizer.decode(ids) == text
    digits = tokenizer.convert_ids_to_tokens(tokenizer("x 1234").input_ids)
    assert ["1", "2", "3", "4"] == digits[-4:]  # digits split one by one


def test_model_stage_caches_and_loads(tmp_path, tiny_model_cfg):
    cfg = OmegaConf.create({"model": tiny_model_cfg, "seed": 0})
    first = model_stage.run(cfg, {}, tmp_path)
    assert not first.cached and (first.path / "model" / "model.safetensors").is_file()
    assert (first.path / "model" / "chat_template.jinja").is_file()
    second = model_stage.run(cfg, {}, tmp_path)
    assert second.cached and second.key == first.key
    # The run seed is not part of the model: seed sweeps share one model (and one reference).
    assert model_stage.run(OmegaConf.create({"model": tiny_model_cfg, "seed": 7}), {}, tmp_path).key == first.key
    other = model_stage.run(OmegaConf.create({"model": model_cfg("tiny", **{"tiny.hidden_size": 32})}), {}, tmp_path)
    assert other.key != first.key
    assert models.model_location(first) == str(first.path / "model")
    model = models.load_causal_lm(first, tiny_model_cfg)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert first.manifest["parameters"] == sum(p.numel() for p in model.parameters())
    reference, _ = build_tiny_model(tiny_model_cfg.tiny)
    assert torch.equal(model.state_dict()["lm_head.weight"], reference.state_dict()["lm_head.weight"])


def test_load_causal_lm_trainable_with_checkpointing_and_lora(tiny_model_artifact, tiny_model_cfg):
    cfg = model_cfg("tiny", gradient_checkpointing=True, **{"lora.enabled": True})
    model = models.load_causal_lm(tiny_model_artifact, cfg, dtype="bf16", trainable=True)
    assert model.training and model.is_activation_checkpointing
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert next(model.parameters()).dtype == torch.bfloat16
    full = models.load_causal_lm(tiny_model_artifact, tiny_model_cfg, trainable=True)
    assert all(p.requires_grad for p in full.parameters())


def test_source_resolution(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert model_stage.config_subset(model_cfg("smollm2_135m"))["source"]["kind"] == "gguf"  # the default, online or not
    cfg = model_cfg("smollm2_135m", source="auto")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = model_stage.config_subset(cfg)
    assert offline["source"]["kind"] == "gguf" and offline["source"]["file"].endswith(".gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online = model_stage.config_subset(cfg)
    assert online["source"] == {"kind": "hub", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                "revision": "main", "materialize": True}
    assert artifact_key("model", offline, {}) != artifact_key("model", online, {})
    with pytest.raises(UserError, match="model.source"):
        model_stage.config_subset(model_cfg("tiny", source="somewhere"))


@pytest.mark.parametrize("name", ["mistral_7b", "llama3_8b", "qwen2_5_7b"])
def test_gpu_presets_fail_offline_in_one_line(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_cfg(name)
    assert cfg.dtype == "bf16" and cfg.gradient_checkpointing and not cfg.trust_remote_code
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as error:
        model_stage.run(OmegaConf.create({"model": cfg}), {}, tmp_path)
    assert "\n" not in str(error.value) and cfg.hub_id in str(error.value)


def test_missing_gguf_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_cfg("smollm2_135m", gguf_package="no_such_package_xyz")
    with pytest.raises(UserError, match="no_such_package_xyz"):
        model_stage.run(OmegaConf.create({"model": cfg}), {}, tmp_path)


@pytest.mark.slow
def test_smollm2_gguf_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_cfg("smollm2_135m")
    artifact = model_stage.run(OmegaConf.create({"model": cfg}), {}, tmp_path)
    assert artifact.manifest["parameters"] == 134_515_008  # 134.5M
    assert model_stage.run(OmegaConf.create({"model": cfg}), {}, tmp_path).cached
    tokenizer = models.load_tokenizer(artifact)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    started = time.time()
    model = models.load_causal_lm(artifact, cfg)
    assert time.time() - started < 15  # safetensors reload (~0.2 s idle), not a ~20 s GGUF dequantisation
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


def test_validate_checks_model_keys_before_loading(make_config, monkeypatch):
    from pipeline.orchestration.validate import validate
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    validate(make_config("model=tiny"))
    with pytest.raises(UserError, match="model.dtype"):
        validate(make_config("model=tiny", "model.dtype=fp64"))
    with pytest.raises(UserError, match="model.lora.r"):
        validate(make_config("model=tiny", "model.lora.enabled=true", "model.lora.r=0"))
    with pytest.raises(UserError, match="model.source"):
        validate(make_config("model=tiny", "model.source=ftp"))
    for preset in ("mistral_7b", "llama3_8b", "qwen2_5_7b"):  # valid configs; only the model stage needs the hub
        validate(make_config(f"model={preset}"))


def test_gpu_preset_stops_at_the_model_stage_offline(make_config, tmp_path, monkeypatch):
    from pipeline.orchestration.orchestrate import Run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="mistralai/Mistral-7B-Instruct-v0.2.*HF_HUB_OFFLINE"):
        Run(make_config("model=mistral_7b", "stages=[pair]", "logger=none"), tmp_path / "run").execute()
    assert not (tmp_path / "artifacts" / "pair").exists()  # nothing computed before the model stage failed


def test_a_folder_with_only_bin_weights_stops_with_one_line(tiny_model_artifact, tiny_model_cfg, tmp_path):
    """.bin weights are pickles (they can run code when loaded): the pipeline reads safetensors only and says
    so in one line instead of transformers' traceback."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(Path(tiny_model_artifact.path) / "model")
    out = tmp_path / "bin_only"
    out.mkdir()
    model.config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"bin_only: only \.bin \(pickle\) weights, no \.safetensors"):
        models.load_causal_lm(out, tiny_model_cfg)


def test_attn_implementation_reaches_the_model_and_is_checked(tiny_model_artifact, tiny_model_cfg):
    eager = OmegaConf.merge(tiny_model_cfg, {"attn_implementation": "eager"})
    assert models.load_causal_lm(tiny_model_artifact, eager).config._attn_implementation == "eager"
    assert models.load_causal_lm(tiny_model_artifact, tiny_model_cfg).config._attn_implementation == "sdpa"  # the default
    with pytest.raises(UserError, match=r"model.attn_implementation='fast': expected null"):
        models.load_causal_lm(tiny_model_artifact, OmegaConf.merge(tiny_model_cfg, {"attn_implementation": "fast"}))
