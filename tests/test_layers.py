"""The package's layers, kept by a test: who may import whom, one import style, one logger.

config <- data, moe <- model <- eval <- train <- distributed <- app, and beside them the drop-in
sparse_moe (config, moe; distributed/ only for experts on Ray). Model, MoE, data and eval code
never imports Ray or distributed/; train/ never imports distributed/ (the Ray runtime plugs
into the one loop from above); nothing but app/ (and ``python -m expertpar``) imports app/.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "expertpar"

ALLOWED = {  # subpackage -> the subpackages it may import
    "config": set(),
    "data": {"config"},
    "moe": {"config"},
    "model": {"config", "moe"},
    "eval": {"config", "data", "moe", "model"},
    "train": {"config", "data", "moe", "model", "eval"},
    "distributed": {"config", "data", "moe", "model", "eval", "train"},
    "app": {"config", "data", "moe", "model", "eval", "train", "distributed"},
    "__main__": {"app"},
    # the drop-in layer: the MoE layer in process, expert actors (distributed/) on Ray
    "sparse_moe": {"config", "moe", "distributed"},
    "__init__": {"sparse_moe"},  # lazily, on first use
}
NO_RAY = {"config", "data", "moe", "model", "eval", "train", "sparse_moe"}


def _unit(path: Path, root: Path) -> str:
    """The subpackage (or top-level module) a file belongs to."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, root: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, written relatively) of every import in the file, function
    level included."""
    package = [root.name, *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
                out += [(node.lineno, n, True) for n in names]
            else:
                out.append((node.lineno, node.module, False))
    return out


def layer_problems(root: Path) -> list[str]:
    problems = []
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        unit = _unit(path, root)
        where = path.relative_to(root.parent)
        if unit not in ALLOWED:
            problems.append(f"{where}: '{unit}' is not a known layer (add it to ALLOWED)")
            continue
        text = path.read_text()
        if "getLogger(__name__)" in text or ("getLogger(" in text
                                            and 'getLogger("expertpar")' not in text):
            problems.append(f"{where}: loggers are getLogger(\"expertpar\"), one name")
        for line, mod, relative in _imports(path, root):
            top = mod.split(".")[0]
            if top == "ray" and unit in NO_RAY:
                problems.append(f"{where}:{line}: {unit}/ imports Ray ({mod})")
            if top != root.name:
                continue
            if not relative:
                problems.append(f"{where}:{line}: absolute import of {mod}; the package "
                                f"imports itself relatively")
            parts = mod.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == unit or target not in ALLOWED:
                continue
            graph.setdefault(unit, set()).add(target)
            if target not in ALLOWED[unit]:
                problems.append(f"{where}:{line}: {unit}/ may not import {target}/ ({mod})")
    problems += [f"import cycle between subpackages: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_keeps_its_layers():
    assert layer_problems(PACKAGE) == []


@pytest.mark.parametrize("file, text, expected", [
    ("moe/bad.py", "import ray\n", "moe/ imports Ray"),
    ("model/bad.py", "from ..distributed import actors\n", "model/ may not import distributed/"),
    ("train/bad.py", "def f():\n    from ..distributed.runtime import x\n",
     "train/ may not import distributed/"),
    ("config.py", "from .train import loop\n", "config/ may not import train/"),
    ("data/bad.py", "from expertpar.config import Config\n", "absolute import"),
    ("eval/bad.py", "import logging\nlog = logging.getLogger(__name__)\n", "one name"),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, file, text, expected):
    root = tmp_path / "expertpar"
    for unit in ("config.py", "moe/__init__.py", "model/__init__.py", "train/__init__.py",
                 "data/__init__.py", "eval/__init__.py", "distributed/__init__.py"):
        (root / unit).parent.mkdir(parents=True, exist_ok=True)
        (root / unit).touch()
    (root / file).parent.mkdir(parents=True, exist_ok=True)
    (root / file).write_text(text)
    problems = layer_problems(root)
    assert any(expected in p for p in problems), problems


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


def test_tests_run_with_a_temporary_home(home_in_a_temporary_directory, tmp_path_factory):
    assert Path.home() == home_in_a_temporary_directory
    assert Path.home().is_relative_to(tmp_path_factory.getbasetemp())
