import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.methods.ablation import Ablation, AblationConfig, Anchors, ablation_loss, target_prompt
from erasure.toyworld.captions import prompts_naming

SQUARES = prompts_naming("square")


def test_target_prompt_names_the_erased_concept_with_the_right_article():
    assert target_prompt("a red square", "square", "circle") == "a red circle"
    assert target_prompt("a square", "square", "circle") == "a circle"
    assert target_prompt("a red square", "red", "orange") == "an orange square"
    assert target_prompt("an orange star", "orange", "red") == "a red star"
    assert target_prompt("a striped square", "square", "outline", {"outline": "outlined"}) == "a striped outlined"
    assert target_prompt("a painting of the sea", "painting", "Monet",
                         template="{anchor_prompt} in the style of {concept}") == "a painting of the sea in the style of Monet"


def test_model_based_step_moves_only_cross_attention_keys_and_values(tmp_path):
    module = Ablation(load_pipeline(TOYWORLD_MODEL), AblationConfig(anchor="square", anchor_prompts=SQUARES, num_anchor_images=4,
                                                                 anchor_steps=4, lr=1e-3),
                      ["circle"])
    anchors = Anchors.load_or_generate(module, module.config, tmp_path / "anchors.safetensors")
    assert anchors.latents.shape == (4, 4, 16, 16) and (tmp_path / "anchors.safetensors").exists()
    cached = Anchors.load_or_generate(module, module.config, tmp_path / "anchors.safetensors")
    assert torch.equal(cached.latents, anchors.latents)  # generated once, then read back

    before = {n: p.detach().clone() for n, p in module.unet.named_parameters()}
    optimizer = module.configure_optimizers()
    loss = ablation_loss(module, module.config, anchors)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in module.unet.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert torch.isfinite(loss) and changed and changed <= set(module.trained)
    assert all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)


def test_the_frozen_anchor_target_is_the_original_models_prediction(tmp_path):
    module = Ablation(load_pipeline(TOYWORLD_MODEL), AblationConfig(anchor="square", anchor_prompts=SQUARES,
                                                                 num_anchor_images=2, anchor_steps=2), ["circle"])
    x_t, t, embeds = torch.randn(2, 4, 16, 16), torch.tensor([300, 600]), module.encode(["a square", "a red square"])
    with torch.no_grad():
        expected = module.predict(x_t, t, embeds)
        for parameter in module.trained.values():
            parameter.mul_(1.5)
        assert torch.allclose(module.predict_frozen(x_t, t, embeds), expected, atol=1e-5)
