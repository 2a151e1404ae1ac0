"""The Train tab's form, read off the typed config schema: one field per leaf of `RunConfig` (sections and nested
sections in order), with its default and description; and the values a page sends turned back into the config
dict `sdlora.config.validate_config` checks. A new config field appears in the form with no edit here."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from sdlora.config import ConfigError, RunConfig, explain


@dataclass(frozen=True)
class Field:
    key: str  # dotted: train.learning_rate
    kind: str  # bool | int | float | choice | text | yaml
    default: Any  # as the widget shows it
    description: str
    choices: tuple[str, ...] = ()
    optional: bool = False  # "" in the widget means None

    @property
    def section(self) -> str:
        return self.key.split(".")[0]


def _plain(annotation) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[Field]:
    out = []
    for name, info in model.model_fields.items():
        key = prefix + name
        annotation, optional = _plain(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += fields(annotation, key + ".")
            continue
        default = info.get_default(call_default_factory=True)
        text = info.description or ""
        if typing.get_origin(annotation) is Literal:
            choices = tuple(str(c) for c in typing.get_args(annotation))
            out.append(Field(key, "choice", "" if default is None else str(default), text,
                             ("",) + choices if optional else choices, optional))
        elif annotation is bool:
            out.append(Field(key, "bool", bool(default), text))
        elif annotation in (int, float) and not optional:
            out.append(Field(key, annotation.__name__, default, text))
        elif annotation is str or getattr(annotation, "__name__", "") == "Path":
            out.append(Field(key, "text", "" if default is None else str(default), text, optional=optional))
        else:  # lists, tuples, optional numbers: YAML text (`[a, b]`, `0.5`)
            shown = "" if default is None else yaml.safe_dump(_jsonable(default), default_flow_style=True).strip()
            out.append(Field(key, "yaml", shown.removesuffix("\n..."), text, optional=optional))
    return out


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def field_errors(schema: list[Field], values: list[Any], source: str = "the form") -> dict[str, str]:
    """What is wrong with the form, per field key (the widget that shows it): a value whose YAML cannot parse, and
    each error of the typed config's own validation (pydantic), worded as the CLI words it. An error of a whole
    section or of the config goes to the first field its message names, else to the first field of its section
    (key "" when it names none: shown under the form). Empty when the config is valid."""
    keys = [f.key for f in schema]
    errors: dict[str, str] = {}
    parsed = []
    for field, value in zip(schema, values):
        try:
            to_config_dict([field], [value])
            parsed.append(value)
        except ConfigError as exc:
            errors[field.key] = str(exc)
            parsed.append(field.default)  # the rest of the form is still checked
    try:
        RunConfig.model_validate(to_config_dict(schema, parsed))
    except ValidationError as exc:
        lines = explain(exc, source, RunConfig).split("\n")  # one line per error, in exc.errors() order
        for err, line in zip(exc.errors(), lines):
            key = _field_of(keys, tuple(err["loc"]), line)
            errors[key] = errors[key] + "; " + line if key in errors else line
    return errors


def _field_of(keys: list[str], loc: tuple, message: str) -> str:
    """The widget an error belongs to: the longest key its location starts with (`data.sources.0.path` is the
    `data.sources` field), else the first key its message names, else the first field of its section."""
    for end in range(len(loc), 0, -1):
        key = ".".join(str(p) for p in loc[:end])
        if key in keys:
            return key
    named = [k for k in keys if k in message]
    if named:
        # The first one named; at one position the longer (`train.lr_warmup_steps`, not `train.lr` inside it).
        return min(named, key=lambda k: (message.index(k), -len(k)))
    section = str(loc[0]) if loc else ""
    return next((k for k in keys if k.split(".")[0] == section), "")


def to_config_dict(schema: list[Field], values: list[Any]) -> dict[str, Any]:
    """The nested config dict from the widgets' values, only the fields changed from their defaults (so the
    written config reads like one a person wrote). Raises ConfigError naming the field whose YAML cannot parse."""
    data: dict[str, Any] = {}
    for field, value in zip(schema, values):
        if value == field.default or (field.kind in ("int", "float") and value is not None
                                      and float(value) == float(field.default)):
            continue
        if field.kind in ("text", "choice", "yaml") and field.optional and str(value).strip() == "":
            value = None
        elif field.kind == "yaml":
            try:
                value = yaml.safe_load(str(value))
            except yaml.YAMLError as exc:
                raise ConfigError(f"{field.key}: cannot parse {value!r} as YAML ({exc.__class__.__name__})") from None
        elif field.kind == "int" and value is not None:
            value = int(value)
        node = data
        *parents, last = field.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def from_config_dict(schema: list[Field], data: dict[str, Any]) -> list[Any]:
    """Widget values for a config dict (a loaded YAML): its values where it sets them, defaults elsewhere."""
    out = []
    for field in schema:
        node: Any = data
        for part in field.key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            out.append(field.default)
        elif field.kind == "yaml":
            out.append("" if node is None else yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("\n..."))
        elif field.kind in ("text", "choice"):
            out.append("" if node is None else str(node))
        else:
            out.append(node)
    return out
