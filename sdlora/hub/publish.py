"""What happens to a training run's outputs beyond its folder: the model card when it ends, and with
`hub.push_checkpoints` its checkpoints and the finished run uploaded in the background.

A training run calls these through its `publisher` (`training.run.Publisher`); it never imports the Hub itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sdlora.config import RunConfig
from sdlora.hub.card import write_card
from sdlora.hub.transfer import CheckpointPusher
from sdlora.training.folder import RunFolder

log = logging.getLogger(__name__)


class RunPublisher:
    """Called by the main process only; the upload thread starts with the first checkpoint, not before."""

    def __init__(self, config: RunConfig):
        hub = config.hub
        self._push = hub.push_checkpoints
        self._repo_id = hub.repo_id  # checked when the config was loaded
        self._private = hub.private
        self._folder = Path(config.output.dir)
        self._pusher: CheckpointPusher | None = None

    def _uploads(self) -> CheckpointPusher | None:
        if self._push and self._pusher is None:
            self._pusher = CheckpointPusher(self._folder, self._repo_id, self._private)
        return self._pusher

    def checkpoint_written(self, path: Path) -> None:
        pusher = self._uploads()
        if pusher is not None:
            pusher.submit(path)

    def run_finished(self, folder: RunFolder, dataset_size: int) -> None:
        log.info("model card written: %s", write_card(folder.root, dataset_size=dataset_size))
        pusher = self._uploads()
        if pusher is not None:
            pusher.submit_run()
            pusher.close()
