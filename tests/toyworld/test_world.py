import numpy as np
import pytest

from erasure.toyworld.world import (
    ATTRIBUTES, COLOR_RGB, IMAGE_SIZE, SHAPES, STYLES, attribute_of, concept_scenes, render, render_array, sample_scene,
)


def test_same_seed_same_images_and_different_seeds_differ():
    first = render_array([sample_scene(np.random.default_rng(7)) for _ in range(1)])
    again = render_array([sample_scene(np.random.default_rng(7)) for _ in range(1)])
    other = render_array([sample_scene(np.random.default_rng(8)) for _ in range(1)])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_images_are_32x32_rgb_and_vary_within_a_concept():
    rng = np.random.default_rng(0)
    images = render_array([sample_scene(rng, shape="circle", color="red", style="solid") for _ in range(8)])
    assert images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == 8  # position, size, background vary


@pytest.mark.parametrize("color", list(COLOR_RGB))
def test_painted_pixels_have_the_named_colour(color):
    scene = sample_scene(np.random.default_rng(1), shape="square", color=color, style="solid")
    image = np.asarray(render(scene)).reshape(-1, 3).astype(int)
    background = np.array(scene.background)
    painted = image[np.abs(image - background).sum(1) > 60]
    assert len(painted) > 100
    nearest = [min(COLOR_RGB, key=lambda c: np.abs(np.array(COLOR_RGB[c]) - p).sum()) for p in painted]
    assert np.mean([n == color for n in nearest]) > 0.9


def test_styles_paint_different_amounts():
    """Solid paints the most, outline the least; stripes and dots lie in between."""
    painted = {}
    for style in STYLES:
        scene = sample_scene(np.random.default_rng(3), shape="square", color="blue", style=style)
        image = np.asarray(render(scene)).astype(int)
        painted[style] = (np.abs(image - np.array(scene.background)).sum(-1) > 60).sum()
    assert painted["solid"] > painted["striped"] > painted["outline"]
    assert painted["solid"] > painted["dotted"] > painted["outline"] * 0.5


def test_every_shape_renders_a_distinct_silhouette():
    masks = {}
    for shape in SHAPES:
        scene = sample_scene(np.random.default_rng(5), shape=shape, color="green", style="solid")
        scene = type(scene)(**{**scene.__dict__, "center": (16.0, 16.0), "radius": 12.0, "rotation": 0.0})
        masks[shape] = np.abs(np.asarray(render(scene)).astype(int) - np.array(scene.background)).sum(-1) > 60
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 30, (a, b)


def test_attribute_of_names_the_attribute_and_rejects_unknown_concepts():
    assert [attribute_of(c) for c in ("circle", "red", "dotted")] == ["shape", "color", "style"]
    assert set(ATTRIBUTES) == {"shape", "color", "style"}
    with pytest.raises(ValueError, match="unknown toy-world concept 'dog'"):
        attribute_of("dog")


def test_the_concepts_scenes_come_with_their_exact_masks():
    images, masks = concept_scenes("striped red circle", 4, 0)
    assert images.shape == (4, 32, 32, 3) and masks.shape == (4, 32, 32)
    inside = masks > 0.5
    reds = images[inside].astype(int)
    assert (reds[:, 0] - reds[:, 1]).mean() > 60  # the object's pixels are red (stripes, on the background)
    assert 0.15 < inside.mean() < 0.6
