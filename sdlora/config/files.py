"""Reading config files and `section.field=value` overrides, and wording validation errors for people.

The schema lives in `schema.py`; this module knows YAML/TOML and pydantic's error records, not the fields.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, get_args

import tomllib
import yaml
from pydantic import BaseModel, ValidationError

from sdlora.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the field and what to do."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or TOML file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: config must be .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {_one_line(exc)}; fix the file's syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _one_line(exc: Exception) -> str:
    """A YAML error is several lines (source excerpt, caret); the problem and its position are all a user needs."""
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.YAMLError) and mark is not None:
        return f"{getattr(exc, 'problem', None) or exc} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `section.field=value` overrides; values are parsed as YAML (so `5`, `1e-4`, `true`, `[a, b]` work)."""
    data = json.loads(json.dumps(data, default=str))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r}: expected section.field=value, e.g. train.steps=200")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def explain(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """A pydantic error as lines that name the source, the field and, for unknown keys, the allowed ones."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{where}'{_suggest(err['loc'], root)}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {where}: {err['msg']}{shown}")
    return "\n".join(lines)


def _model_in(annotation) -> type[BaseModel] | None:
    """The config model a field holds: itself, or the item type of a list/tuple/optional of models."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _suggest(loc: tuple, root: type[BaseModel]) -> str:
    """'did you mean' for a misspelt key, from the fields of the section (or list item) it sits in."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an index into a list of sections, e.g. data.sources[0]
        inner = _model_in(getattr(model.model_fields.get(str(part)), "annotation", None))
        if inner is None:
            break
        model = inner
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} Allowed here: {', '.join(allowed)}"
