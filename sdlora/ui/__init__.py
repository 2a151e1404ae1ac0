"""`sdlora ui`: a local web page over the same functions the CLI calls (config, data, inference, hub), with each
training run as its own `sdlora train` process. Gradio is imported only when the page starts (`server.serve`),
so sdlora installs and runs without it."""

from sdlora.ui.paths import OutsideRootError, inside_roots  # noqa: F401
from sdlora.ui.server import UIStartError, serve  # noqa: F401
