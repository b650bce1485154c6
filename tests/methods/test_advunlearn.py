
import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler, generate
from erasure.config import load_config
from erasure.methods.advunlearn import (
    AdvUnlearn, AdvUnlearnConfig, retain_batch_at, retain_set,
)
from erasure.methods.esd import compvis_steps, retain_loss, retain_prompts
from erasure.train import main
from tests.methods import assert_bad_setting
from erasure.weights import DeltaError, apply_delta, load_delta

FAST = Sampler(steps=8)
RETAIN = ["square", "star", "red", "circle"]


def make(**options):
    options = {"retain": RETAIN, "prompt_template": "a {concept}", "ddim_steps": 5, **options}
    module = AdvUnlearn(load_pipeline(TOYWORLD_MODEL), AdvUnlearnConfig(**options), ["circle"])
    module.log = lambda *args, **kwargs: None  # logging needs a Trainer; these steps run without one
    return module


def perturb(module: AdvUnlearn, scale: float = 0.05) -> None:
    """A stand-in for training: move every trained tensor."""
    with torch.no_grad():
        for parameter in module.trained.values():
            parameter.add_(scale * torch.randn_like(parameter))


def test_text_encoder_full_trains_the_text_encoder_but_its_embeddings_and_xattn_the_unets_cross_attention():
    module = make()
    names = set(module.trained)
    assert module.trains_text_encoder and all(n.startswith("text_encoder.") for n in names)
    encoder = {f"text_encoder.{n}" for n, _ in module.text_encoder.named_parameters()}
    assert names == {n for n in encoder if "embeddings" not in n} and any("final_layer_norm" in n for n in names)
    unet_method = make(train_method="xattn")
    assert not unet_method.trains_text_encoder and all(".attn2." in n for n in unet_method.trained)


def test_the_adversarial_prompt_inserts_token_embeddings_into_the_prompt():
    module = make()
    table = module.text_encoder.get_input_embeddings().weight
    word = table[module.pipeline.tokenizer("red", add_special_tokens=False).input_ids].detach()
    with torch.no_grad():  # inserting the embedding of "red" gives the encoding of the prompt with the word
        assert torch.allclose(module.adversarial_encoding("a circle", word, 2), module.encode(["red a circle"] * 2).embeds,
                              atol=1e-6)
        module.config.attack_type = "suffix_k"
        assert torch.allclose(module.adversarial_encoding("a circle", word, 1), module.encode(["a circle red"]).embeds,
                              atol=1e-6)


def test_the_inner_attack_lowers_its_loss():
    """The attack's loss on fixed draws of (x_t, t), before and after its steps (each step draws its own x_t,
    as the reference code does, so the loss per step mostly follows the drawn timestep)."""
    module = make(attack_step=12, attack_lr=1e-2, adv_prompt_num=2, batch_size=4, attack_init="latest")  # from start
    torch.manual_seed(0)  # the perturbation's draw, whatever ran before
    perturb(module)  # a changed model: the attack has something to recover
    generator = torch.Generator().manual_seed(0)
    module.adversarial_tokens = start = module.random_tokens(generator)
    prompt = "a circle"
    embeds = module.encode_frozen([prompt] * 4)
    draws = [module.noisy_latents(embeds, *module.draw_timestep(generator), generator) for _ in range(3)]
    targets = [module.predict_frozen(latents, t, embeds) for latents, t in draws]

    def held_out_loss(tokens):
        with torch.no_grad():
            return sum(float(module.attack_loss(prompt, tokens, *draw, target)) for draw, target in zip(draws, targets))

    before = {n: p.detach().clone() for n, p in module.trained.items()}
    losses = module.attack(prompt, generator)
    assert len(losses) == 12 and all(loss > 0 for loss in losses)
    assert held_out_loss(module.adversarial_tokens) < 0.95 * held_out_loss(start)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in module.trained.items())  # the model is fixed


