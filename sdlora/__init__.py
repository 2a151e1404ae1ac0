"""sdlora: train, stack and share Stable Diffusion LoRA adapters.

A message that tells the user to run sdlora spells the command with `command_line`, so that it runs as printed
whether or not the environment sdlora is installed in was activated.
"""

import shlex
import shutil
import sys
from pathlib import Path

__version__ = "0.1.0"


def command_line(*args: str) -> str:
    """A shell command that runs sdlora with `args` as this process was run, ready to paste.

    Bare `sdlora` only where the shell finds this very executable on the PATH; else the console script's full
    path (a `.venv` that was never activated), or `python -m sdlora` with this interpreter's full path.
    """
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.stem == "sdlora" and script.is_file():
        found = shutil.which("sdlora")
        same = found is not None and Path(found).resolve() == script.resolve()
        program = ["sdlora"] if same else [str(script.absolute())]
    else:
        program = [sys.executable, "-m", "sdlora"]
    return shlex.join([*program, *args])
