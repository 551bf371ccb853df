"""Test environment: offline, W&B disabled, caches in a temp dir; shared fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.gettempdir()) / "prefopt-test-cache"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["WANDB_MODE"] = os.environ.get("PREFOPT_TEST_WANDB_MODE", "disabled")
os.environ.setdefault("HF_HOME", str(_CACHE / "hf"))
os.environ.setdefault("WANDB_DIR", str(_CACHE / "wandb"))
os.environ.setdefault("WANDB_CACHE_DIR", str(_CACHE / "wandb-cache"))
os.environ.setdefault("WANDB_CONFIG_DIR", str(_CACHE / "wandb-config"))
os.environ.setdefault("MPLCONFIGDIR", str(_CACHE / "matplotlib"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402


def compose_config(*overrides: str, config_name: str = "config"):
    """Compose conf/config.yaml with overrides, as `python -m pipeline` would (no Hydra run dir)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def make_config(tmp_path):
    """Config factory whose artifact store is a fresh temp dir: make_config("model=tiny", ...)."""
    def factory(*overrides: str):
        return compose_config(f"artifacts_dir={tmp_path / 'artifacts'}", *overrides)
    return factory


@pytest.fixture(scope="session")
def tiny_model_cfg():
    """conf/model/tiny.yaml as a DictConfig (no full composition needed)."""
    from omegaconf import OmegaConf
    return OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_model_artifact(tmp_path_factory, tiny_model_cfg):
    """The tiny model, built once per test session by the real model stage into a temp store."""
    from omegaconf import OmegaConf
    from pipeline.stages import model as model_stage
    root = tmp_path_factory.mktemp("tiny-model-store")
    return model_stage.run(OmegaConf.create({"model": tiny_model_cfg}), {}, root)
