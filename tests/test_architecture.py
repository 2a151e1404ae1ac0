"""The package's shape, checked: layers import only downwards, a few modules at the top, none too long, and the
boundaries docs/architecture.md promises (data never touches diffusers, the loop never touches files)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdlora"

# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = [
    {"errors", "files", "rng", "hostmem", "__init__"},  # errors.py imports nothing: every layer raises UserError
    {"config"},
    {"data"},
    {"models"},
    {"formats"},
    {"inference"},
    {"training"},
    {"hub"},
    {"bench", "workflow"},
    {"cli", "__main__", "ui"},  # ui/ is a front end beside the CLI: it may import anything, nothing imports it
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _unit(path: Path) -> str:
    """The layer a file belongs to: its subpackage, or its own name at the top level."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sdlora":
                found += [(f"sdlora.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def test_every_module_belongs_to_a_layer():
    assert {_unit(p) for p in _modules()} <= set(RANK), "a new subpackage or top-level module needs a layer here"


def test_no_import_runs_from_a_lower_layer_back_up():
    upward = []
    for path in _modules():
        unit = _unit(path)
        for module, line in _imports(path):
            parts = module.split(".")
            if parts[0] != "sdlora" or len(parts) < 2:
                continue
            target = parts[1]
            if target not in RANK and not (PACKAGE / target).is_dir() and not (PACKAGE / f"{target}.py").is_file():
                target = "__init__"  # a name the package itself defines (`from sdlora import command_line`)
            if RANK[target] > RANK[unit]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}) imports {module}")
    assert not upward, "imports from a lower layer back up:\n" + "\n".join(upward)


@pytest.mark.parametrize(("unit", "forbidden"), [
    ("data", ("diffusers", "transformers", "peft", "accelerate")),  # data knows images and captions, not models
    ("config", ("torch", "diffusers", "transformers", "peft")),  # config loads without any model library
])
def test_lower_layers_stay_free_of_model_libraries(unit, forbidden):
    hits = [f"{p.relative_to(PACKAGE.parent)}:{line} imports {m}" for p in _modules() if _unit(p) == unit
            for m, line in _imports(p) if m.split(".")[0] in forbidden]
    assert not hits, "\n".join(hits)


def test_the_training_loop_never_touches_files_or_the_network():
    loop = PACKAGE / "training" / "loop.py"
    hits = [m for m, _ in _imports(loop) if m.split(".")[0] in ("safetensors", "PIL", "huggingface_hub", "yaml")]
    assert not hits, f"training/loop.py imports {hits}: file formats and uploads belong to the run's hooks"


def test_few_modules_at_the_top_and_none_too_long():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, f"sdlora/ holds {top}: new work belongs in the subpackage that owns its concern"
    long = {str(p.relative_to(PACKAGE.parent)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"modules over 400 lines (split by responsibility): {long}"
