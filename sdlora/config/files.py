"""Reading config files and `section.field=value` overrides, and wording validation errors for people.

The schema lives in `schema.py`; this module knows YAML/TOML and pydantic's error records, not the fields.
"""

from __future__ import annotations

import difflib
import json
import shlex
from pathlib import Path
from typing import Any, get_args, get_origin

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


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...], root: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Apply `section.field=value` overrides; values are parsed as YAML (so `5`, `1e-4`, `true`, `[a, b]` work).

    A list is written in brackets (`'sample.prompts=[a red circle, a blue square]'`); with `root`, a plain value
    for a list-of-text field is that list's one item (`sample.prompts=a red circle`), which is what a user means."""
    data = json.loads(json.dumps(data, default=str))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {_quoted(override)}: expected section.field=value, e.g. train.steps=200")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {_quoted(override)}: {part} is not a section")
            node = child
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {_quoted(override)}: cannot parse the value: {_one_line(exc)}; "
                              f"quote it for YAML, e.g. '{key.strip()}=\"…\"'") from None
        if root is not None and _holds_text_items(_field_annotation(root, parts)) and _is_scalar(value):
            value = [value if isinstance(value, str) else raw.strip()] if raw.strip() else []
        node[parts[-1]] = value
    return data


def _quoted(override: str) -> str:
    """An override as the user would type it again in a shell."""
    return shlex.quote(override)


def _is_scalar(value: Any) -> bool:
    return value is not None and not isinstance(value, (list, dict))


def _field_annotation(root: type[BaseModel], parts: list[str]):
    """The type annotation of the field a dotted override names; None for an unknown name (the schema refuses it)."""
    model: type[BaseModel] | None = root
    annotation = None
    for part in parts:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        annotation = field.annotation
        model = _model_in(annotation)
    return annotation


def _holds_text_items(annotation) -> bool:
    """A list or tuple of strings (`tuple[str, ...]`), or an optional one."""
    if get_origin(annotation) in (list, tuple):
        return all(arg is str or arg is Ellipsis for arg in get_args(annotation))
    return any(_holds_text_items(arg) for arg in get_args(annotation) if arg is not type(None))


def _from_override(where: tuple, message: str, overrides: tuple[str, ...]) -> str | None:
    """The override a validation error comes from: the last one that sets the field (or a section inside it), or for
    an error between fields (of a section, or the top level), the last one whose field the message names."""
    path = [str(p) for p in where if not isinstance(p, int)]
    for override in reversed(overrides):
        parts = override.partition("=")[0].strip().split(".")
        if path[: len(parts)] == parts and path:
            return override
        if parts[: len(path)] == path and ".".join(parts) in message:
            return override
    return None


def explain(
    exc: ValidationError, source: str, root: type[BaseModel], overrides: tuple[str, ...] | list[str] = ()
) -> str:
    """A pydantic error as lines that name where the value came from (the file, or the command line's override),
    the field and, for unknown keys, the allowed ones."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        override = _from_override(err["loc"], err["msg"], tuple(overrides))
        origin = f"override {_quoted(override)}" if override else source
        if err["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{where}'{_suggest(err['loc'], root)}")
            continue
        got = err.get("input")
        # A validator's own message already says what it got ("..., got 60"); pydantic's generic ones do not.
        shown = "" if isinstance(got, dict) or "got " in err["msg"] else f" (got {got!r})"
        hint = ""
        if override and err["type"] in ("tuple_type", "list_type"):
            key, _, raw = override.partition("=")
            hint = f"; write a list in brackets, quoted for the shell: '{key.strip()}=[{raw.strip()}, …]'"
        lines.append(f"{origin}: {where}: {err['msg']}{shown}{hint}")
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
