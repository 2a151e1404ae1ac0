"""The one place that knows adapter file layouts and key names: diffusers/peft and kohya files (`adapter.py`,
`kohya.py`), LDM/SGM checkpoint names (`ldm.py`), metadata, single-file export.

The package's public names are re-exported here."""

from sdlora.formats.adapter import (  # noqa: F401
    COMPONENTS,
    DTYPES,
    AdapterFile,
    AdapterFormatError,
    check_target,
    convert,
    detect_format,
    fold_alpha,
    from_diffusers_state_dict,
    from_kohya_state_dict,
    read_adapter,
    read_metadata,
    read_safetensors,
    save_adapter,
    save_diffusers,
    save_kohya,
    shape_from_tensors,
    to_diffusers_state_dict,
)
from sdlora.formats.lycoris import describe  # noqa: F401  (adapter.describe plus type and options)
