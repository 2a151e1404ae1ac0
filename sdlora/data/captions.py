"""Caption text for one use of an image: trigger words, tag shuffle / dropout, caption dropout.

Every random choice comes from the `rng` the dataset makes from (seed, epoch, item), so a resumed run or a run with
more loader workers sees the same text. Prefix and suffix are trigger words: they are never shuffled or dropped.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from sdlora.config import CaptionSection


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def build_caption(raw: str, options: CaptionSection, rng: random.Random) -> str:
    # Draws happen in a fixed order whatever the options, so turning one option on does not reshuffle the others.
    drop_caption = rng.random() < options.dropout
    text = raw
    if options.shuffle_tags or options.tag_dropout > 0:
        tags = split_tags(raw)
        kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
        if options.tag_dropout > 0:
            rest = [tag for tag in rest if rng.random() >= options.tag_dropout]
        if options.shuffle_tags:
            rng.shuffle(rest)
        text = ", ".join(kept + rest)
    if drop_caption:
        return ""
    return ", ".join(part for part in (options.prefix.strip(), text.strip(), options.suffix.strip()) if part)


def caption_from_filename(path: Path) -> str:
    """'red_circle-on_blue (2).png' -> 'red circle on blue': separators to spaces, copy counters removed."""
    stem = re.sub(r"\s*\(\d+\)$", "", path.stem)
    stem = re.sub(r"[_\-]+\d+$", "", stem)
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", stem)).strip()
