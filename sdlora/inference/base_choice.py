"""Which base `sdlora generate` and `grid` run on when `--base` is not given: the one the adapters record.

Every adapter sdlora writes records its base in `sdlora.base_model`, by its public name (`config.names`): a hub id
or a built-in name as it is, a local folder or file by its final name only. The first two load anywhere; a bare
local name cannot be found again, so the user is asked for `--base`. Adapters that disagree are refused: stacked
on either base, the other one's modules do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora import formats
from sdlora.config.names import BUILTIN_PREFIX, is_repo_id
from sdlora.errors import UserError
from sdlora.inference.pipeline import AdapterSpec

DEFAULT_BASE = "sdlora:tiny"  # the random test base: what runs when nothing says otherwise


class BaseChoiceError(UserError, ValueError):
    """No `--base`, and the adapters disagree about their base or record one that cannot be loaded from here."""


@dataclass(frozen=True)
class BaseChoice:
    source: str  # what `models.load_base_model` takes
    reason: str  # why, for the one line the CLI prints

    def describe(self) -> str:
        return f"base: {self.source} ({self.reason})"


def recorded_base(path: str | Path) -> str | None:
    """The base an adapter file says it was trained on (`sdlora.base_model`), or None when it does not say."""
    return formats.read_metadata(path).get("sdlora.base_model") or None


def loadable_anywhere(base: str) -> bool:
    """A built-in name or a hub id; not a local folder's or file's bare name, which only its owner can find."""
    return base.startswith(BUILTIN_PREFIX) or is_repo_id(base)


def choose_base(given: str | None, specs: list[AdapterSpec], resolve=None) -> BaseChoice:
    """`given` (`--base`) when there is one; else the base every adapter that records one agrees on; else the
    default. `resolve` turns a spec's source into a local file (e.g. a hub download), as in `stack_adapters`."""
    if given:
        return BaseChoice(given, "--base")
    recorded: dict[str, str] = {}
    for spec in specs:
        path = resolve(spec.source) if resolve else spec.source
        base = recorded_base(path)
        if base:
            recorded[Path(str(path)).name] = base
    bases = sorted(set(recorded.values()))
    if not bases:
        why = "no adapter records its base" if specs else "no adapter given"
        return BaseChoice(DEFAULT_BASE, f"the default: {why}; choose one with --base")
    if len(bases) > 1:
        each = ", ".join(f"{name} on {base}" for name, base in recorded.items())
        raise BaseChoiceError(f"the adapters were trained on different bases ({each}); stacked, one of them will "
                              "not fit: pass --base to choose, or stack adapters made for the same base")
    base, names = bases[0], ", ".join(recorded)
    if not loadable_anywhere(base):
        raise BaseChoiceError(f"{names} record(s) base {base!r}, a local folder or file of which only the name is "
                              f"kept: pass --base PATH (the folder or file {base} on this machine)")
    return BaseChoice(base, f"recorded by {names}")
