"""Starting the page: safe defaults (localhost; another address only with a password), a clear line when the port
is taken, and the address printed once it listens."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from sdlora.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "SDLORA_UI_AUTH"  # user:password, for --host other than localhost without --auth on the command line


class UIStartError(UserError, RuntimeError):
    """The UI cannot start as asked: gradio missing, port taken, a public address without a password, a bad root."""


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UIStartError(f"--auth / {AUTH_ENV}: expected USER:PASSWORD, got a value without both parts")
    return user, password


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UIStartError(f"port {port} on {host} is already in use ({exc.strerror}; another sdlora ui?): "
                               "stop it or choose another with --port") from None


def _move_queue(runs_root: Path, every: float = 1.0) -> None:
    """Start the next queued run whenever none trains, whether or not a page is open."""
    from sdlora.ui import runs

    while True:
        try:
            runs.advance(runs_root)
        except (UserError, OSError) as exc:  # a run folder removed or unreadable: say so, keep the queue moving
            print(f"sdlora ui: queue: {exc}", file=sys.stderr, flush=True)
        time.sleep(every)


def serve(roots: list[Path], runs_root: Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          block: bool = True):
    """Build and launch the app; returns the gradio app (when `block` is False) for tests to close."""
    credentials = parse_auth(auth or os.environ.get(AUTH_ENV))
    if host not in LOCAL_HOSTS and credentials is None:
        raise UIStartError(f"--host {host} makes the UI reachable from other machines: give --auth USER:PASSWORD "
                           f"(or set {AUTH_ENV}), or keep the default 127.0.0.1")
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise UIStartError(f"--root {missing[0]}: no such folder; give folders that exist")
    check_port_free(host, port)  # before importing gradio (seconds): a second UI is told at once
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UIStartError("the web UI needs gradio: pip install 'sdlora[ui]'") from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes are not the user's news
    from sdlora.ui.app import CSS, Settings, build

    runs_root.mkdir(parents=True, exist_ok=True)
    settings = Settings(roots=[r.resolve() for r in roots], runs_root=runs_root.resolve(),
                        images=(runs_root / "generated").resolve())
    page = build(settings)
    page.queue(default_concurrency_limit=1)  # one generation at a time: on a CPU, two would fight over the cores
    page.launch(server_name=host, server_port=port, auth=credentials, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(p) for p in settings.readable], show_error=True, css=CSS)
    threading.Thread(target=_move_queue, args=(settings.runs_root,), name="sdlora-ui-queue", daemon=True).start()
    print(f"sdlora ui: http://{host}:{port}  (roots: {', '.join(map(str, settings.roots))}; runs: "
          f"{settings.runs_root})", flush=True)
    if block:
        try:
            page.block_thread()
        except KeyboardInterrupt:
            print("sdlora ui: closed; runs it started keep training", file=sys.stderr)
        return None
    return page
