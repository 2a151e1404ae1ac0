"""UNet module paths in diffusers layout <-> Stability's SGM/LDM layout (`input_blocks.N.M`, `middle_block`, ...).

The one UNet key map of the file-format layer (`formats`): SDXL LoRA files from kohya sd-scripts, and what
AUTOMATIC1111 / ComfyUI key their SDXL modules by, name UNet modules the SGM way, while peft and diffusers use
diffusers paths (`kohya.py`); a single-file checkpoint holds the UNet's weights under the same names
(`singlefile.py`). The table follows LDM's `UNetModel` construction: `input_blocks[0]` is conv_in, then per level
`layers_per_block` entries of (ResBlock[, SpatialTransformer]) and one Downsample; `output_blocks` has
`layers_per_block + 1` entries per level, the last one carrying the Upsample after its ResBlock (and
SpatialTransformer, when the level has attention). Paths may be module paths or weight keys (`....weight`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sdlora.errors import UserError

LAYERS_PER_BLOCK = 2  # SD1, SD2 and SDXL all use 2; the mapping needs it to number blocks

# Renames inside a ResBlock: diffusers name -> SGM name.
_RESNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_BACK = {sgm: diffusers for diffusers, sgm in _RESNET_INNER.items()}
# Modules outside the blocks. SDXL's size/pooled-text embedding and a class embedding are both SGM's label_emb:
# reading SGM names back gives add_embedding, the one SDXL has.
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
_TOP_LEVEL_BACK = {sgm: diffusers for diffusers, sgm in reversed(_TOP_LEVEL.items())}


class LayoutError(UserError, ValueError):
    """A module path that has no counterpart in the other layout."""


def rename_prefix(path: str, table: dict[str, str]) -> str:
    """`path` with its leading module (a key of `table`, matched whole dotted parts) renamed; else `path` itself."""
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def up_attention(paths: Iterable[str]) -> frozenset[int]:
    """The up levels that have attention (`up_blocks.N.attentions.`), from a UNet's module paths or weight keys."""
    return frozenset(int(m[1]) for path in paths if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", path)))


def to_sgm(path: str, *, up_attention_blocks: frozenset[int], layers_per_block: int = LAYERS_PER_BLOCK) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`. `up_attention_blocks`: the up levels
    that have attention (`up_attention`; it decides whether an upsampler is `output_blocks.N.1` or `.2`)."""
    top = rename_prefix(path, _TOP_LEVEL)
    if top != path:
        return top
    per = layers_per_block + 1
    match = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if match:
        i, kind, j, rest = int(match[1]), match[2], int(match[3]), match[4]
        inner = "0." + rename_prefix(rest, _RESNET_INNER) if kind == "resnets" else "1." + rest
        return f"input_blocks.{per * i + j + 1}.{inner}"
    match = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)$", path)
    if match:
        return f"input_blocks.{per * (int(match[1]) + 1)}.0.op{match[2]}"
    match = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if match:
        kind, j, rest = match[1], int(match[2]), match[3]
        index = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{index}.{rename_prefix(rest, _RESNET_INNER) if kind == 'resnets' else rest}"
    match = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if match:
        i, kind, j, rest = int(match[1]), match[2], int(match[3]), match[4]
        inner = "0." + rename_prefix(rest, _RESNET_INNER) if kind == "resnets" else "1." + rest
        return f"output_blocks.{per * i + j}.{inner}"
    match = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)$", path)
    if match:
        i = int(match[1])
        slot = 2 if i in up_attention_blocks else 1
        return f"output_blocks.{per * i + layers_per_block}.{slot}.conv{match[2]}"
    raise LayoutError(f"UNet module {path!r} has no SGM name")


def from_sgm(path: str, layers_per_block: int = LAYERS_PER_BLOCK) -> str:
    """Inverse of `to_sgm`. Paths already in diffusers layout come back unchanged."""
    top = rename_prefix(path, _TOP_LEVEL_BACK)
    if top != path:
        return top
    per = layers_per_block + 1
    match = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if match:
        n, slot, rest = int(match[1]), int(match[2]), match[3]
        if n % per == 0 and slot == 0 and (rest == "op" or rest.startswith("op.")):
            return f"down_blocks.{n // per - 1}.downsamplers.0.conv{rest[2:]}"
        i, j = divmod(n - 1, per)
        if slot == 0:
            return f"down_blocks.{i}.resnets.{j}.{rename_prefix(rest, _RESNET_BACK)}"
        return f"down_blocks.{i}.attentions.{j}.{rest}"
    match = re.match(r"^middle_block\.(\d+)\.(.+)$", path)
    if match:
        index, rest = int(match[1]), match[2]
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{index // 2}.{rename_prefix(rest, _RESNET_BACK)}"
    match = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if match:
        n, slot, rest = int(match[1]), int(match[2]), match[3]
        i, j = divmod(n, per)
        if slot > 0 and (rest == "conv" or rest.startswith("conv.")):
            return f"up_blocks.{i}.upsamplers.0.conv{rest[4:]}"
        if slot == 0:
            return f"up_blocks.{i}.resnets.{j}.{rename_prefix(rest, _RESNET_BACK)}"
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    return path
