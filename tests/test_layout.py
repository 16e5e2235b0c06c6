"""The package layout is the architecture: layers import only downwards, the library knows no Hydra or MLflow,
no import circle, nothing below the recipe receives the Trainer, one module per concern (a handful in training/,
few at the top level), and no name imported only to be passed on."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "clipexp"

# bottom to top; a module may import from its own layer or any layer below it, never from one above
LAYERS = [
    {"errors", "names", "paths", "files"},
    {"device"},
    {"models", "data", "losses", "finetune", "heads"},  # the library
    {"evaluate"},
    {"config"},
    {"tracking"},
    {"serving"},
    {"training"},
    {"cli", "__main__"},
]
LIBRARY = LAYERS[2]
FRAMEWORKS = ("hydra", "omegaconf", "mlflow")


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Set[str]:
    """Every module ``name`` imports (at any depth of the file: lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return {m for m in found if m} - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: its package {top!r} is in no layer of tests/test_layout.py")


def test_every_import_runs_downwards():
    bad = [f"{a} -> {b}" for a in MODULES if a != "clipexp" for b in GRAPH[a]
           if b.startswith("clipexp.") and _layer(b) > _layer(a)]
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_library_imports_no_framework():
    bad = [f"{a} imports {b}" for a in MODULES if a.count(".") and a.split(".")[1] in LIBRARY
           for b in GRAPH[a] if b.split(".")[0] in FRAMEWORKS]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    clip = {a: {b for b in bs if b in MODULES and b != "clipexp"} for a, bs in GRAPH.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(clip[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(clip):
        if module not in state:
            visit(module)


def test_nothing_below_the_recipe_receives_the_trainer():
    """The Trainer hands plain data (and the objects it saves) to tracking, serving and finishing: no module but the
    recipe and its task (which runs a config, or rebuilds a finished run's trainer for ``clipexp export``) imports it, and no function elsewhere takes
    a ``trainer`` argument."""
    allowed = {"clipexp.training.trainer", "clipexp.training.task", "clipexp.cli.train"}
    importers = sorted(a for a, bs in GRAPH.items() if "clipexp.training.trainer" in bs and a not in allowed)
    assert not importers, f"modules that import the Trainer: {importers}"
    takers = []
    for name, path in MODULES.items():
        if name in ("clipexp.training.trainer", "clipexp.training.task"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "trainer" in {a.arg for a in node.args.args}:
                takers.append(f"{name}.{node.name}")
    assert not takers, f"functions that receive the trainer: {takers}"


def test_one_module_per_concern_in_few_modules():
    """Files are split by concern, not by length: the recipe may read top to bottom in one file (about 700 lines at
    most, as every module); training/ holds at most 10 modules, the top level at most 8."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 700}
    assert not long, f"modules over 700 lines: {long}"
    training = sorted(p.name for p in (PACKAGE / "training").glob("*.py") if p.name != "__init__.py")
    assert len(training) <= 10, f"{len(training)} modules in clipexp/training/: {training}"
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, f"{len(top)} modules directly in clipexp/: {top}"


def test_no_module_passes_on_names_it_does_not_use():
    """A name imported from clipexp is used by the module that imports it (package ``__init__`` files are the
    public facades and are exempt): each module imports a name from the module that defines it."""
    bad = []
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        imported = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipexp"):
                imported.update({(a.asname or a.name): node.module for a in node.names})
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        bad += [f"{name}: {alias} (from {mod})" for alias, mod in imported.items() if alias not in used]
    assert not bad, "imported but not used (import it from where it is defined instead):\n" + "\n".join(bad)
