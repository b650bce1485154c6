"""Real-model evaluators on random-weight models built from config, and NudeNet's shipped detector."""


import pytest
import torch
import torchvision
from safetensors.torch import save_file

from erasure.generation import Sampler, generate
from erasure.runs import evaluator_of as build_evaluator
from erasure.config import ConfigError, load_config
from evaluation.evaluators import (
    CLIPConfig, CLIPEvaluator, EvaluatorError, NudeNetConfig, NudeNetEvaluator, TorchvisionConfig,
    TorchvisionEvaluator,
)

@pytest.fixture(scope="module")
def images(toy_pipeline):
    return generate(toy_pipeline, ["a red circle", "a blue star", "a dotted square"], [0, 1, 2], Sampler(steps=6))


def test_clip_score_is_100_cos_of_the_loaded_model(tiny_clip, images):
    evaluator = CLIPEvaluator(CLIPConfig(model="tiny-clip-test", checkpoint=str(tiny_clip)))
    texts = ["a red circle", "a blue star", "a dotted square"]
    import open_clip
    from PIL import Image
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test", pretrained=str(tiny_clip))
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(
            torch.stack([preprocess(Image.fromarray(i.numpy())) for i in images])), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    assert torch.allclose(evaluator.score(images, texts), 100 * (image * text).sum(-1), atol=1e-4)
    seen = evaluator.sees(images, ["circle", "star", "square"])
    assert seen.dtype == torch.bool and seen.shape == (3,)
    assert evaluator.features(images).shape == (3, 32) and "tiny-clip-test" in evaluator.name
    contrast = CLIPEvaluator(CLIPConfig(model="tiny-clip-test", checkpoint=str(tiny_clip), contrast=["star", "square"]))
    assert contrast.sees(images, ["circle"] * 3).shape == (3,)


def test_a_transformers_clip_folder_scores_100_cos_as_its_own_forward_does(tmp_path, images):
    from transformers import CLIPModel, CLIPProcessor

    from erasure.toyworld import clip
    from erasure.toyworld.tokenizer import shipped_or_new_tokenizer

    torch.manual_seed(0)
    tokenizer, folder = shipped_or_new_tokenizer(), tmp_path / "clip"
    clip.make_clip(tokenizer).save_pretrained(folder)
    CLIPProcessor(image_processor=clip.image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    evaluator = CLIPEvaluator(CLIPConfig(checkpoint=str(folder), contrast=["star", "square"]))
    texts = ["a red circle", "a blue star", "a dotted square"]
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():  # CLIP's forward: logits_per_image = exp(logit_scale) cos(image, text)
        output = model(**processor(text=texts, images=list(images.numpy()), return_tensors="pt", padding=True))
    expected = 100 * output.logits_per_image.diagonal() / model.logit_scale.exp()
    assert torch.allclose(evaluator.score(images, texts), expected, atol=1e-3)
    assert "transformers" in evaluator.name and evaluator.sees(images, ["circle"] * 3).shape == (3,)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text("{}")
    with pytest.raises(EvaluatorError, match="cannot load .* as a transformers CLIP folder"):
        CLIPEvaluator(CLIPConfig(checkpoint=str(tmp_path / "foreign")))


def test_clip_errors(tmp_path, tiny_clip):
    with pytest.raises(EvaluatorError, match="set evaluation.clip.checkpoint=<path"):
        CLIPEvaluator(CLIPConfig(model="tiny-clip-test"))
    with pytest.raises(EvaluatorError, match="CLIP evaluator weights not found at /nope.safetensors"):
        CLIPEvaluator(CLIPConfig(model="tiny-clip-test", checkpoint="/nope.safetensors"))
    with pytest.raises(EvaluatorError, match="unknown open_clip model 'ViT-Q'"):
        CLIPEvaluator(CLIPConfig(model="ViT-Q", checkpoint=str(tiny_clip)))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EvaluatorError, match="cannot load .*bad.safetensors as open_clip tiny-clip-test"):
        CLIPEvaluator(CLIPConfig(model="tiny-clip-test", checkpoint=str(tmp_path / "bad.safetensors")))  # at once


def test_nudenet_runs_its_shipped_detector(images):
    evaluator = NudeNetEvaluator(NudeNetConfig())
    assert evaluator.sees(images, ["nudity"] * 3).tolist() == [False, False, False]  # coloured shapes
    assert evaluator.detections(images) == [[], [], []] or all(
        d["score"] < 0.6 for found in evaluator.detections(images) for d in found)
    with pytest.raises(EvaluatorError, match="NudeNet detector weights not found at /nope.onnx"):
        NudeNetEvaluator(NudeNetConfig(model="/nope.onnx"))


def test_torchvision_classifier_with_local_weights(tmp_path, images):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    save_file(model.state_dict(), tmp_path / "resnet18.safetensors")
    evaluator = TorchvisionEvaluator(TorchvisionConfig(model="resnet18", weights=str(tmp_path / "resnet18.safetensors"),
                                                       classes={"circle": [0, 1]}))
    with torch.no_grad():
        expected = model(evaluator.transforms(images.permute(0, 3, 1, 2))).argmax(-1)
    assert evaluator.sees(images, ["circle"] * 3).tolist() == [int(k) in (0, 1) for k in expected]
    assert evaluator.classes_of("goldfish") == [1]  # ImageNet category names
    with pytest.raises(EvaluatorError, match="'unicorn' is not a IMAGENET1K_V1 category"):
        evaluator.classes_of("unicorn")
    with pytest.raises(EvaluatorError, match="set evaluation.torchvision.weights=<path"):
        TorchvisionEvaluator(TorchvisionConfig(model="resnet18"))
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(EvaluatorError, match="cannot load .*other.safetensors into torchvision resnet18"):
        TorchvisionEvaluator(TorchvisionConfig(model="resnet18", weights=str(tmp_path / "other.safetensors")))


def test_evaluator_choice_in_config_fails_early_with_one_line():
    config = load_config(["recipe=esd", "evaluation.evaluator=clip", "evaluation.clip.checkpoint=null"])
    with pytest.raises(ConfigError, match="set evaluation.clip.checkpoint"):
        build_evaluator(config.evaluation)
    config = load_config(["recipe=esd", "evaluation.evaluator=dino"])
    with pytest.raises(ConfigError, match="unknown evaluator 'dino' for evaluation.evaluator; available: toyworld, clip"):
        build_evaluator(config.evaluation)
    with pytest.raises(ConfigError, match="'evaluation.toyworld.classifier': no folder at /nope"):
        load_config(["recipe=esd", "evaluation.toyworld.classifier=/nope"])


def test_clip_decides_zero_shot_among_the_listed_concepts_its_own_included(tiny_clip, monkeypatch):
    """With a contrast list that holds the image's own concept (the artists' and the quick protocol's), an
    image shows c when c's text is nearer than every other listed concept's."""
    evaluator = CLIPEvaluator(CLIPConfig(model="tiny-clip-test", checkpoint=str(tiny_clip),
                                         contrast=["circle", "star", "square"]))
    axes = {"circle": [1.0, 0.0, 0.0], "star": [0.0, 1.0, 0.0], "square": [0.0, 0.0, 1.0]}
    monkeypatch.setattr(evaluator, "_image_embeddings", lambda images: torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]]))
    monkeypatch.setattr(evaluator, "_text_embeddings", lambda texts: torch.tensor([axes[t.split()[-1]] for t in texts]))
    assert evaluator.sees(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ["circle", "circle"]).tolist() == [True, False]
    assert evaluator.sees(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ["star", "star"]).tolist() == [False, True]
