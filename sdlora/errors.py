"""The exceptions that mean "the user can fix this": the CLI prints them as one line instead of a traceback."""

from sdlora.card import CardError
from sdlora.checkpoint import CheckpointError
from sdlora.config import ConfigError
from sdlora.data import DatasetError, ImageLoadError
from sdlora.fileio import DiskFullError
from sdlora.formats import AdapterFormatError
from sdlora.hub import HubError
from sdlora.models import ModelLoadError
from sdlora.numeric import NumericError
from sdlora.runlock import OutputLockedError
from sdlora.safefiles import UnsafeFileError

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
