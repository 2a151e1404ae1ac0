"""The Train tab's form, read off the typed config schema: one field per leaf of `RunConfig` (sections and nested
sections in order), with its default and description; and the values a page sends turned back into the config
dict `sdlora.config.validate_config` checks. A new config field appears in the form with no edit here."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from sdlora.config import ConfigError, RunConfig


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
