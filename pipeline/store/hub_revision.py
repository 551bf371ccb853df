"""A hub repository's branch or tag, resolved to the commit it points to, for artifact keys.

``model.revision`` and ``data.revision`` name a branch or tag (null = "main") that the hub can move;
the model and pair keys hold the commit sha instead, so new weights or a re-uploaded dataset get a
new key rather than a stale ``cached`` artifact, and the artifact records what it was made from.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.environment import env_flag
from pipeline.errors import UserError

COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_offline(repo_type: str = "model") -> bool:
    return env_flag("HF_HUB_OFFLINE") or (repo_type == "dataset" and env_flag("HF_DATASETS_OFFLINE"))


def cached_commit(repo_id: str, revision: str, repo_type: str = "model") -> str | None:
    """The commit the local HF cache has for this branch or tag (its ``refs/<revision>`` file, written by
    a download) when that snapshot is in the cache too; else None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    ref = repo / "refs" / revision
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    return commit if COMMIT.fullmatch(commit) and (repo / "snapshots" / commit).is_dir() else None


def resolve_revision(repo_id: str, revision: str | None, repo_type: str = "model", key: str = "model.revision") -> str:
    """The commit sha ``revision`` (null = "main") of a hub model or dataset points to.

    A 40-hex revision is already a commit. Online, the hub answers; offline (or when the hub cannot be
    reached) the local HF cache does. Neither: a one-line ``UserError`` naming ``key``.
    """
    revision = str(revision) if revision else "main"
    if COMMIT.fullmatch(revision):
        return revision
    reason = "HF_HUB_OFFLINE=1"
    if not hub_offline(repo_type):
        try:
            from huggingface_hub import HfApi
            api = HfApi()
            info = (api.model_info if repo_type == "model" else api.dataset_info)(repo_id, revision=revision)
            return str(info.sha)
        except Exception as error:  # unreachable, unknown id or revision: the cache may still know it
            reason = f"hub: {type(error).__name__}"
    commit = cached_commit(repo_id, revision, repo_type)
    if commit is not None:
        return commit
    from huggingface_hub import constants
    raise UserError(f"{key}={revision!r} of {repo_type} {repo_id!r}: cannot resolve it to a commit ({reason}) and the "
                    f"local HF cache ({constants.HF_HUB_CACHE}) has no snapshot for it; run once with hub access "
                    f"or set {key} to a 40-character commit sha"
                    + ("; or download the file and use data=local data.path=<file>" if repo_type == "dataset" else ""))
