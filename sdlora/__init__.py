"""sdlora: train, stack and share Stable Diffusion LoRA adapters.

What a user's terminal shows, kept here because it must not import torch (the CLI reports a bad config in well
under a second): a message that tells the user to run sdlora spells the command with `command_line`, so that it
runs as printed whether or not the environment was activated; `quiet_missing_torchvision` drops one third-party
line that concerns no user.
"""

import logging
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


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...Pil" lines.

    diffusers' SD pipeline and IP-Adapter modules import `CLIPImageProcessor` and `SiglipImageProcessor` when they
    load, and transformers 5 warns once for each when torchvision (an optional backend sdlora does not need) is
    absent. sdlora never uses an image processor (no safety checker, no IP-Adapter), so the lines concern no user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


def quiet_missing_torchvision() -> None:
    """Process-wide, and only for that one message on the one transformers logger that prints it; idempotent."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackFilter())
