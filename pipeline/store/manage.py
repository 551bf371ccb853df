"""See and manage the artifact store: ``python -m pipeline.store list|show|rm|gc``.

- ``list``: every artifact with stage, key, size, age, a config summary and how many runs use it.
- ``show KEY``: one artifact's manifest summary, files, what it depends on and what depends on it.
- ``rm KEY``: remove an artifact and everything computed from it (dry run unless ``--yes``).
- ``gc``: remove artifacts that no run record uses, directly or as an input of one it uses
  (dry run unless ``--yes``); leftover ``.partial`` folders of finished work are listed too.

Reads only ``<store>/<stage>/<key>/manifest.json`` and the run records ``<runs>/**/run.json``; a run
uses an artifact when its record names the key. Nothing is removed without ``--yes``. A run record that
cannot be read (torn, unreadable) might name any artifact: while one exists ``gc`` removes no artifact
and says which record to fix or delete. Nothing is removed while a process holds its lock (a job
computing or recomputing it): its work folder and artifact are skipped with a line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pipeline.store.artifacts import MANIFEST
from pipeline.errors import UserError


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]
    inputs: set[str] = field(default_factory=set)  # keys this artifact was computed from
    runs: set[str] = field(default_factory=set)  # run folders whose record names it

    @property
    def size(self) -> int:
        return sum(int(f.get("bytes", 0)) for f in self.manifest.get("files", []))

    @property
    def started(self) -> float:
        try:
            return time.mktime(time.strptime(self.manifest["started_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        except (KeyError, ValueError):
            return self.path.stat().st_mtime


def input_keys(manifest: dict[str, Any]) -> set[str]:
    """Upstream keys, plus artifacts a manifest names beside them (an evaluation's baseline and suite)."""
    keys = set(manifest.get("upstream", {}).values())
    keys |= {v["key"] for v in manifest.values() if isinstance(v, dict) and isinstance(v.get("key"), str)}
    return keys - {manifest.get("key")}


def scan(root: Path, runs_root: Path, unreadable: list[str] | None = None) -> dict[str, Entry]:
    """Every artifact with the runs that use it; ``unreadable`` collects run records that could not be read."""
    entries: dict[str, Entry] = {}
    for manifest_path in sorted(root.glob(f"*/*/{MANIFEST}")):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            print(f"[store] {manifest_path}: unreadable manifest, skipped", file=sys.stderr)
            continue
        path = manifest_path.parent
        entries[path.name] = Entry(path.parent.name, path.name, path, manifest, input_keys(manifest))
    for record_path in sorted(runs_root.glob("**/run.json")) if runs_root.is_dir() else []:
        try:
            record = json.loads(record_path.read_text())
            used_artifacts = record.get("artifacts", {}).values()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            if unreadable is not None:
                unreadable.append(f"{record_path} ({type(error).__name__})")
            continue
        for used in used_artifacts:
            if isinstance(used, dict) and used.get("key") in entries:
                entries[used["key"]].runs.add(str(record_path.parent))
    return entries


def summary(entry: Entry) -> str:
    """A few words on what the artifact holds, from its config subset."""
    config, stage = entry.manifest.get("config", {}), entry.stage
    get = lambda *path: _dig(config, path)  # noqa: E731
    if stage == "model":
        source = get("source") or {}
        return " ".join(str(source.get(k)) for k in ("kind", "hub_id", "package", "revision") if source.get(k))
    if stage == "pair":
        return f"{get('data', 'name')} ({get('data', 'source')}), unit {get('pairing', 'unit')}"
    if stage == "reference":
        return f"max_length {get('max_length')}, {get('precision')}"
    if stage == "train":
        method = get("method") or {}
        params = ", ".join(f"{k}={v}" for k, v in method.items() if k not in ("name", "loss") and not isinstance(v, bool))
        return f"{method.get('name')} ({params}), seed {get('seed')}, steps {get('train', 'max_steps')}"
    if stage == "evaluate":
        return f"{entry.manifest.get('model', '?')} model, suite {get('eval', 'suite')}, limit {get('eval', 'limit')}"
    if stage == "lm_eval":
        arguments = get("arguments") or {}
        return f"{entry.manifest.get('model', '?')} model, tasks {', '.join(get('tasks') or [])}, limit {arguments.get('limit')}"
    if stage == "analyse":
        return f"report of {get('method', 'name')}"
    if stage == "eval_suite":
        return "tasks " + ", ".join(sorted(get("tasks") or {}))
    return ", ".join(f"{k}" for k in list(config)[:4])


def _dig(value: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def dependents(entries: dict[str, Entry], key: str) -> list[str]:
    """``key`` and every artifact computed from it, transitively."""
    found, frontier = [key], [key]
    while frontier:
        current = frontier.pop()
        for other in entries.values():
            if current in other.inputs and other.key not in found:
                found.append(other.key)
                frontier.append(other.key)
    return found


def needed(entries: dict[str, Entry]) -> set[str]:
    """Artifacts some run record uses, and everything those were computed from."""
    keep = {key for key, entry in entries.items() if entry.runs}
    frontier = list(keep)
    while frontier:
        for key in entries[frontier.pop()].inputs:
            if key in entries and key not in keep:
                keep.add(key)
                frontier.append(key)
    return keep


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def find_entry(entries: dict[str, Entry], prefix: str) -> Entry:
    matches = [key for key in entries if key.startswith(prefix)]
    if len(matches) != 1:
        raise UserError(f"key {prefix!r}: {'no artifact has it' if not matches else f'matches {sorted(matches)}'} "
                        "(`python -m pipeline.store list` shows the keys)")
    return entries[matches[0]]


def lock_is_held(lock_path: Path) -> bool:
    """Whether another process holds an artifact's lock now (it is computing or replacing it)."""
    if not lock_path.exists():
        return False
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def remove_unlocked(path: Path, lock_path: Path) -> bool:
    """Remove ``path`` while holding its artifact's lock; False (nothing removed) when a process holds it."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"skipped {path}: a process holds its lock {lock_path} (it is computing there)")
        return False
    try:
        if path.is_symlink():
            path.unlink()  # the link, never what it points to
        else:
            shutil.rmtree(path)
    finally:
        lock.release()
    return True


def remove(entries: dict[str, Entry], keys: list[str], yes: bool, why: str) -> int:
    verb = "removing" if yes else "would remove"
    removed = []
    for key in keys:
        entry = entries[key]
        lock_path = entry.path.parent / f"{key}.lock"
        if lock_is_held(lock_path):
            print(f"skipped {entry.stage}/{key}: a process holds its lock {lock_path} (it is computing it)")
            continue
        print(f"{verb} {entry.stage}/{key}  {human(entry.size)}  {summary(entry)}")
        if not yes or remove_unlocked(entry.path, lock_path):
            removed.append(key)
    total = sum(entries[k].size for k in removed)
    print(f"{'removed' if yes else 'dry run:'} {len(removed)} artifact(s), {human(total)} {why}"
          + ("" if yes else "; add --yes to remove them"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="artifacts", help="the artifact store (default: artifacts)")
    parser.add_argument("--runs", default="runs", help="folder of run records to count users from (default: runs)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every artifact with stage, key, size, age, summary and users")
    listing.add_argument("--stage", help="only this stage")
    commands.add_parser("show", help="one artifact in detail").add_argument("key")
    rm = commands.add_parser("rm", help="remove an artifact and everything computed from it")
    rm.add_argument("key")
    rm.add_argument("--yes", action="store_true", help="really remove (default: dry run)")
    gc = commands.add_parser("gc", help="remove artifacts no run record uses")
    gc.add_argument("--yes", action="store_true", help="really remove (default: dry run)")
    args = parser.parse_args(argv)
    root, runs_root = Path(args.root), Path(args.runs)
    if not root.is_dir():
        raise UserError(f"--root {root}: no artifact store there (a folder with <stage>/<key>/manifest.json)")
    unreadable: list[str] = []
    entries = scan(root, runs_root, unreadable)
    now = time.time()
    if args.command == "list":
        shown = [e for e in entries.values() if not args.stage or e.stage == args.stage]
        print(f"{'stage':<10} {'key':<12} {'size':>9} {'age':>5} {'runs':>4}  summary")
        for e in sorted(shown, key=lambda e: (e.stage, e.started)):
            print(f"{e.stage:<10} {e.key:<12} {human(e.size):>9} {age(now - e.started):>5} {len(e.runs):>4}  {summary(e)}")
        print(f"{len(shown)} artifact(s), {human(sum(e.size for e in shown))} in {root}")
    elif args.command == "show":
        e = find_entry(entries, args.key)
        print(f"{e.stage}/{e.key}  {e.path}\n  {summary(e)}\n  size {human(e.size)}, started {e.manifest.get('started_at')}, "
              f"wall {e.manifest.get('wall_time_s')} s, git {e.manifest.get('git', {}).get('commit')}")
        print("  inputs: " + (", ".join(f"{entries[k].stage}/{k}" if k in entries else f"{k} (missing)"
                                        for k in sorted(e.inputs)) or "none"))
        print("  used by: " + (", ".join(f"{entries[k].stage}/{k}" for k in dependents(entries, e.key)[1:]) or "nothing"))
        print("  runs: " + (", ".join(sorted(e.runs)) or "none"))
        for f in e.manifest.get("files", []):
            print(f"    {f['path']}  {human(f['bytes'])}")
    elif args.command == "rm":
        e = find_entry(entries, args.key)
        return remove(entries, dependents(entries, e.key), args.yes, f"({e.stage}/{e.key} and what was computed from it)")
    else:
        keep = needed(entries)
        unused = [k for k in entries if k not in keep]
        for record in unreadable:  # it may name any artifact: keep them all until it is fixed or deleted
            print(f"warning: run record {record} cannot be read; gc keeps every artifact until it is fixed or removed")
        if unreadable:
            unused = []
        partial = sorted(p for p in root.glob("*/*.partial") if (p.parent / p.name.removesuffix(".partial")).is_dir())
        for p in partial:
            lock_path = p.parent / f"{p.name.removesuffix('.partial')}.lock"
            if lock_is_held(lock_path):  # a recompute (recompute=[...]) is working there
                print(f"skipped {p}: a process holds its lock {lock_path} (it is computing there)")
                continue
            print(f"{'removing' if args.yes else 'would remove'} leftover {p}")
            if args.yes:
                remove_unlocked(p, lock_path)
        return remove(entries, unused, args.yes, f"that no run record under {runs_root} uses")
    return 0

