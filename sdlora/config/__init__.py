"""The run's typed configuration: the schema (`schema.py`) and reading files and overrides (`files.py`).

The package's public names are re-exported here."""

from sdlora.config.schema import (  # noqa: F401
    BucketSection,
    CaptionSection,
    DataSection,
    FolderSettings,
    HubSection,
    LoraSection,
    ModelSection,
    OutputSection,
    RunConfig,
    SafetySection,
    SampleSection,
    SourceSection,
    TEXT_ENCODER_ATTENTION_TARGETS,
    TrainSection,
    UNET_ATTENTION_TARGETS,
    dump_config,
    load_config,
    load_folder_settings,
    validate_config,
)
from sdlora.config.files import (  # noqa: F401
    ConfigError,
    apply_overrides,
    explain,
    read_config_file,
)
