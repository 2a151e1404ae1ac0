"""The exceptions that mean "the user can fix this": the CLI prints them as one line instead of a traceback."""

from sdlora.config import ConfigError
from sdlora.data import DatasetError, ImageLoadError
from sdlora.files.atomic import DiskFullError
from sdlora.files.untrusted import UnsafeFileError
from sdlora.formats import AdapterFormatError
from sdlora.hub import HubError
from sdlora.hub.card import CardError
from sdlora.models import ModelLoadError
from sdlora.training.checkpoint import CheckpointError
from sdlora.training.divergence import NumericError
from sdlora.training.lock import OutputLockedError

USER_ERRORS: tuple[type[BaseException], ...] = (
    AdapterFormatError,
    CardError,
    CheckpointError,
    ConfigError,
    DatasetError,
    DiskFullError,
    HubError,
    ImageLoadError,
    ModelLoadError,
    NumericError,
    OutputLockedError,
    UnsafeFileError,
)
