"""The exceptions that mean "the user can fix this": the CLI prints them as one line instead of a traceback."""

from sdlora.hub.card import CardError
from sdlora.training.checkpoint import CheckpointError
from sdlora.config import ConfigError
from sdlora.data import DatasetError, ImageLoadError
from sdlora.files.atomic import DiskFullError
from sdlora.formats import AdapterFormatError
from sdlora.hub import HubError
from sdlora.models import ModelLoadError
from sdlora.training.divergence import NumericError
from sdlora.training.lock import OutputLockedError
from sdlora.files.untrusted import UnsafeFileError

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
