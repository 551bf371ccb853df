"""Offline-by-default process environment, applied before heavy imports.

Tests, CI and `make` all go through here so that nothing tries the network
unless the user exported the variables themselves (their values win).
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}


def apply_offline_defaults(cache_root: Path | None = None) -> None:
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if cache_root is not None:
        cache_root = Path(cache_root)
        os.environ.setdefault("HF_HOME", str(cache_root / "hf"))
        os.environ.setdefault("WANDB_DIR", str(cache_root / "wandb"))
        os.environ.setdefault("WANDB_CACHE_DIR", str(cache_root / "wandb-cache"))
        os.environ.setdefault("WANDB_CONFIG_DIR", str(cache_root / "wandb-config"))
        os.environ.setdefault("MPLCONFIGDIR", str(cache_root / "matplotlib"))


def env_flag(name: str) -> bool:
    """True when the environment variable is set to 1/true/yes/on (how HF reads its offline flags)."""
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")
