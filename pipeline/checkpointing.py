"""Resumable training state inside the train artifact's partial directory.

A checkpoint holds everything that decides the rest of a run: trainable weights, optimiser and
scheduler state, every RNG (python, numpy, torch, CUDA) and the data-order position (the data order
itself is a pure function of the seed and the epoch, see ``training_loop.MicroBatchStream``). The
per-step logs (``metrics.jsonl``, ``trajectories.jsonl``) are appended as the run goes, so on resume
they are cut back to the checkpoint's step. With all of this restored, a resumed CPU run ends
bit-identical to an uninterrupted one (tests/test_train.py checks it).

Only the latest checkpoint is kept; it is written to a temporary file and renamed, so a crash while
saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the optimiser changes (all of them, or only LoRA adapters); frozen ones reload from the model artifact."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def checkpoint_path(workdir: Path) -> Path:
    return Path(workdir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def save_checkpoint(workdir: Path, *, step: int, position: int, model: torch.nn.Module, optimizer: Any,
                    scheduler: Any, extra: dict[str, Any] | None = None) -> Path:
    path = checkpoint_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "position": position,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # atomic: the previous checkpoint survives a crash mid-save
    return path


def load_checkpoint(workdir: Path) -> dict[str, Any] | None:
    path = checkpoint_path(workdir)
    if not path.is_file():
        return None
    # weights_only=False: the RNG states hold numpy arrays and Python tuples; the file is our own.
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_checkpoint(state: dict[str, Any], *, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Put weights, optimiser, scheduler and RNGs back exactly as they were when ``state`` was saved."""
    params = dict(model.named_parameters())
    missing = sorted(set(state["model"]) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise RuntimeError(f"checkpoint does not match the model's trainable parameters: {missing[:5]}")
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])


def remove_checkpoints(workdir: Path) -> None:
    shutil.rmtree(Path(workdir) / CHECKPOINT_DIR, ignore_errors=True)


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep only the rows of a per-step JSONL log whose ``step`` is at most ``last_step``; returns the rows kept.

    Rewritten through a temporary file and ``os.replace``: a kill at any moment leaves either the old
    file or the new one, never an empty or half-written log. A torn last line (a kill mid-append) is
    dropped with a note; the rows after the checkpoint are recomputed anyway.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"[train] {path.name} line {number}: incomplete row (interrupted write) dropped on resume", flush=True)
            continue
        if row["step"] <= last_step:
            kept.append(line)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)
    return len(kept)