def test_the_outer_step_changes_only_the_text_encoder_and_the_frozen_model_stays_the_original():
    module = make(lr=1e-3, warmup_iter=0, attack_step=2, retain_batch=2)
    reference_encoder = CLIPTextModel.from_pretrained(TOYWORLD_MODEL / "text_encoder").eval()
    reference_unet = UNet2DConditionModel.from_pretrained(TOYWORLD_MODEL / "unet").eval()
    unet_before = {n: p.detach().clone() for n, p in module.denoiser.named_parameters()}
    encoder_before = {n: p.detach().clone() for n, p in module.text_encoder.named_parameters()}
    optimizer = module.configure_optimizers()
    for step in range(2):
        loss = module.training_step(step, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, unet_before[n]) for n, p in module.denoiser.named_parameters())
    changed = {f"text_encoder.{n}" for n, p in module.text_encoder.named_parameters()
               if not torch.equal(p.detach(), encoder_before[n])}
    assert changed and changed <= set(module.trained)

    prompts = ["a circle", "a blue star", ""]
    tokens = module.pipeline.tokenizer(prompts, padding="max_length", max_length=module.pipeline.tokenizer.model_max_length,
                                       return_tensors="pt").input_ids
    latents, t = torch.randn(3, 4, 16, 16), torch.tensor([900, 500, 20])
    with torch.no_grad():
        original_embeds = reference_encoder(tokens)[0]
        expected = reference_unet(latents, t, encoder_hidden_states=original_embeds).sample
        assert torch.allclose(module.encode_frozen(prompts).embeds, original_embeds, atol=1e-6)
        assert not torch.allclose(module.encode(prompts).embeds, original_embeds, atol=1e-4)  # the current encoding moved
        assert torch.allclose(module.predict_frozen(latents, t, module.encode_frozen(prompts)), expected, atol=1e-5)
    with module.original_weights():
        assert torch.allclose(module.encode(prompts).embeds, original_embeds, atol=1e-6)


def test_the_retain_term_is_zero_at_the_original_weights_and_grows_as_the_model_moves():
    module = make()
    prompts = retain_prompts(module.config, module.concepts)
    assert prompts == ["a square", "a star", "a red"]  # the erased concept is not retained
    generator = torch.Generator().manual_seed(1)
    latents, t = module.noisy_latents(module.encode_frozen(prompts), *module.draw_timestep(generator), generator)
    with torch.no_grad():
        at_original = float(retain_loss(module, prompts, latents, t))
        perturb(module, 0.01)
        moved_a_little = float(retain_loss(module, prompts, latents, t))
        perturb(module, 0.05)
        moved_more = float(retain_loss(module, prompts, latents, t))
    assert at_original == 0.0 and 0 < moved_a_little < moved_more


def test_a_run_writes_a_delta_that_reproduces_the_trained_model(tmp_path):
    output = tmp_path / "run"
    assert main(["recipe=advunlearn", "concept=[circle]", "trainer.max_steps=3", "method.warmup_iter=1",
                 "method.attack_step=2", "method.ddim_steps=5", "evaluation.enabled=false", f"output_dir={output}"]) == 0
    delta = load_delta(output / "erased" / "unet_delta.safetensors")
    assert delta and all(name.startswith("text_encoder.") for name in delta)

    prompts, seeds = ["a circle", "a red circle", "a blue star"], [0, 1, 2]
    restored = make()
    restored.load_erased(output / "erased")
    erased_images = restored.generate(prompts, seeds, FAST)
    fresh = load_pipeline(TOYWORLD_MODEL)
    base_images = generate(fresh, prompts, seeds, FAST)
    with pytest.raises(DeltaError, match="text encoder too"):
        apply_delta(fresh.unet, delta)
    apply_delta(fresh.unet, delta, fresh.text_encoder)
    assert torch.equal(generate(fresh, prompts, seeds, FAST), erased_images)
    assert not torch.equal(erased_images, base_images)
    assert torch.equal(restored.generate(prompts, seeds, FAST, original=True), base_images)


def test_each_attack_starts_from_new_random_tokens_by_default_and_latest_continues(monkeypatch):
    """attack_init=random (the authors' README commands): every attack draws its start from the token
    table; latest: only the first does, the next starts where the previous one ended."""
    assert AdvUnlearnConfig().attack_init == "random"
    for init, draws in (("random", 2), ("latest", 1)):
        module = make(attack_init=init, attack_step=1, attack_lr=1e-2)
        starts, draw = [], module.random_tokens

        def recorded(generator, starts=starts, draw=draw):
            starts.append(draw(generator))
            return starts[-1]

        monkeypatch.setattr(module, "random_tokens", recorded)
        module.attack("a circle", torch.Generator().manual_seed(0))
        first = module.adversarial_tokens
        module.attack("a circle", torch.Generator().manual_seed(1))
        assert len(starts) == draws, init
        table = module.text_encoder.get_input_embeddings().weight.detach()
        assert all((table == row).all(1).any() for start in starts for row in start)  # rows of the token table
        assert not (table == first[0]).all(1).any()  # the attack moved its tokens off the table
    assert not torch.equal(starts[0], first)


