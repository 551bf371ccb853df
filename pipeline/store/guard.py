"""What the artifact store refuses to trust: names, leftovers and links it did not make itself.

The store is shared and writable by people and by other jobs, so nothing found in it is taken on its
folder name alone:

- a published artifact must prove its key: its manifest names the stage and key of the folder it is in,
  and hashing the manifest's own stage, config, upstream keys and code gives that key again (a folder
  copied or renamed under another key fails this);
- a leftover ``<key>.partial`` folder keeps only the state its stage resumes from (``keep``); every
  other file in it (a planted adapter or task file, a stale half-written output) is deleted before
  the stage runs, so only files the stage writes can reach the manifest;
- symbolic links are never followed: a link in place of an artifact folder, a ``.partial`` folder or
  a lock is removed (the link, never its target), a link inside an artifact makes it absent, and a
  link inside a folder about to be published is removed, so nothing is written or published from
  outside the store root.

Each refusal is one ``[store]`` line naming the path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import UserError


def say(message: str) -> None:
    print(f"[store] {message}", flush=True)


def symlinks_under(directory: Path) -> list[str]:
    """Relative paths of the symbolic links below ``directory`` (links to folders are not entered)."""
    found = []
    for parent, folders, files in os.walk(directory, followlinks=False):
        for name in folders + files:
            path = Path(parent) / name
            if path.is_symlink():
                found.append(str(path.relative_to(directory)))
    return sorted(found)


def identity_problem(path: Path, manifest: dict[str, Any], key_of) -> str | None:
    """Why the manifest in ``path`` (``<stage>/<key>``) was not written for that stage and key, or None.

    ``key_of(stage, config, upstream, code)`` is the store's key function: the manifest's own inputs
    must hash to the folder's name, so an edited config cannot keep a key either."""
    stage, key = path.parent.name, path.name
    if manifest.get("stage") != stage or manifest.get("key") != key:
        return (f"its manifest was written for {manifest.get('stage')}/{manifest.get('key')} "
                "(a copied or renamed folder); refused")
    try:
        recomputed = key_of(stage, manifest["config"], manifest["upstream"], manifest.get("code"))
    except (KeyError, TypeError, AttributeError):
        return "its manifest does not record the config and upstream keys it was computed from; refused"
    if recomputed != key:
        return f"its manifest's config and inputs give key {recomputed}, not {key}; refused"
    return None


def refuse_link(path: Path, what: str) -> None:
    """Remove a symbolic link standing where the store keeps ``what`` (the link only, never its target)."""
    if path.is_symlink():
        say(f"{path}: a symbolic link in place of {what}; the link is removed, its target left alone")
        path.unlink()


def check_inside(root: Path, path: Path) -> None:
    """Refuse to write through a stage folder that is a link out of the store (the root itself may be a link)."""
    if path.is_symlink():
        raise UserError(f"{path}: the stage folder is a symbolic link (to {os.readlink(path)}); the store writes only "
                        f"inside {root}: replace the link with a folder")


def prune_partial(workdir: Path, keep: Iterable[str] | None) -> None:
    """Delete from a leftover ``.partial`` folder everything but the resumable state ``keep`` (names of
    files or folders at its top; None: all of it) and every symbolic link anywhere in it; one line lists
    what went."""
    removed = []
    for link in symlinks_under(workdir):
        (workdir / link).unlink()
        removed.append(link)
    for path in sorted(workdir.iterdir()):
        if keep is None or path.name in keep:
            continue
        removed.append(path.name + ("/" if path.is_dir() else ""))
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
        say(f"{workdir}: removed {shown}: not state the stage resumes from")


def drop_links_before_publishing(workdir: Path) -> None:
    for link in symlinks_under(workdir):
        say(f"{workdir / link}: a symbolic link is never published; removed")
        (workdir / link).unlink()


STORAGE_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is exceeded", "EACCES": "permission denied",
                  "EPERM": "operation not permitted", "EROFS": "the filesystem is read-only"}


def storage_problem(error: OSError, workdir: Path, what: str, kept: bool) -> UserError | None:
    """One line for a full disk or a permission error while a stage writes its artifact (None: another error,
    a bug, raised as it is). ``kept``: the partial folder stays for a resume."""
    import errno as errno_names
    name = errno_names.errorcode.get(error.errno or 0)
    if name not in STORAGE_ERRNOS:
        return None
    where = error.filename or workdir
    after = f"its partial work stays in {workdir} and a rerun resumes" if kept else "nothing was published"
    return UserError(f"{where}: {STORAGE_ERRNOS[name]} ({name}) while computing {what}; {after}; "
                     "free space or fix the permissions, then rerun")
