"""The package's folders are its layers, and imports only go down: `core` imports nothing else of `semantic_aug`;
`acceleration` and `datasets` import `core`; `stages` import those; the runner may import everything. The benchmarks
use only public names of the package."""

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "semantic_aug"
LAYERS = {"core": 0, "acceleration": 1, "datasets": 1, "stages": 2, "runner": 3}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every `semantic_aug...` module a file imports, at any depth of its code, with the line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{alias.name}") for alias in
                                                     node.names if node.module == "semantic_aug"]
    return [(line, name) for line, name in found if name.split(".")[0] == "semantic_aug"]


def layer_of(parts: list[str]) -> str:
    return parts[1] if len(parts) > 1 else ""


MODULES = sorted(path for path in PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_layer():
    outside = [str(path.relative_to(PACKAGE)) for path in MODULES
               if path.parent != PACKAGE and path.relative_to(PACKAGE).parts[0] not in LAYERS]
    at_top = [path.name for path in MODULES if path.parent == PACKAGE and path.name != "__init__.py"]
    assert not outside and not at_top, (outside, at_top)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
    if path.parent == PACKAGE:
        return
    own = path.relative_to(PACKAGE).parts[0]
    wrong = []
    for line, name in imported_modules(path):
        target = layer_of(name.split("."))
        if target not in LAYERS:
            wrong.append(f"line {line}: {name} is not in a layer")
        elif target != own and LAYERS[target] >= LAYERS[own]:
            wrong.append(f"line {line}: {own} (layer {LAYERS[own]}) imports {name} (layer {LAYERS[target]})")
    assert not wrong, wrong


def test_the_check_sees_an_upward_import(tmp_path):
    stage = tmp_path / "semantic_aug" / "core" / "bad.py"
    stage.parent.mkdir(parents=True)
    stage.write_text("def f():\n    from semantic_aug.stages.training import fit\n")
    assert [name for _, name in imported_modules(stage)] == ["semantic_aug.stages.training"]


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "benchmarks").glob("*.py")), ids=lambda path: path.name)
def test_benchmarks_use_public_names(path):
    private = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("semantic_aug"):
            private += [f"line {node.lineno}: {alias.name}" for alias in node.names if alias.name.startswith("_")]
            private += [f"line {node.lineno}: {node.module}" for part in node.module.split(".") if part.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id not in {"torch", "self", "cls"}:
                private.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not private, private
