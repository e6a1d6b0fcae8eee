"""The package's shape, pinned: no import cycle, dependencies one way, small modules, every store
path built by the store.

Layers, from the top: cli -> defs (the Dagster layer) -> serving -> release / monitoring -> evaluation / models
-> core.
A module may import from its own layer or any layer below it, never above.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "quant_pipeline"
LAYERS = {"core": 0, "models": 1, "evaluation": 1, "release": 2, "monitoring": 2, "serving": 3, "defs": 4,
          "definitions": 5, "cli": 6}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "evals" not in p.parts}


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Every quant_pipeline module this module imports, at any depth of the file (functions too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("quant_pipeline")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("quant_pipeline"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for target in imports_of(path, name, known):
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            # (except its own ancestors, which are already running when it does)
            parts = target.split(".")
            chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in known}
            targets |= {t for t in chain if t == target or not name.startswith(t + ".")}
        edges[name] = targets - {name}
    return edges


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_the_package_has_no_import_cycle():
    edges, state, stack, cycles = graph(), {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_dependencies_point_one_way():
    upward = [
        f"{src} -> {dst}"
        for src, targets in graph().items()
        for dst in targets
        if layer(src) is not None and layer(dst) is not None and layer(dst) > layer(src)
    ]
    assert not upward, "imports against the layering: " + ", ".join(sorted(upward))


def test_no_stage_imports_serving():
    offenders = [
        src
        for src, targets in graph().items()
        if src.startswith("quant_pipeline.defs") and any(t.startswith("quant_pipeline.serving") for t in targets)
    ]
    assert not offenders


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_under_400_lines(name):
    assert len(modules()[name].read_text().splitlines()) <= 400


def test_no_module_builds_store_paths_by_hand():
    """`store / "artifacts"` and friends belong to ArtifactStore alone."""
    by_hand = re.compile(r'\bstore(_dir)?\)?\s*/\s*"(artifacts|checkpoints|evals|reports|trail|requests)"')
    offenders = [
        f"{name}:{number}"
        for name, path in modules().items()
        if name != "quant_pipeline.core.store"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if by_hand.search(line)
    ]
    assert not offenders, offenders
