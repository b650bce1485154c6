import json

import pytest
import torch

from erasure.bundle import TOYWORLD_CLASSIFIER, TOYWORLD_MODEL, load_pipeline
from erasure.toyworld.classifier import load_classifier

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def toy_pipeline():
    """The shipped toy-world pipeline (loaded once; tests must not modify its weights)."""
    return load_pipeline(TOYWORLD_MODEL)


@pytest.fixture(scope="session")
def toy_classifier():
    return load_classifier(TOYWORLD_CLASSIFIER)


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Weights of a small random open_clip model registered as ``tiny-clip-test``."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    (folder / "tiny-clip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "tiny-clip-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "weights.safetensors")
    return folder / "weights.safetensors"
