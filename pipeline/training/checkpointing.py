"""Resumable training state inside the train artifact's partial directory.

A checkpoint holds everything that decides the rest of a run: trainable weights, optimiser and
scheduler state, every RNG (python, numpy, torch, CUDA) and the data-order position (the data order
itself is a pure function of the seed and the epoch, see ``training_loop.MicroBatchStream``). The
per-step logs (``metrics.jsonl``, ``trajectories.jsonl``) are appended as the run goes, so on resume
they are cut back to the checkpoint's step. With all of this restored, a resumed CPU run ends
bit-identical to an uninterrupted one (tests/test_train.py checks it).

Only the latest checkpoint is kept; it is written to a temporary file and renamed, so a crash while
saving leaves the previous one intact.

Nothing is unpickled: the store may be shared, and a pickle placed in it would run code on load. One
safetensors file holds every tensor (weights, optimiser moments, RNG states) and, in its metadata, a
JSON document with everything else, tensors replaced by references to their names. A file that is
not such a checkpoint (an old ``state.pt``, a torn or planted file) is never read as one: the run says
so in one line and starts from step 0.

A checkpoint records the artifact it was written for (``<stage>/<key>`` of its partial folder; the key
covers the config and the code). One found in another artifact's partial folder (copied or renamed
there, say from a run with another learning rate) is not resumed: one line, and training starts over.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "state.safetensors"
STATE_KEY = "prefopt_state"  # metadata entry holding the JSON skeleton


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


def owner(workdir: Path) -> str:
    """The artifact a partial folder is computing: ``<stage>/<key>`` from ``<root>/<stage>/<key>.partial``."""
    workdir = Path(workdir)
    return f"{workdir.parent.name}/{workdir.name.removesuffix('.partial')}"


def checkpoint_path(workdir: Path) -> Path:
    return Path(workdir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def to_skeleton(value: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    """A JSON-able copy of ``value`` with each tensor (or numpy array) moved into ``tensors`` under a
    path-like name and replaced by a reference; tuples and non-string dict keys survive the round trip."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value).astype(np.int64 if value.dtype.kind in "iu" else value.dtype))
        return {"__ndarray__": name, "dtype": value.dtype.str}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {"__dict__": {key: to_skeleton(item, tensors, f"{name}.{key}") for key, item in value.items()}}
        return {"__items__": [[key, to_skeleton(item, tensors, f"{name}.{key}")] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [to_skeleton(item, tensors, f"{name}.{index}") for index, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"checkpoint: cannot store {type(value).__name__} at {name}")


def from_skeleton(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [from_skeleton(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(from_skeleton(item, tensors) for item in value["__tuple__"])
    if "__items__" in value:
        return {key: from_skeleton(item, tensors) for key, item in value["__items__"]}
    return {key: from_skeleton(item, tensors) for key, item in value["__dict__"].items()}


def save_checkpoint(workdir: Path, *, step: int, position: int, model: torch.nn.Module | None, optimizer: Any,
                    scheduler: Any, extra: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """``weights``/``optimizer_state``: already gathered full state dicts (FSDP, pipeline/training/sharding.py) instead of
    ``model``'s trainable parameters and ``optimizer.state_dict()``."""
    path = checkpoint_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "position": position,
        "model": trainable_state(model) if weights is None else weights,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
        "owner": owner(workdir),
    }
    tensors: dict[str, torch.Tensor] = {}
    skeleton = to_skeleton(state, tensors, "state")
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata={STATE_KEY: json.dumps(skeleton)})
    os.replace(temporary, path)  # atomic: the previous checkpoint survives a crash mid-save
    return path


def load_checkpoint(workdir: Path) -> dict[str, Any] | None:
    """The saved training state, or None when there is none or the file is not a checkpoint of ours."""
    path = checkpoint_path(workdir)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        state = from_skeleton(json.loads(metadata[STATE_KEY]), tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        print(f"[train] {path}: not a readable checkpoint ({type(error).__name__}); ignored, training starts from step 0",
              flush=True)
        return None
    written_for = state.get("owner") if isinstance(state, dict) else None
    if written_for != owner(workdir):
        print(f"[train] {path}: written for {written_for or 'an unnamed artifact'}, not {owner(workdir)}; "
              "ignored, training starts from step 0", flush=True)
        return None
    return state


def restore_checkpoint(state: dict[str, Any], *, model: torch.nn.Module | None, optimizer: Any, scheduler: Any) -> None:
    """Put weights, optimiser, scheduler and RNGs back exactly as they were when ``state`` was saved
    (``model`` and ``optimizer`` None: the caller restored them, e.g. into FSDP shards)."""
    if model is not None:
        restore_weights(state, model)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])


def restore_weights(state: dict[str, Any], model: torch.nn.Module) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(state["model"]) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise RuntimeError(f"checkpoint does not match the model's trainable parameters: {missing[:5]}")
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value.to(params[name].device))


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
