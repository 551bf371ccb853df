"""Reading a published artifact's file that turns out damaged: one line, and the artifact is retired.

``artifacts.find`` checks sizes always but hashes only files up to 1 MiB (``store_verify=small``), so a
large file overwritten in place after publication (same size, other bytes) is found and handed to a
reader, which fails deep inside Arrow or safetensors, and would fail the same way on every rerun. A
reader that fails on an artifact file compares the file with its manifest: when the sha256 differs,
the manifest is moved aside (``manifest.json.damaged``: a folder without a manifest is not an artifact,
so the next run recomputes it under the lock) and the run stops with one line naming the file. A file
that matches its manifest and still fails to read is a bug: its error is raised as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, TypeVar

from pipeline.errors import UserError

T = TypeVar("T")
DAMAGED_SUFFIX = ".damaged"


def owning_artifact(path: Path) -> Path | None:
    """The artifact folder (the nearest one holding manifest.json) that ``path`` lies in."""
    from pipeline.store.artifacts import MANIFEST
    for folder in Path(path).parents:
        if (folder / MANIFEST).is_file():
            return folder
    return None


def damage(path: Path) -> tuple[Path, str] | None:
    """(artifact folder, what differs) when ``path`` no longer matches its manifest entry, else None."""
    from pipeline.store.artifacts import MANIFEST, sha256_file
    folder = owning_artifact(path)
    if folder is None:
        return None
    try:
        entries = {e["path"]: e for e in json.loads((folder / MANIFEST).read_text())["files"]}
        entry = entries[str(Path(path).relative_to(folder))]
        if Path(path).stat().st_size != entry["bytes"]:
            return folder, f"has {Path(path).stat().st_size} bytes, the manifest says {entry['bytes']}"
        if sha256_file(Path(path)) != entry["sha256"]:
            return folder, "differs from its sha256 in the manifest (overwritten after it was published)"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def read_artifact_file(path: Path | str, read: Callable[[Path], T]) -> T:
    """``read(path)``; a failure on a file that differs from its manifest becomes one line (see module doc)."""
    path = Path(path)
    try:
        return read(path)
    except UserError:
        raise
    except Exception as error:
        found = damage(path)
        if found is None:
            raise
        folder, problem = found
        from pipeline.store.artifacts import MANIFEST
        try:
            os.replace(folder / MANIFEST, folder / (MANIFEST + DAMAGED_SUFFIX))
            outcome = "the artifact is retired and the next run recomputes it"
        except OSError:
            outcome = f"remove {folder} and rerun"
        raise UserError(f"{path}: cannot be read ({type(error).__name__}); it {problem}; {outcome}") from None
