"""The errors a user can fix, and how the CLI tells them from bugs.

Every exception that means "the user can fix this" (a config value, a file, a command-line argument, a missing
optional package) subclasses `UserError`; the CLI prints those as one line, `sdlora: error: <message>`, and exits
with status 2. Anything else is a bug in sdlora and keeps its traceback. A message names the file or the field
and says what to do.

This module imports nothing, so any layer (files, config, data, models, ...) can subclass `UserError` without an
import cycle. Each concrete class lives beside the code that raises it and keeps its built-in base as well
(`class ConfigError(UserError, ValueError)`), so `except ValueError` in callers still catches it.
`tests/test_errors.py` walks the package and fails on an exception class that is neither a `UserError` nor on its
commented list of internal errors.
"""


class UserError(Exception):
    """Base of every error the user can fix; its message is the whole report (one line, no traceback)."""


# What `sdlora.cli.main` catches: everything derived from the one base, so a new user error needs no edit here.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
