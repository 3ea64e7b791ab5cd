import numpy as np
import pytest

from training.toy_world import world


def test_same_seed_same_images_different_seed_different():
    a = world.render_array(world.scenes(7, 12, world.BACKGROUNDS))
    b = world.render_array(world.scenes(7, 12, world.BACKGROUNDS))
    c = world.render_array(world.scenes(8, 12, world.BACKGROUNDS))
    assert a.shape == (12, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_world_size_meets_the_brief():
    assert len(world.COLOURS) >= 6 and len(world.SHAPES) >= 3 and len(world.PLAIN_BACKGROUNDS) >= 2
    assert len(world.base_captions()) == len(world.COLOURS) * len(world.SHAPES) * len(world.PLAIN_BACKGROUNDS)
    assert set(world.PATTERNS).isdisjoint(world.PLAIN_BACKGROUNDS)


@pytest.mark.parametrize(
    "attrs,caption",
    [
        (("red", "circle", "white"), "a red circle on a white background"),
        (("red", "circle", None), "a red circle"),
        ((None, "square", "dotted"), "a square on a dotted background"),
        (("blue", None, "black"), "a blue shape on a black background"),
        ((None, None, "striped"), "a striped background"),
        (("orange", "triangle", "black"), "an orange triangle on a black background"),
        (("green", "square", "ohwx"), "a green square on an ohwx background"),
    ],
)
def test_captions(attrs, caption):
    assert world.caption_for(*attrs) == caption


def test_patterns_differ_from_plain_and_each_other():
    import random

    rng = random.Random(0)
    sc = world.sample_scene(rng, colour="red", shape="circle", background="white")
    renders = {b: np.asarray(world.render(world.Scene(**{**sc.__dict__, "background": b}))) for b in world.BACKGROUNDS}
    for a in world.BACKGROUNDS:
        for b in world.BACKGROUNDS:
            if a < b:
                assert np.abs(renders[a].astype(int) - renders[b].astype(int)).mean() > 5, (a, b)


def test_unknown_attributes_are_refused():
    import random

    sc = world.sample_scene(random.Random(0))
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        world.render(world.Scene(**{**sc.__dict__, "shape": "hexagon"}))
    with pytest.raises(ValueError, match="unknown background 'plaid'"):
        world.render(world.Scene(**{**sc.__dict__, "background": "plaid"}))
