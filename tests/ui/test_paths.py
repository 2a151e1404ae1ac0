"""The file browser stays inside --root: `..`, absolute paths elsewhere and symlinks out are refused."""

from __future__ import annotations

import pytest

from sdlora.ui.dataset import save_caption
from sdlora.ui.paths import OutsideRootError, inside_roots


@pytest.fixture
def world(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "set").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (outside / "secret.txt").write_text("keep")
    (root / "set" / "a.png").write_bytes(b"png")
    (root / "out").symlink_to(outside)
    (root / "set" / "link.png").symlink_to(outside / "secret.png")
    return root, outside


def test_paths_inside_a_root_are_given_back_resolved(world):
    root, _ = world
    assert inside_roots("set", [root]) == (root / "set").resolve()
    assert inside_roots(root / "set" / "a.png", [root]) == (root / "set" / "a.png").resolve()
    assert inside_roots(root, [root]) == root.resolve()


@pytest.mark.parametrize("path", ["../outside", "set/../../outside", "set/../set", "/etc", "/", "out",
                                  "out/secret.png", "set/link.png", ""])
def test_escapes_are_refused(world, path):
    root, _ = world
    with pytest.raises(OutsideRootError):
        inside_roots(path, [root])


def test_an_absolute_path_outside_is_refused_and_names_the_roots(world):
    root, outside = world
    with pytest.raises(OutsideRootError, match="outside the folders this UI may open"):
        inside_roots(outside / "secret.png", [root])


def test_a_caption_is_never_written_through_a_link_out_of_the_root(world):
    root, outside = world
    with pytest.raises(OutsideRootError):
        save_caption(root / "set" / "link.png", "overwritten", [root])
    assert (outside / "secret.txt").read_text() == "keep"
    (root / "set" / "a.txt").symlink_to(outside / "secret.txt")  # an image inside whose caption links out
    with pytest.raises(OutsideRootError):
        save_caption(root / "set" / "a.png", "overwritten", [root])
    assert (outside / "secret.txt").read_text() == "keep"


def test_no_root_means_nothing_can_be_opened(world):
    with pytest.raises(OutsideRootError, match="--root"):
        inside_roots("set", [])
