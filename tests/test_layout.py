"""The dependency rule of pipeline/ (pipeline/__init__.py), read from the code with ``ast``.

Every import statement counts, those inside functions too: a lazy import still makes the importer depend on
what it imports. A module may import its own package's modules and those of packages of a LOWER rank;
packages of the same rank (training / evaluation) never import each other, a stage never imports another
stage, and no chain of imports leads back to where it started (not even inside one package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower rank = closer to the ground. Modules not listed take their package's rank.
RANKS = {
    "pipeline": 0, "pipeline.errors": 0, "pipeline.environment": 0, "pipeline.interrupts": 0,
    "pipeline.store": 1, "pipeline.data": 2, "pipeline.modeling": 3,
    "pipeline.training": 4, "pipeline.evaluation": 4, "analysis": 5,
    "pipeline.stages": 6, "pipeline.orchestration": 7, "pipeline.__main__": 8,
}
SELF_CONTAINED = ("pipeline.stages",)  # members never import each other


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in ("pipeline", "analysis"):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules one file imports (``from a import b`` names a.b when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {target for target in targets if target in modules and target != name}


def rank_of(module: str) -> tuple[int, str]:
    """(rank, the RANKS entry it falls under): the longest listed prefix. ``pipeline`` covers only the package's
    own ``__init__``: a new top-level module must be given a rank (max() of nothing raises)."""
    owner = max((key for key in RANKS if module == key or (key != "pipeline" and module.startswith(key + "."))), key=len)
    return RANKS[owner], owner


def violations(modules: dict[str, Path]) -> list[str]:
    found = []
    for name, path in sorted(modules.items()):
        rank, owner = rank_of(name)
        for target in sorted(imports_of(name, path, modules)):
            target_rank, target_owner = rank_of(target)
            if target_owner == owner:
                if owner in SELF_CONTAINED and target != owner and name != owner:
                    found.append(f"{name} imports {target}: one stage never imports another")
                continue
            if target_rank >= rank and target_owner != "pipeline":
                found.append(f"{name} (rank {rank}, {owner}) imports {target} (rank {target_rank}, {target_owner})")
    return found


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    graph = {name: sorted(imports_of(name, path, modules)) for name, path in modules.items()}
    state: dict[str, int] = {}
    found, stack = [], []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in graph[node]:
            if state.get(target) == 1:
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_import_follows_the_rule():
    assert violations(project_modules()) == []


def test_no_import_cycles():
    assert cycles(project_modules()) == []


def test_every_module_has_a_rank():
    """A new top-level package or module must be placed in the rule, not slip through it."""
    for name in project_modules():
        rank_of(name)  # max() of an empty sequence raises


def test_an_unranked_module_is_caught(tmp_path):
    write_tree(tmp_path, {"pipeline/__init__.py": "", "analysis/__init__.py": "", "pipeline/newcomer.py": ""})
    with pytest.raises(ValueError):
        for name in project_modules(tmp_path):
            rank_of(name)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    # a lazy import from the store up into the stages
    ({"pipeline/store/a.py": "def f():\n    from pipeline.stages import pair\n", "pipeline/stages/pair.py": ""},
     "pipeline.store.a (rank 1, pipeline.store) imports pipeline.stages.pair (rank 6, pipeline.stages)"),
    # siblings of one rank
    ({"pipeline/training/t.py": "from pipeline.evaluation.probes import x\n", "pipeline/evaluation/probes.py": ""},
     "pipeline.training.t (rank 4, pipeline.training) imports pipeline.evaluation.probes (rank 4, pipeline.evaluation)"),
    # one stage importing another
    ({"pipeline/stages/train.py": "from pipeline.stages import reference\n", "pipeline/stages/reference.py": ""},
     "pipeline.stages.train imports pipeline.stages.reference: one stage never imports another"),
])
def test_the_rule_catches(tmp_path, files, expected):
    write_tree(tmp_path, {"pipeline/__init__.py": "", "analysis/__init__.py": "", **files})
    assert violations(project_modules(tmp_path)) == [expected]


def test_a_cycle_is_caught_even_inside_a_package(tmp_path):
    write_tree(tmp_path, {"pipeline/__init__.py": "", "analysis/__init__.py": "",
                          "pipeline/data/a.py": "from pipeline.data import b\n",
                          "pipeline/data/b.py": "def f():\n    from pipeline.data.a import g\n"})
    assert cycles(project_modules(tmp_path)) == [["pipeline.data.a", "pipeline.data.b", "pipeline.data.a"]]
