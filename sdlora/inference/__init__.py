"""Generation with stacked adapters at weights (`pipeline.py`), `<lora:…>` prompt tags (`prompt_tags.py`), XY
grids, merges.

The package's public names are re-exported here."""

from sdlora.inference.base_choice import BaseChoice, BaseChoiceError, choose_base  # noqa: F401
from sdlora.inference.class_images import ClassImages, make_class_images  # noqa: F401
from sdlora.inference.grid import GridLayout, grid_layout, image_grid  # noqa: F401
from sdlora.inference.pipeline import (  # noqa: F401
    SCHEDULERS,
    AdapterSpec,
    AdapterStack,
    GenerationSettingError,
    ReadAdapter,
    build_pipeline,
    generate,
    generation_device,
    preview_adapters,
    read_adapters,
    stack_adapters,
)
from sdlora.inference.prompt_tags import LoraNameError, parse_prompt_loras, prompt_specs, resolve_in_folder  # noqa: F401
