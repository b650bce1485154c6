import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel

from erasure.bundle import TOYWORLD_MODEL
from erasure.toyworld import clip, pretrain
from erasure.toyworld.captions import HELD_OUT_PAIRS, held_out
from erasure.toyworld.world import ATTRIBUTES, sample_scene


@pytest.mark.parametrize("seed", range(4))
def test_hard_negatives_are_false_of_their_scene_and_keep_held_out_pairs_out_of_absence_clauses(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        scene = sample_scene(rng)
        positive = clip.true_caption(scene, rng)
        negative = clip.false_caption(scene, positive, rng)
        assert positive.text and clip.holds(positive, scene)
        assert not clip.holds(negative, scene), (negative.text, scene.shape, scene.color, scene.style)
        for caption in (positive, negative):  # a held-out (shape, colour) pair is never one named, one absent
            pairs = [(a, b) for a in caption.named for b in caption.absent] + [(b, a) for a in caption.named for b in caption.absent]
            assert not any(held_out(s, c) for s, c in pairs if s in ATTRIBUTES["shape"] and c in ATTRIBUTES["color"])


def test_truth_is_what_is_named_and_what_is_absent():
    scene = pretrain.scene_of(torch.tensor([0, 0, 1]))  # a red striped circle
    captions = [clip.Caption("a red circle", {"red", "circle"}), clip.Caption("a red shape without any circle", {"red"}, {"circle"}),
                clip.Caption("a red shape without any square", {"red"}, {"square"}), clip.Caption("a blue circle", {"blue", "circle"})]
    assert [clip.holds(c, scene) for c in captions] == [True, False, True, False]
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(20)]
    captions = [clip.true_caption(s, rng) for s in scenes] + [clip.false_caption(s, clip.true_caption(s, rng), rng) for s in scenes]
    expected = torch.tensor([[clip.holds(c, s) for c in captions] for s in scenes])
    assert torch.equal(clip.truth_matrix(captions, scenes), expected)


def test_quick_training_writes_a_clip_folder_transformers_and_sds_text_slot_load(tmp_path):
    clip.main(["--quick", "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
               "--init", str(TOYWORLD_MODEL.parent)])
    folder = tmp_path / "out" / clip.CLIP_FOLDER
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    text_tower = CLIPTextModel.from_pretrained(folder)
    weights = text_weights(load_file(folder / "model.safetensors"))
    tower = text_weights(text_tower.state_dict())
    assert tower.keys() == weights.keys() and all(torch.equal(value, weights[name]) for name, value in tower.items())
    inputs = processor(text=["a red circle", "a blue square"], images=[np.zeros((32, 32, 3), np.uint8)],
                       return_tensors="pt", padding=True)
    assert inputs.pixel_values.shape == (1, 3, 32, 32) and float(inputs.pixel_values.min()) == -1.0
    assert model(**inputs).logits_per_image.shape == (1, 2)
    record = json.loads((folder / "training.json").read_text())
    accuracies = record["held_out"]["renders"]
    assert set(accuracies["zero_shot"]) == set(ATTRIBUTES)
    assert 0 <= accuracies["negation_held_out_pairs"]["balanced"] <= 1 and len(HELD_OUT_PAIRS) == 6


def test_the_unet_trains_under_a_frozen_clip_text_tower(tmp_path):
    clip.main(["--quick", "--output", str(tmp_path / "clip"), "--work", str(tmp_path / "work"),
               "--init", str(TOYWORLD_MODEL.parent)])
    pretrain.main(["--quick", "--init", str(TOYWORLD_MODEL.parent), "--text-encoder", str(tmp_path / "clip" / "clip"),
                   "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    tower = text_weights(load_file(tmp_path / "clip" / "clip" / "model.safetensors"))
    slot = text_weights(load_file(tmp_path / "out" / "sd" / "text_encoder" / "model.safetensors"))
    assert slot.keys() == tower.keys() and all(torch.equal(slot[name], tower[name]) for name in slot)


def text_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's tensors, named as inside it (a CLIPModel file holds them as ``text_model.*``)."""
    return {name.removeprefix("text_model."): value for name, value in state.items()
            if name.startswith("text_model.") or not name.startswith(("vision_model.", "visual_", "text_projection", "logit_scale"))}
