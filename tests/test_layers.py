"""Layers that only point down: every import in `submit/` (module level, inside functions, under TYPE_CHECKING)
goes to a module of a lower layer of the table in docs/architecture.md, so there is no import circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "submit"
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = {"reranking"}  # sub-packages that count as one module


def documented_layers(text: str) -> dict[str, int]:
    """Module -> layer number, read from the `## Layers` table (`| 3 | `locks`, `manifest` | ... |`)."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            for name in re.findall(r"`([\w.]+)`", match.group(2)):
                assert name not in layers, f"docs/architecture.md: module {name} is in two layers"
                layers[name] = int(match.group(1))
    return layers


def unit_of(path: Path) -> str:
    """The table's name for a source file: `training`, or `reranking` for anything in that package."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if rel.parts[0] in PACKAGES else rel.stem


def package_units() -> set[str]:
    return {unit_of(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}


def _target(name: str) -> str | None:
    """The unit an absolute `submit.x.y` import names (None: the package itself or not ours)."""
    parts = name.split(".")
    if parts[0] != "submit" or len(parts) < 2:
        return None
    return parts[1]


def imports_of_node(node: ast.AST) -> set[str]:
    """The project units one import statement names (`from submit import training, errors`: both)."""
    if isinstance(node, ast.Import):
        return {t for a in node.names if (t := _target(a.name))}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module == "submit":  # each imported name may be a module
            return {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists() or (PACKAGE / a.name).is_dir()}
        return {t} if (t := _target(node.module)) else set()
    return set()


def imports_of(path: Path) -> set[tuple[str, int]]:
    """(imported unit, line) for every import of a project module in `path`, wherever it stands."""
    return {(unit, node.lineno) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            for unit in imports_of_node(node)}


def import_edges() -> dict[tuple[str, str], str]:
    """(importer, imported) -> 'file:line' of the first such import; imports within a unit are left out."""
    edges: dict[tuple[str, str], str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(path)
        for target, line in sorted(imports_of(path), key=lambda t: t[1]):
            if target != src:
                edges.setdefault((src, target), f"{path.relative_to(ROOT)}:{line}")
    return edges


def find_cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_problems(edges: dict[tuple[str, str], str], layers: dict[str, int]) -> list[str]:
    """One line per import that does not point to a lower layer, and one for an import circle."""
    problems = []
    for (src, dst), where in sorted(edges.items()):
        if src not in layers or dst not in layers:
            continue  # reported by the table's own test
        if layers[dst] >= layers[src]:
            problems.append(f"{where}: {src} (layer {layers[src]}) imports {dst} (layer {layers[dst]}); "
                            "imports must point to a lower layer")
    cycle = find_cycle(set(edges))
    if cycle:
        problems.append("import circle: " + " -> ".join(cycle))
    return problems


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return documented_layers(DOC.read_text())


def test_every_module_has_exactly_one_documented_layer(layers) -> None:
    units = package_units()
    assert not units - set(layers), f"modules missing from docs/architecture.md's layer table: {units - set(layers)}"
    assert not set(layers) - units, f"layer table names modules that do not exist: {set(layers) - units}"


def test_imports_only_point_down(layers) -> None:
    problems = layer_problems(import_edges(), layers)
    assert not problems, "\n".join(problems)


# The upward imports that held the two former circles together; each must be reported again if it came back.
FORMER = [("weight_sources", "backbones"), ("run_folder", "backbones"), ("ensembling", "training"),
          ("losses", "recipe"), ("ensembling", "jersey")]


@pytest.mark.parametrize("src, dst", FORMER)
def test_a_former_upward_import_would_be_reported(layers, src, dst) -> None:
    edges = {**import_edges(), (src, dst): f"submit/{src}.py:1"}
    problems = layer_problems(edges, layers)
    assert any(p.startswith(f"submit/{src}.py:1: {src} (layer") and f"imports {dst} (layer" in p for p in problems)


def test_a_new_circle_is_reported_with_its_path(layers) -> None:
    edges = {**import_edges(), ("backbones", "trained"): "submit/backbones.py:1"}
    problems = layer_problems(edges, layers)
    assert "import circle: backbones -> trained -> backbones" in problems
    assert find_cycle({("a", "b"), ("b", "c")}) is None
    assert find_cycle({("a", "b"), ("b", "c"), ("c", "a")}) == ["a", "b", "c", "a"]


def test_imports_inside_functions_and_type_checking_blocks_are_read(tmp_path) -> None:
    source = tmp_path / "x.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from submit.jersey import A\n"
                      "def f():\n    from submit import training, errors\n    import submit.predict\n"
                      "from submit import not_a_module\n")
    assert imports_of(source) == {("jersey", 3), ("training", 5), ("errors", 5), ("predict", 6)}


def _commented(lines: list[str], lineno: int) -> bool:
    """True when the import's line, a line of its block of imports, or the line above that block has a comment."""
    i = lineno - 1
    while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")):
        i -= 1
    block = lines[i:lineno]
    return any("#" in line for line in block) or (i > 0 and lines[i - 1].strip().startswith("#"))


LAZY_MARK = "# lazy imports: "  # a module-level comment line saying why all of a module's function imports are lazy


def test_lazy_imports_say_why() -> None:
    """An import of a project module inside a function is there to keep start-up quick, and says so: on its line,
    its block or the line above, or once for the whole module in a top-level `# lazy imports: ...` line."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        if any(line.startswith(LAZY_MARK) for line in lines):
            continue
        for func in ast.walk(ast.parse(text)):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                missing += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(func)
                            if isinstance(node, (ast.Import, ast.ImportFrom)) and imports_of_node(node)
                            and not _commented(lines, node.lineno)]
    assert not missing, "project imports inside functions without a comment saying why: " + ", ".join(
        sorted(set(missing)))
