"""Names that leave the machine: hub repo ids (checked here, for the whole package) and the public form of a source.

A run records where its base, data and outputs came from, and some of that is shared: the adapter's header, the
model card, the config a push uploads. What is shared names a hub id or a built-in base as it is, and a local file
or folder by its final name only, the way kohya's sd-scripts fills `ss_sd_model_name`: an absolute path tells
strangers a user name and a folder layout, and means nothing on their machine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sdlora.errors import UserError

# USER/NAME or ORG/NAME. The Hub allows letters, digits, '-', '_' and '.'; a name never starts with '-' or '.'.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTIN_PREFIX = "sdlora:"


class RepoIdError(UserError, ValueError):
    """Text that is not a hub repo id; the message quotes it and shows the expected form."""


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text))


def check_repo_id(repo_id: str) -> str:
    """`repo_id` itself when it is USER/NAME (or ORG/NAME), else RepoIdError: the one wording for a bad repo id."""
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise RepoIdError(f"repo id {repo_id!r}: expected USER/NAME (or ORG/NAME), e.g. alice/my-style-lora")
    return repo_id


def local_name(path: str | Path) -> str:
    """The final name of a local file or folder, whichever separator the path was written with."""
    parts = [part for part in re.split(r"[\\/]+", str(path)) if part]
    return parts[-1] if parts else ""


def public_name(source: str) -> str:
    """What may be published of a model or adapter source: a built-in name (`sdlora:shapes`) or a hub reference
    (`user/repo`, `user/repo:file.safetensors:0.8`) as it is; a local path by its final name only, with anything
    after that name (`/home/me/a.safetensors:0.8` -> `a.safetensors:0.8`).

    A relative path that looks like a hub id (`models/base`) counts as local when it exists here, as the loaders
    decide (they try a local file or folder first)."""
    if not source or source.startswith(BUILTIN_PREFIX):
        return source
    head = source.split(":", 1)[0]
    if is_repo_id(head) and not Path(head).exists():
        return source
    return local_name(source) or source


# Text fields that name a base, a config folder or an adapter: a hub id or built-in name, or a local path.
SOURCE_FIELDS = ("model.base", "model.single_file_config", "sample.adapters")


def public_config(model: BaseModel, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`data` (the dump of a config `model`) with every `Path` field cut to its final name and every SOURCE_FIELDS
    value to its public name; walks nested sections and lists of them."""
    for name in type(model).model_fields:
        value, key = getattr(model, name), f"{where}{name}"
        if isinstance(value, BaseModel):
            public_config(value, data[name], f"{key}.")
        elif isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
            for item, dumped in zip(value, data[name]):
                public_config(item, dumped, f"{key}.")
        elif isinstance(value, Path):
            data[name] = local_name(value)
        elif key in SOURCE_FIELDS and value is not None:
            data[name] = [public_name(v) for v in value] if isinstance(value, tuple) else public_name(value)
    return data
