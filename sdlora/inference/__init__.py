"""Generation with stacked adapters at weights (`pipeline.py`), XY grids, merges.

The package's public names are re-exported here."""

from sdlora.inference.base_choice import BaseChoice, BaseChoiceError, choose_base  # noqa: F401
from sdlora.inference.grid import GridLayout, grid_layout, image_grid  # noqa: F401
from sdlora.inference.pipeline import (  # noqa: F401
    SCHEDULERS,
    AdapterSpec,
    AdapterStack,
    GenerationSettingError,
    LoraNameError,
    ReadAdapter,
    build_pipeline,
    generate,
    generation_device,
    parse_prompt_loras,
    preview_adapters,
    prompt_specs,
    read_adapters,
    resolve_in_folder,
    stack_adapters,
)
