"""docs/config.md is generated from the config schema and must not drift from it."""

from __future__ import annotations

import functools
import importlib.util
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "config.md"


@functools.cache
def _generator():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _dotted_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of `model` and of the models inside it, as written in a config file (`[]`: each list entry)."""
    names = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        names.append(dotted)
        stack = [info.annotation]
        while stack:  # unwrap Optional[...] and tuple[...]/list[...] to reach a nested model
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                listed = typing.get_origin(info.annotation) in (tuple, list)
                names += _dotted_names(annotation, f"{dotted}[]" if listed else dotted)
            else:
                stack += [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return names


def test_config_page_matches_the_schema():
    expected = _generator().render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    assert current == expected, (
        "docs/config.md is out of date with the config schema (sdlora.config): "
        "run `python scripts/config_reference.py` and commit the result"
    )


def test_the_generator_is_deterministic():
    generator = _generator()
    assert generator.render() == generator.render()


def test_every_schema_field_has_a_row():
    generator = _generator()
    page = PAGE.read_text(encoding="utf-8")
    fields = _dotted_names(generator.run_config_model())
    assert len(fields) > 50, "the walk found too few fields; the schema layout changed?"
    # A top-level section is a heading; every field inside one is a row.
    missing = [name for name in fields if f"| `{name}` |" not in page and f"\n## `{name}`\n" not in page]
    assert not missing, f"docs/config.md has no row for: {missing}"
    folder = generator.folder_settings_model()
    if folder is not None:
        missing = [name for name in _dotted_names(folder) if f"| `{name}` |" not in page]
        assert not missing, f"docs/config.md has no row for these dataset.toml fields: {missing}"


def test_check_mode_reports_drift(tmp_path, capsys):
    generator = _generator()
    stale = tmp_path / "config.md"
    stale.write_text(generator.render() + "\nA line edited by hand.\n", encoding="utf-8")
    assert generator.main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert generator.main(["--out", str(stale)]) == 0
    assert generator.main(["--check", "--out", str(stale)]) == 0
