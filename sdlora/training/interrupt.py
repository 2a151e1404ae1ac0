"""Graceful stop on SIGINT / SIGTERM: finish the step, checkpoint, exit; a second Ctrl-C exits at once.

The handler only sets a flag; the training loop asks `should_stop()` after every optimizer step, so a stop never
lands in the middle of an optimizer update or a checkpoint write. A second SIGINT (the user insisting) restores the
default handler and raises `KeyboardInterrupt` right where the program is; atomic writes clean their temporary
files on the way out, so even then no partial checkpoint or adapter is left behind.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

# Exit status of a run stopped by a signal after writing a resumable checkpoint: EX_TEMPFAIL from sysexits.h,
# "try again later", which is exactly what `--resume latest` does. Distinct from 0 so that
# `sdlora train ... && upload` does not ship a half-trained adapter.
EXIT_STOPPED = 75
# A second Ctrl-C: the shell convention for death by SIGINT (128 + 2).
EXIT_ABORTED = 130

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager that turns the first SIGINT/SIGTERM into a stop request. Inert outside the main thread."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str) -> None:
        self.signal_name = name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt(f"second {name}: stopping now, without a checkpoint")
        if not self.requested:
            log.warning(
                "%s received: finishing the current step, then writing a checkpoint (press Ctrl-C again to exit now)",
                name,
            )
        self.request(name)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
