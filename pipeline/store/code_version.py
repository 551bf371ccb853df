"""What computes a stage: its modules' source and the libraries its numbers depend on, as one hash.

A stage's artifact key includes ``code_identity(stage)``: a sha256 over the source of the stage's
module and every project module it imports (their syntax trees: comments and docstrings do not
count), transitively (the import closure inside the
``pipeline`` and ``analysis`` packages, read from the code with ``ast``: imports inside functions,
relative imports, ``from pipeline import x`` and ``importlib.import_module("pipeline.x")`` with a
literal name included; the ``__init__`` of every package on the way, which runs on import), plus
the versions of the libraries listed for that stage. Editing a loss therefore recomputes training
and, through the upstream keys, everything downstream of it, and nothing upstream; editing the
README or a test recomputes nothing. Editing a module every stage imports (``pipeline/store/artifacts.py``,
``pipeline/errors.py``) recomputes everything: conservative, never stale.

Modules are found on disk from the packages' folders, never imported: the closure of every stage
costs milliseconds and loads no library. Computed once per process.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "analysis")
# The module whose ``build`` call computes each stage's artifact (``artifacts.build`` looks it up; a
# project module that builds a stage missing here is stopped: its key would not follow its code).
STAGE_MODULES = {
    "model": "pipeline.stages.model", "pair": "pipeline.stages.pair", "reference": "pipeline.stages.reference",
    "train": "pipeline.stages.train", "eval_suite": "pipeline.evaluation.eval_suite",
    "evaluate": "pipeline.stages.evaluate", "lm_eval": "pipeline.stages.evaluate", "analyse": "pipeline.stages.analyse",
}
# Libraries whose behaviour changes a stage's numbers (their versions enter its key).
STAGE_LIBRARIES = {
    "model": ("torch", "transformers", "tokenizers", "gguf", "safetensors"),
    "pair": ("tokenizers", "transformers", "rapidfuzz", "numpy", "pandas", "pyarrow", "datasets"),
    "reference": ("torch", "transformers", "tokenizers"),
    "train": ("torch", "transformers", "tokenizers", "accelerate", "peft"),
    "eval_suite": ("lm-eval",),
    "evaluate": ("torch", "transformers", "tokenizers", "lm-eval", "datasets"),
    "lm_eval": ("torch", "transformers", "tokenizers", "lm-eval", "datasets"),
    "analyse": ("numpy", "pandas", "matplotlib"),
}


@lru_cache(maxsize=None)
def _package_dir(package: str) -> Path | None:
    """Folder of a top-level project package (find_spec of a top-level name imports nothing)."""
    if package not in PROJECT_PACKAGES:
        return None
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


@lru_cache(maxsize=None)
def _source_file(module: str) -> Path | None:
    """The .py file of a project module (a package's ``__init__.py``), or None (not a module of ours)."""
    top, *rest = module.split(".")
    root = _package_dir(top)
    if root is None or not all(part.isidentifier() for part in rest):
        return None
    base = root.joinpath(*rest)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if rest and base.with_suffix(".py").is_file() else None


def _statements(nodes: list[ast.AST]):
    """Every statement, nested ones included (an import is a statement: expressions never hold one)."""
    for node in nodes:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, field, None) or [])


@lru_cache(maxsize=None)
def _imported(module: str, path: Path) -> frozenset[str]:
    """Project modules named by the import statements of one file (anywhere in it, functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    found: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pipeline import losses`
    if "import_module" in source:  # importlib.import_module("pipeline.x") with a literal name
        found.update(node.args[0].value for node in ast.walk(tree)
                     if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                     and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))
    modules = set()
    for name in found:
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(name for name in modules if _source_file(name) is not None)


@lru_cache(maxsize=None)
def import_closure(module: str) -> tuple[str, ...]:
    """The project modules that run when ``module`` runs: itself and what it imports, transitively."""
    seen: set[str] = set()
    todo = [module] + [module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _source_file(name)
        if path is not None:
            todo.extend(_imported(name, path) - seen)
    return tuple(sorted(name for name in seen if _source_file(name) is not None))


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def code_fingerprint(path: Path) -> bytes:
    """What of a module's source can change a result: its syntax tree without comments, docstrings,
    blank lines or line numbers (rewording documentation keeps every key; any code edit changes it)."""
    tree = _without_docstrings(ast.parse(path.read_text(), filename=str(path)))
    return ast.dump(tree, include_attributes=False).encode()


@lru_cache(maxsize=None)
def library_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: library_version(name) for name in names}


def is_project_module(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in PROJECT_PACKAGES


@lru_cache(maxsize=None)
def code_identity(stage: str) -> dict | None:
    """{"hash", "modules", "libraries"} for a known stage; None for others (ad-hoc stages built by tests)."""
    module = STAGE_MODULES.get(stage)
    if module is None:
        return None
    modules = import_closure(module)
    digest = hashlib.sha256()
    # Contents, not file names: a module moved or renamed with its code unchanged adds nothing new to the key
    # (its importers' import lines still name it, so a move recomputes what imports it, once).
    for fingerprint in sorted(code_fingerprint(_source_file(name)) for name in modules):
        digest.update(fingerprint + b"\0")
    libraries = library_versions(STAGE_LIBRARIES[stage])
    digest.update(repr(sorted(libraries.items())).encode())
    return {"hash": digest.hexdigest()[:16], "modules": list(modules), "libraries": libraries}
