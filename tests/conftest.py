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