def test_without_a_retain_set_the_retain_term_reads_the_prompts_of_retain_csv(tmp_path):
    """The authors' retain set is their COCO-object CSV (not redistributed): method.retain_csv reads any such file."""
    path = tmp_path / "coco_object_retain.csv"
    path.write_text("prompt\na photo of chair\na photo of fridge\na photo of banana\n")
    config = AdvUnlearnConfig(retain_csv=str(path))
    assert retain_set(config, ["nudity"]) == ["a photo of chair", "a photo of fridge", "a photo of banana"]
    assert retain_set(config, ["chair"]) == ["a photo of fridge", "a photo of banana"]  # an erased object is not kept
    AdvUnlearn.check(config, ["nudity"])
    module = make(retain=[], retain_csv=str(path), retain_batch=2)
    assert len(module.retain_prompts_of_step()) == 2
    with pytest.raises(ValueError, match=r"pass method.retain_csv=.*coco_object_retain.csv"):
        AdvUnlearn.check(AdvUnlearnConfig(), ["nudity"])  # nothing to keep and no file: the fix is named
    with pytest.raises(ValueError, match="cannot read"):
        AdvUnlearn.check(AdvUnlearnConfig(retain_csv=str(tmp_path / "missing.csv")), ["nudity"])
    (tmp_path / "bad.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="no prompt column"):
        AdvUnlearn.check(AdvUnlearnConfig(retain_csv=str(tmp_path / "bad.csv")), ["nudity"])
    # the toy world's protocol keeps supplying its own retain set
    toy = load_config(["recipe=advunlearn"])
    assert toy.method.retain and retain_set(toy.method, ["circle"]) == [f"a {c}" for c in toy.method.retain
                                                                         if c != "circle"]


def test_retain_prompts_come_in_shuffled_passes_without_repeats():
    """As the reference's prompt dataset: batches of unseen prompts until fewer than a batch remain, then a new pass."""
    prompts = [f"p{k}" for k in range(7)]
    passes = [[p for step in range(2 * k, 2 * k + 2) for p in retain_batch_at(prompts, 3, step, 5)] for k in range(3)]
    assert all(len(set(batch)) == 6 for batch in passes)  # 2 steps of 3 unseen prompts; the 7th is skipped
    assert len({tuple(batch) for batch in passes}) == 3  # each pass is a new shuffle
    assert retain_batch_at(prompts, 3, 4, 5) == retain_batch_at(prompts, 3, 4, 5)  # a function of the step
    assert sorted(retain_batch_at(prompts[:2], 5, 0, 5)) == prompts[:2]  # fewer prompts than a batch: all of them


@pytest.mark.parametrize("arguments, message", [
    (["method.attack_type=middle"], "invalid value for 'method.attack_type': 'middle'; choose one of: prefix_k, suffix_k"),
    (["method.train_method=unet"], "invalid value for 'method.train_method'"),
    (["method.attack_lr=0.0"], "method.attack_lr must be positive"),
    (["method.adv_prompt_num=0"], "method.adv_prompt_num must be at least 1"),
    (["method.retain=[circle]", "concept=[circle]"], "method.retain names no concept to keep"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert_bad_setting("advunlearn", arguments, message, tmp_path / "run", capsys)


def test_x_t_follows_the_compvis_loop_the_reference_copies():
    """k ~ U{0..S-1}: the sampler's min(S, S + 1 - k) steps (two past k's window, all S for k < 2), t in k's window."""
    module = make(ddim_steps=50)
    generator = torch.Generator().manual_seed(0)
    draws = [module.draw_timestep(generator) for _ in range(400)]
    assert all(t // 20 == k for k, t in draws)  # t in k's window
    assert {k for k, _ in draws} == set(range(50))  # every DDIM step's window is drawn
    assert [compvis_steps(k, 50) for k in (0, 1, 2, 49)] == [50, 50, 49, 2]  # the steps compvis_xt takes
    small = make(ddim_steps=3)
    embeds = small.encode_frozen(["a circle"])
    latents, t = small.noisy_latents(embeds, 0, 5, generator)  # every step taken (k < 2): the final sample
    assert latents.shape[0] == 1 and torch.isfinite(latents).all() and t.tolist() == [5]
