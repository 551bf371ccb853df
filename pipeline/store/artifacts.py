"""Content-addressed artifact store.

Every stage writes into ``<root>/<stage>/<key>/``. The key is a short hash of
(stage, the code that computes it — ``pipeline.store.code_version.code_identity``: its modules' import
closure and the library versions its numbers depend on —, the config subset the stage reads,
upstream keys), so a sweep shares every artifact whose inputs agree, a rerun skips finished work,
and editing the code recomputes exactly what depends on it. Numbers are canonical in the key
(``beta=1`` and ``beta=1.0`` are one key). Logger settings, labels, paths and sweep names must
never enter a config subset. ``forcing(stages, invocation)`` recomputes named stages even when their
artifact exists (``recompute=[...]``): the new one replaces the old under the same key (so downstream
keys do not change and downstream stages are not recomputed unless named too), once per command.

There is no hand-bumped version in the key any more: the code identity replaces it. Readers need no
schema version either: an artifact's files are read only by the code whose hash is in its key.

A stage computes into ``<root>/<stage>/<key>.partial/`` under a file lock and the
directory is renamed into place only after ``manifest.json`` is written: a
directory without a manifest does not exist. The partial directory survives a
crash so that resumable stages (training) can pick up their checkpoints.

A published artifact is checked against its manifest every time it is found: every listed file
present with its size, no file the manifest does not list (a planted task file, say), and the
sha256 of files up to 1 MiB (``store_verify=full`` hashes every file, ``size`` none). A mismatch
makes the artifact absent, with one line saying which file, and the stage recomputes it. So does a
manifest written for another key (a folder copied or renamed: the manifest's own stage, config,
upstream keys and code must hash to the folder's name) and a symbolic link anywhere in the artifact.
A leftover partial folder keeps only the state its stage resumes from (``resumable``: those names);
pipeline/store/guard.py holds these refusals.

A stage that all processes of a distributed launch compute together (DDP training)
uses ``build_collective``: only the main process takes the lock and writes the
manifest; the others compute in the same partial directory and write nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from filelock import FileLock, Timeout

from pipeline.store.code_version import STAGE_MODULES, code_identity, is_project_module
from pipeline.errors import UserError
from pipeline.store import guard as store_guard

MANIFEST = "manifest.json"
KEY_LENGTH = 12
VERIFY_MODES = ("size", "small", "full")  # what ``find`` hashes: nothing, files up to SMALL_FILE_BYTES, everything
SMALL_FILE_BYTES = 1 << 20
LOCK_NOTICE_AFTER_S = 2.0
TRACKED_LIBRARIES = (
    "torch", "transformers", "tokenizers", "accelerate", "datasets", "lm-eval",
    "rapidfuzz", "hydra-core", "peft", "prefopt-pipeline",
)


@dataclass(frozen=True)
class Artifact:
    """A finished artifact: where it lives, its key, and whether this call reused it."""

    stage: str
    key: str
    path: Path
    cached: bool

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())


def canonical(value: Any) -> Any:
    """Equal numbers compare equal: a float with an integral value becomes that int (exact, unlike
    sending every int through float, which would merge integers above 2**53), recursively."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(stage: str, config: dict[str, Any], upstream: dict[str, str], code: dict[str, Any] | None = None) -> str:
    payload = canonical_json({"stage": stage, "code": code and {"hash": code["hash"]}, "config": config,
                              "upstream": upstream})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


_FORCED: dict[str, str] = {}  # stage -> the invocation that forces it


@contextmanager
def forcing(stages: Sequence[str], invocation: str):
    """Within this block, ``build`` recomputes these stages even when their artifact exists.

    ``invocation`` names the command that asked (a run's or a multirun's folder): an artifact it has
    already recomputed (its manifest says ``forced_by``) is reused, so the jobs of one sweep that
    share an artifact recompute it once, not once per job.
    """
    previous = dict(_FORCED)
    _FORCED.update({stage: str(invocation) for stage in stages})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(previous)


def _needs_recompute(existing: Artifact | None, stage: str) -> bool:
    if existing is None:
        return True
    return stage in _FORCED and existing.manifest.get("forced_by") != _FORCED[stage]


