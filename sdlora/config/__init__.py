"""The run's typed configuration: the schema (`schema.py`) and reading files and overrides (`files.py`).

The package's public names are re-exported here."""

from sdlora.config.files import (  # noqa: F401
    ConfigError,
    apply_overrides,
    explain,
    read_config_file,
)
from sdlora.config.schema import (  # noqa: F401
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_TARGETS,
    BucketSection,
    CaptionSection,
    DataSection,
    FolderSettings,
    HubSection,
    LoraSection,
    ModelSection,
    OutputSection,
    RegularizationSection,
    RunConfig,
    SafetySection,
    SampleSection,
    SourceSection,
    TrainSection,
    dump_config,
    load_config,
    load_folder_settings,
    validate_config,
)
