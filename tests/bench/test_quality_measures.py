"""The quality measures detect what they claim, on drawn pictures whose content is known: a subject that leaks into
prompts without its trigger, a style that damages some pictures while the average looks fine, the grid's tiles."""

from __future__ import annotations

from sdlora.bench.quality import (
    adherence,
    grid_prompt,
    leak,
    make_prompt,
    style_damage,
    styled_prompts,
    tile_ok,
)
from sdlora.bench.shapes import NOT_BLACK, SUBJECT_SHAPE, Scene, read_scene, render


def draw(prompt, style="plain", shape=None, color=None):
    return render(Scene(shape or prompt.shape, color or prompt.color, prompt.background, (0.5, 0.5), 0.28, style))


def other_color(prompt):
    """A colour neither the prompt's shape nor its background has: the shape stays visible, in the wrong colour."""
    return next(c for c in NOT_BLACK if c not in (prompt.color, prompt.background))


PLAIN = styled_prompts(style=False)  # 12 prompts without the trigger, three shapes, no black


def test_a_subject_that_leaks_rings_into_prompts_without_its_trigger_is_caught():
    base = [draw(p) for p in PLAIN]
    assert leak(base, base) == {"ring": 0.0, "shape_kept": 1.0, "changed": 0.0, "pixels": 0.0}
    # Every other picture turned into the ring: half the pictures leak.
    leaking = [draw(p, shape=SUBJECT_SHAPE) if i % 2 else draw(p) for i, p in enumerate(PLAIN)]
    found = leak(base, leaking)
    assert found["ring"] == 0.5 and found["shape_kept"] == 0.5 and found["changed"] == 0.5
    assert found["pixels"] > 0.01


def test_a_subject_that_changes_colours_without_drawing_rings_still_counts_as_changed():
    base = [draw(p) for p in PLAIN]
    recoloured = [draw(p, color=other_color(p)) for p in PLAIN]
    found = leak(base, recoloured)
    assert found["ring"] == 0.0 and found["shape_kept"] == 1.0  # no ring, same shapes...
    assert found["changed"] == 1.0 and found["pixels"] > 0.05  # ...but every picture differs from the base's


def test_style_damage_is_counted_per_picture_not_on_average():
    prompts = styled_prompts()
    base = [read_scene(draw(p)) for p in prompts]
    good = [read_scene(draw(p, style="striped")) for p in prompts]
    assert style_damage(prompts, base, good) == {"content_kept": 1.0, "right_and_striped": 1.0}
    # Half the pictures striped on the wrong colour, the other half right but plain: on average the style
    # "keeps colour 0.5 and stripes 0.5", per picture no picture is both right and striped.
    mixed = [read_scene(draw(p, style="striped", color=other_color(p))) if i % 2
             else read_scene(draw(p)) for i, p in enumerate(prompts)]
    rates = adherence(prompts, mixed)
    assert rates["striped"] == 0.5 and rates["color"] == 0.5
    assert style_damage(prompts, base, mixed) == {"content_kept": 0.5, "right_and_striped": 0.0}


def test_style_damage_counts_only_pictures_the_base_drew_right():
    prompts = styled_prompts()
    wrong_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}
    base = [read_scene(draw(p, shape=wrong_shape[p.shape] if i == 0 else None)) for i, p in enumerate(prompts)]
    styled = [read_scene(draw(p, style="striped", shape=wrong_shape[p.shape] if i == 0 else None))
              for i, p in enumerate(prompts)]
    assert not base[0].shape == prompts[0].shape  # the base missed this one: the style is not blamed for it
    assert style_damage(prompts, base, styled)["content_kept"] == 1.0


def test_adherence_reads_rings_and_stripes():
    prompts = styled_prompts(subject=True, style=True)
    readings = [read_scene(draw(p, style="striped")) for p in prompts]
    rates = adherence(prompts, readings)
    assert rates["ring"] == 1.0 and rates["striped"] == 1.0 and rates["shape"] == 1.0


def test_grid_tiles_pass_only_when_they_show_what_their_column_asks_for():
    row = ("yellow", "square", "green")
    plain, styled, subject = grid_prompt(row, "plain"), grid_prompt(row, "style"), grid_prompt(row, "subject")
    assert styled.text == "a yellow square on a green background, striped style"
    assert subject.text == "a yellow sks ring on a green background" and subject.shape == SUBJECT_SHAPE
    base = read_scene(draw(plain))
    assert tile_ok("plain", plain, base)
    assert tile_ok("style", styled, read_scene(draw(styled, style="striped")))
    assert not tile_ok("style", styled, base)  # no stripes
    assert tile_ok("subject", subject, read_scene(draw(subject)))
    assert tile_ok("both", grid_prompt(row, "both"), read_scene(draw(subject, style="striped")))
    assert tile_ok("leak", plain, base, base)
    assert not tile_ok("leak", plain, read_scene(draw(plain, shape=SUBJECT_SHAPE)), base)
    assert make_prompt("red", "circle", "blue", "both").text == "a red sks ring on a blue background, striped style"
