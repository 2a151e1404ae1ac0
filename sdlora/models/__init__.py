"""Base models and what is attached to them: loading (`base.py`), families, LoRA through peft, precision, quantization,
the built-in tiny bases.

The package's public names are re-exported here."""

from sdlora.models.base import (  # noqa: F401
    BUILTIN_BASES,
    PACKAGED_BASES,
    SINGLE_FILE_SUFFIXES,
    BaseModel,
    ModelLoadError,
    cache_root,
    freeze,
    load_base_model,
    place,
    resolve_builtin,
    set_attention_backend,
    single_file_family,
    vae_dtype_for,
)
from sdlora.models.native import NativeResolution, caption_token_counter, native_resolution  # noqa: F401, E402
