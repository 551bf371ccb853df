"""What computes a stage: its modules' source and the libraries its numbers depend on, as one hash.

A stage's artifact key includes ``code_identity(stage)``: a sha256 over the source of the stage's
module and every project module it imports, transitively (the import closure inside the
``pipeline`` and ``analysis`` packages, read from the code with ``ast``, imports inside functions
included), plus the versions of the libraries listed for that stage. Editing a loss therefore
recomputes training and everything downstream of it, and nothing upstream; editing the README or a
test recomputes nothing. Computed once per process.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "analysis")
STAGE_MODULES = {
    "model": "pipeline.models", "pair": "pipeline.pair", "reference": "pipeline.reference",
    "train": "pipeline.train", "eval_suite": "pipeline.eval_suite", "evaluate": "pipeline.evaluate",
    "lm_eval": "pipeline.evaluate",
    "analyse": "pipeline.analyse",
}
# Libraries whose behaviour changes a stage's numbers (their versions enter its key).
STAGE_LIBRARIES = {
    "model": ("torch", "transformers", "tokenizers", "gguf", "safetensors"),
    "pair": ("tokenizers", "transformers", "rapidfuzz", "pandas", "pyarrow", "datasets"),
    "reference": ("torch", "transformers", "tokenizers"),
    "train": ("torch", "transformers", "tokenizers", "accelerate", "peft"),
    "eval_suite": ("lm-eval",),
    "evaluate": ("torch", "transformers", "tokenizers", "lm-eval", "datasets"),
    "lm_eval": ("torch", "transformers", "tokenizers", "lm-eval", "datasets"),
    "analyse": ("pandas", "matplotlib"),
}


def _source_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imported(module: str, path: Path) -> set[str]:
    """Project modules named by the import statements of one file (anywhere in it)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pipeline import losses`
    return {name for name in found if name.split(".")[0] in PROJECT_PACKAGES and _source_file(name)}


@lru_cache(maxsize=None)
def import_closure(module: str) -> tuple[str, ...]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _source_file(name)
        if path is not None:
            todo.extend(_imported(name, path) - seen)
    return tuple(sorted(seen))


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=None)
def code_identity(stage: str) -> dict | None:
    """{"hash", "modules", "libraries"} for a known stage; None for others (ad-hoc stages in tests)."""
    module = STAGE_MODULES.get(stage)
    if module is None:
        return None
    modules = import_closure(module)
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + _source_file(name).read_bytes() + b"\0")
    libraries = library_versions(STAGE_LIBRARIES.get(stage, ()))
    digest.update(repr(sorted(libraries.items())).encode())
    return {"hash": digest.hexdigest()[:16], "modules": list(modules), "libraries": libraries}
