"""The new concepts used to prove training (a bar and a ring shape, a pink colour): rendered like the world, captioned with a
trigger word, and judged by pixels that never mistake a base-world scene for them."""
import numpy as np
import pytest
from PIL import ImageFilter

from sd_demo.shapes import evaluate, parse_prompt, render, sample_scenes
from sd_demo.shapes.novel import (PINK, bar_scenes, object_is_pink, pink_scenes, render_novel, ring_scenes,
                                  shows_bar, shows_ring, write_dataset)
from sd_demo.shapes.vocab import PALETTE


def _blurred(image, blur):
    return image.filter(ImageFilter.GaussianBlur(blur)) if blur else image


@pytest.mark.parametrize("blur", [0, 1.5, 3])
def test_judges_are_right_on_ground_truth_and_never_fire_on_the_base_world(blur):
    base = [_blurred(render(s), blur) for s in sample_scenes(90, 3, "all")]
    assert all(shows_ring(_blurred(render_novel(s), blur)) for s in ring_scenes(40, 1))
    assert not any(shows_ring(im) for im in base)
    assert all(shows_bar(_blurred(render_novel(s), blur)) for s in bar_scenes(40, 1))
    assert not any(shows_bar(im) for im in base)
    assert all(object_is_pink(_blurred(render_novel(s), blur)) for s in pink_scenes(40, 2))
    assert not any(object_is_pink(im) for im in base)


def test_pink_is_far_from_every_palette_colour():
    assert min(np.linalg.norm(np.subtract(PINK, rgb)) for rgb in PALETTE.values()) > 130


@pytest.mark.parametrize("scenes", [ring_scenes, bar_scenes])
def test_new_shapes_keep_the_scene_labels_the_base_judge_reads(scenes):
    """Colour, background, size and position of a ring or bar are judged like any object's: only the shape is new."""
    for ns in scenes(40, 5):
        image = render_novel(ns)
        spec = ns.scene.spec()
        result = evaluate(spec.only(("color", "background", "size", "position")), image)
        assert result.ok, result.summary()


def test_captions_put_the_trigger_where_the_concept_is(tmp_path):
    ring = ring_scenes(1, 0)[0]
    text = ring.caption("zkring", "canonical")
    assert "zkring" in text and "circle" not in text
    assert parse_prompt(text).color == ring.scene.obj.color
    pink = pink_scenes(1, 0)[0]
    assert pink.caption("<pink>", "full").split()[2] == "<pink>"  # "a small <pink> square ..."
    folder = write_dataset(ring_scenes(3, 0), "zkring", tmp_path / "d")
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "000.txt", "001.png", "001.txt", "002.png",
                                                        "002.txt"]
    assert "zkring" in (folder / "000.txt").read_text()


def test_scenes_are_seeded():
    assert [s.caption("x") for s in ring_scenes(5, 9)] == [s.caption("x") for s in ring_scenes(5, 9)]
    assert [s.caption("x") for s in ring_scenes(5, 9)] != [s.caption("x") for s in ring_scenes(5, 10)]
