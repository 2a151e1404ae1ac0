"""The shapes world and its reader: the quality metrics are only as good as `read_scene`."""

from __future__ import annotations

import random

import pytest

from sdlora.evaluate import STRIPED_THRESHOLD, base_prompts, styled_prompts
from sdlora.shapes import NOT_BLACK, SHAPES, SUBJECT_SHAPE, random_scene, read_scene, render


@pytest.mark.parametrize("style", ["plain", "outline"])
def test_reader_recovers_colours_and_shape_of_rendered_scenes(style):
    rng = random.Random(0)
    scenes = [random_scene(rng, style=style, shape=rng.choice(SHAPES + (SUBJECT_SHAPE,))) for _ in range(80)]
    readings = [read_scene(render(s)) for s in scenes]
    assert sum(r.background == s.background for r, s in zip(readings, scenes)) == len(scenes)
    if style == "plain":
        assert sum(r.color == s.color for r, s in zip(readings, scenes)) == len(scenes)
        assert sum(r.shape == s.shape for r, s in zip(readings, scenes)) == len(scenes)
        assert all(r.stripe_fraction == 0 for r, s in zip(readings, scenes) if "black" not in (s.color, s.background))


def test_reader_sees_stripes_only_on_striped_scenes():
    rng = random.Random(1)
    striped = [read_scene(render(random_scene(rng, style="striped", colors=NOT_BLACK))) for _ in range(40)]
    plain = [read_scene(render(random_scene(rng, colors=NOT_BLACK))) for _ in range(40)]
    assert min(r.stripe_fraction for r in striped) > STRIPED_THRESHOLD
    assert max(r.stripe_fraction for r in plain) < STRIPED_THRESHOLD


def test_prompt_sets_are_fixed_and_cover_the_world():
    prompts = base_prompts()
    assert len(prompts) == 30 and prompts == base_prompts()
    assert {p.shape for p in prompts} == set(SHAPES)
    assert len({p.color for p in prompts}) == 6
    subject = styled_prompts(subject=True)
    assert all("sks ring" in p.text and p.text.endswith("striped style") for p in subject)
    assert all("black" not in p.text for p in subject)


def test_captions_name_the_trigger_word_for_the_subject():
    scene = random_scene(random.Random(3), shape=SUBJECT_SHAPE)
    assert f" sks {SUBJECT_SHAPE} on a " in scene.caption
    assert random_scene(random.Random(3), style="striped").caption.endswith(", striped style")
