"""Concept examples: MACE's folder layout and the registered sources (the toy world's renderer)."""

import numpy as np
import pytest
from PIL import Image

from erasure.examples import concept_examples, folder_examples
from erasure.toyworld.world import concept_scenes


def test_folder_examples_read_the_authors_layout_and_a_missing_folder_is_named(tmp_path):
    images, masks = concept_scenes("circle", 3, 0)
    (tmp_path / "circle").mkdir()
    (tmp_path / "circle mask").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(image).save(tmp_path / "circle" / f"{i}.png")
        Image.fromarray((mask > 0.5).astype(np.uint8) * 255).save(tmp_path / "circle mask" / f"{i}.png")
    read, read_masks = folder_examples(tmp_path, "circle", 8, 32, True)
    assert np.array_equal(read, images) and np.array_equal(read_masks > 0.5, masks > 0.5)
    assert folder_examples(tmp_path, "circle", 8, 32, False)[1] is None
    with pytest.raises(ValueError, match="method.data: no folder .*star"):
        folder_examples(tmp_path, "star", 8, 32, True)


def test_the_renderer_is_a_registered_source():
    images, masks = concept_examples("renderer", "circle", 3, 32, 0)
    expected_images, expected_masks = concept_scenes("circle", 3, 0)
    assert np.array_equal(images, expected_images) and np.array_equal(masks, expected_masks)
    assert concept_examples("renderer", "circle", 3, 32, 0, masks=False)[1] is None
