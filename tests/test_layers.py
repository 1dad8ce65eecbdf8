"""The package's layers import only downward, methods never import each other, and nothing imports in a
circle: read from the source with ast, so a new module that breaks the rule fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "quantkit"
# Lower numbers sit lower; a module may import its own layer or any below it.
LAYERS = {"errors": 0, "dtypes": 0, "numerics": 0, "jit": 0, "native": 0, "io": 1, "api": 2, "modules": 2, "methods": 3,
          "plan": 4, "pipeline": 4, "verification": 4, "inspection": 4, "preview": 4, "card": 4, "logits": 4, "layerwise": 4,
          "commands": 5, "cli": 5, "render": 5, "__main__": 5, "__init__": 6}  # __init__ hands out the commands lazily


def modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"] = file
    return found


def imports(file: Path, known: set[str]) -> set[str]:
    """Modules of the package that `file` imports (anywhere in it), as keys of `known`."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantkit"):
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("quantkit")]
        else:
            continue
        for name in names:
            name = name.removeprefix("quantkit").removeprefix(".")
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
                break
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(f, set(mods)) - {m} for m, f in mods.items()}


def test_layers_import_only_downward():
    wrong = []
    for module, targets in graph().items():
        top = module.split(".")[0]
        for target in targets:
            if LAYERS[target.split(".")[0]] > LAYERS[top]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_methods_do_not_import_each_other():
    wrong = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
             if m.startswith("methods.") and t.startswith("methods.") and t.split(".")[1] != m.split(".")[1]]
    assert not wrong, wrong


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, " -> ".join(cycle)
