"""Input files are hashed before the store's lock is taken (the hash is part of the artifact key), so a
file rewritten while a run waits for the lock, or while the stage reads it, would be stored under the old
content's key. The stage checks, under the lock, before it reads and again before it publishes, that the
file still has the content its key was computed from; otherwise one line, and nothing is published."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError


def require_content(path: str | Path, fingerprint: str, when: str) -> None:
    """``fingerprint``: ``sha256:<hex>`` of the file when the key was computed."""
    from pipeline.store.artifacts import sha256_file
    location = Path(path).expanduser()
    try:
        now = "sha256:" + sha256_file(location)
    except OSError as error:
        raise UserError(f"data.path={path}: cannot read it {when} ({error.strerror})") from None
    if now != fingerprint:
        raise UserError(f"data.path={path}: the file changed {when} (its content no longer matches the hash the "
                        "artifact key was computed from); nothing was stored; rerun once the file is complete")
