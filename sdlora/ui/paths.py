"""The UI's file browser stays inside the folders given with `--root`: the one check every path a page sends goes
through before anything is read or written."""

from __future__ import annotations

import os
from pathlib import Path

from sdlora.errors import UserError


class OutsideRootError(UserError, PermissionError):
    """A path from the page that leads outside every `--root` folder (`..`, an absolute path, a symlink out)."""


def inside_roots(path: str | Path, roots: list[Path]) -> Path:
    """The real path `path` names, if it lies inside one of `roots`; else OutsideRootError.

    A relative path is taken relative to the first root. `..` parts are refused outright (even ones that would
    come back inside: a path from a page has no business climbing), and the result is resolved through every
    symlink before the containment check, so a link inside a root that points out of it is refused too."""
    if not roots:
        raise OutsideRootError("no --root folder was given: start `sdlora ui --root FOLDER` to browse files")
    text = str(path).strip()
    if not text:
        raise OutsideRootError("no path given: name a folder inside " + ", ".join(map(str, roots)))
    given = Path(text).expanduser()
    if ".." in given.parts:
        raise OutsideRootError(f"{text}: '..' is not allowed; give a path inside " + ", ".join(map(str, roots)))
    candidate = given if given.is_absolute() else roots[0] / given
    real = Path(os.path.realpath(candidate))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real_root in real.parents:
            return real
    raise OutsideRootError(f"{text}: outside the folders this UI may open (" + ", ".join(map(str, roots))
                           + "); start it with another --root to open it")