def _calling_module() -> str | None:
    """The module that called ``build`` (past this module's own frames)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


def stage_code(stage: str, caller: str | None) -> dict[str, Any] | None:
    """The code identity that enters ``stage``'s key; a project module building an unregistered stage is a bug."""
    if stage not in STAGE_MODULES and is_project_module(caller):
        raise RuntimeError(f"{caller} builds stage {stage!r}, which pipeline/store/code_version.py does not know: add it to "
                           "STAGE_MODULES and STAGE_LIBRARIES so that its key follows its code")
    return code_identity(stage)


def _swap_into_place(workdir: Path, final: Path) -> None:
    """Move ``workdir`` to ``final``; an existing ``final`` (a forced recompute's old artifact, or a
    manifest-less leftover) is exchanged atomically where the filesystem can (renameat2), so readers
    always find a complete artifact there, then deleted."""
    if not final.exists():
        os.replace(workdir, final)
        return
    retired = final.with_name(f"{final.name}.replaced-{os.getpid()}")
    if _exchange(workdir, final):
        os.replace(workdir, retired)  # workdir now holds the old artifact
    else:  # two renames: for an instant there is no artifact (a reader waits on the lock and finds the new one)
        os.replace(final, retired)
        os.replace(workdir, final)
    shutil.rmtree(retired, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout the code runs from (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def row_count(path: Path) -> int | None:
    """Rows of a JSONL or Parquet file (recorded in the manifest so that a published log is checkable)."""
    if path.suffix == ".jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return int(pq.read_metadata(path).num_rows)
    return None


def describe_files(directory: Path) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry = {"path": str(path.relative_to(directory)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        rows = row_count(path)
        if rows is not None:
            entry["rows"] = rows
        files.append(entry)
    return files


_verify_mode = "small"
_reported: set[Path] = set()


@contextmanager
def verifying(mode: str):
    """Within this block ``find`` checks artifacts with ``mode`` (one of ``VERIFY_MODES``)."""
    global _verify_mode
    if mode not in VERIFY_MODES:
        raise UserError(f"store_verify={mode!r}: expected one of {', '.join(VERIFY_MODES)}")
    previous, _verify_mode = _verify_mode, mode
    try:
        yield
    finally:
        _verify_mode = previous


def mismatch(path: Path, mode: str | None = None) -> str | None:
    """Why the files under ``path`` differ from its manifest, or None when they agree."""
    mode = mode or _verify_mode
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = {entry["path"]: entry for entry in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} unreadable"
    links = store_guard.symlinks_under(path)
    if links:
        return f"{links[0]} is a symbolic link; refused"
    problem = store_guard.identity_problem(path, manifest, artifact_key)
    if problem is not None:
        return problem
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    unlisted = sorted(present - set(listed))
    if unlisted:
        return f"{unlisted[0]} is not in the manifest"
    for name, entry in listed.items():
        file = path / name
        if name not in present:
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry.get('bytes')}"
        hashed = mode == "full" or (mode == "small" and entry["bytes"] <= SMALL_FILE_BYTES)
        if hashed and sha256_file(file) != entry.get("sha256"):
            return f"{name} differs from its sha256 in the manifest"
    return None


def find(root: Path, stage: str, key: str) -> Artifact | None:
    """The published artifact, if there is one and its files agree with its manifest."""
    path = Path(root) / stage / key
    if not (path / MANIFEST).is_file():
        return None
    problem = "the folder is a symbolic link; refused" if path.is_symlink() else mismatch(path)
    if problem is not None:
        if path not in _reported:  # once per process, though build looks twice
            _reported.add(path)
            print(f"[store] {stage}/{key}: {problem}; treated as absent and recomputed", flush=True)
        return None
    return Artifact(stage, key, path, cached=True)


@contextmanager
def waiting_lock(lock_path: Path, what: str):
    """The artifact's file lock; says once, after a moment, that another process holds it."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=LOCK_NOTICE_AFTER_S)
    except Timeout:
        print(f"[store] {what}: another process is computing it (lock {lock_path}); waiting for it", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build(
    root: Path | str,
    stage: str,
    config: dict[str, Any],
    upstream: dict[str, Artifact],
    compute: Callable[[Path], dict[str, Any] | None],
    resumable: Sequence[str] | bool = False,
) -> Artifact:
    """Return the artifact for these inputs, computing it with ``compute(workdir)`` if absent.

    ``compute`` writes its files into ``workdir`` and may return extra manifest
    fields (counts, timings). With ``resumable=False`` a leftover partial
    directory from a crashed attempt is wiped first; ``resumable`` names of files or
    folders (checkpoints, per-step logs) are kept in it and handed to ``compute``, so
    checkpoints inside it can be resumed; everything else in it is deleted first.
    """
    root = Path(root)
    upstream_keys = {name: art.key for name, art in sorted(upstream.items())}
    code = stage_code(stage, _calling_module())
    key = artifact_key(stage, config, upstream_keys, code)
    existing = find(root, stage, key)
    if not _needs_recompute(existing, stage):
        return existing
    stage_dir = root / stage
    store_guard.check_inside(root, stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    store_guard.refuse_link(stage_dir / f"{key}.lock", "a lock file")
    with waiting_lock(stage_dir / f"{key}.lock", f"{stage}/{key}"):
        existing = find(root, stage, key)  # another process may have finished (or recomputed) it while we waited
        if not _needs_recompute(existing, stage):
            return existing
        workdir = stage_dir / f"{key}.partial"
        store_guard.refuse_link(workdir, "a work folder")
        store_guard.refuse_link(stage_dir / key, "an artifact folder")
        if workdir.exists() and not resumable:
            shutil.rmtree(workdir)
        elif workdir.exists():  # only the stage's own resumable state survives into the new attempt
            store_guard.prune_partial(workdir, None if resumable is True else resumable)
        workdir.mkdir(exist_ok=True)
        started = time.time()
        try:
            extra = compute(workdir) or {}
        except UserError:
            if not resumable:  # a user mistake: nothing worth keeping, and no empty .partial left behind
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        except OSError as error:  # a full disk or a permission error: one line naming the path
            problem = store_guard.storage_problem(error, workdir, f"{stage}/{key}", kept=bool(resumable))
            if problem is None:
                raise
            if not resumable:
                shutil.rmtree(workdir, ignore_errors=True)
            raise problem from None
        store_guard.drop_links_before_publishing(workdir)
        manifest = {
            "stage": stage,
            "key": key,
            "code": code,
            "forced_by": _FORCED.get(stage),  # the run or sweep folder of a recompute=[...] that made it
            "config": config,
            "upstream": upstream_keys,
            "git": git_state(),
            "libraries": library_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_time_s": round(time.time() - started, 3),
            "files": describe_files(workdir),
            **extra,
        }
        (workdir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        final = stage_dir / key
        _swap_into_place(workdir, final)
    return Artifact(stage, key, final, cached=False)


def build_collective(
    root: Path | str,
    stage: str,
    config: dict[str, Any],
    upstream: dict[str, Artifact],
    compute: Callable[[Path], dict[str, Any] | None],
    *,
    is_main: bool,
    share: Callable[[Any], Any],
    resumable: Sequence[str] | bool = False,
) -> Artifact:
    """``build`` for a stage whose ``compute`` every process must run at once (its collectives need all ranks).

    ``share(value)`` is a broadcast from the main process: every process gets the main's ``value``.
    The main process runs ``build`` and, once it holds the lock and is about to compute, shares the
    work directory; the others run ``compute`` on that directory (it must write nothing there on
    them) or learn that the artifact was already there. A final share of the key is the barrier
    after which every process sees the finished artifact. Taking the lock on every rank instead
    would leave the lock holder alone in its collectives: a deadlock.
    """
    if is_main:
        announced: list[str] = []

        def compute_with_others(workdir: Path) -> dict[str, Any] | None:
            announced.append(share(str(workdir)))
            return compute(workdir)

        artifact = build(root, stage, config, upstream, compute_with_others, resumable)
        if not announced:
            share(None)  # found cached: the others have nothing to compute
        share(artifact.key)
        return artifact
    workdir = share(None)
    if workdir is not None:
        compute(Path(workdir))
    key = share(None)
    artifact = find(root, stage, key)
    if artifact is None:
        raise RuntimeError(f"{Path(root) / stage / key}: the main process finished it but this process does not see it; "
                           "the artifact store must be on a filesystem every process shares")
    return Artifact(stage, key, artifact.path, cached=workdir is None)
