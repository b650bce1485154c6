"""The real path end to end: a random-weight SD-1.5-architecture pipeline saved as a diffusers folder
(small widths, 8x8 latents), every method under every real protocol with a non-toy concept and
random-weight evaluators, then the comparison and the attacks on such runs. No traceback anywhere,
every accuracy with its interval, the SD-1.5 preset's published values in config.yaml."""

import csv
import json
import subprocess
import sys

import pytest
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file

from erasure.toyworld.real_architectures import build_random_pipeline
from erasure.attack import main as attack
from erasure.compare import main as compare
from erasure.config import load_config
from erasure.train import main as train

METHODS = ["esd", "ablation", "uce", "lora", "instruction", "sld", "rece", "advunlearn"]
FAST = ["trainer.max_steps=1", "evaluation.steps=2", "evaluation.images_per_prompt=1", "evaluation.batch_size=16"]
FAST_METHOD = {"esd": ["method.ddim_steps=2"], "lora": ["method.ddim_steps=2"], "uce": [], "instruction": [],
               "ablation": ["method.num_anchor_images=2", "method.anchor_steps=2", "method.batch_size=2"],
               "sld": [], "rece": ["method.epochs=1"],
               # AdvUnlearn's retain set: the real protocols leave it to the user (the reference uses COCO prompts)
               "advunlearn": ["method.retain=[a tree]", "method.retain_batch=1", "method.ddim_steps=2",
                              "method.attack_step=1", "method.warmup_iter=0"]}


def write_rows(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "sd15-random"
    build_random_pipeline("sd15", sample_size=8, small=True).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("protocol-files")
    resnet = torchvision.models.resnet50(weights=None)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, root / "resnet50.safetensors")
    clip = [f"evaluation.clip.checkpoint={tiny_clip}", "evaluation.clip.model=tiny-clip-test"]
    cat = write_rows(root / "cat.csv", ["case_number", "prompt", "evaluation_seed", "concept"],
                     [[0, "a picture of a cat", 1, "cat"], [1, "a cat on a sofa", 2, "cat"]])
    dog = write_rows(root / "dog.csv", ["case_number", "prompt", "evaluation_seed", "class"],
                     [[0, "a picture of a dog", 3, "dog"]])
    i2p = write_rows(root / "i2p.csv", ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage",
                                        "sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height",
                                        "case_number"],
                     [["a figure study in a studio", "sexual", 1, 80.0, 60.0, 2734, 7, 512, 512, 0],
                      ["a renaissance painting of bathers", "sexual", 0, 60.0, 40.0, 1197, 7, 512, 512, 1]])
    coco = write_rows(root / "coco.csv", ["image_id", "caption"], [[9, "a bowl of fruit on a table"],
                                                                    [25, "a giraffe next to a tree"]])
    artists = write_rows(root / "artists.csv", ["case_number", "prompt", "evaluation_seed", "artist"],
                         [[0, "a starry night by Vincent van Gogh", 5, "Vincent van Gogh"],
                          [1, "water lilies by Claude Monet", 6, "Claude Monet"],
                          [2, "a cafe terrace at night by Vincent van Gogh", 7, "Vincent van Gogh"],
                          [3, "a portrait by Frida Kahlo", 8, "Frida Kahlo"]])
    return {
        "csv": ["protocol=csv", "concept=cat", f"evaluation.target_csv={cat}", f"evaluation.retained_csv={dog}",
                "evaluation.evaluator=clip", *clip],
        "nudity": ["protocol=nudity", f"evaluation.target_csv={i2p}", f"evaluation.fidelity_csv={coco}", *clip],
        "objects": ["protocol=objects", "concept=parachute", f"evaluation.torchvision.weights={root / 'resnet50.safetensors'}",
                    "evaluation.classes=[parachute,church,golf ball]"],
        "artists": ["protocol=artists", "concept=Vincent van Gogh", f"evaluation.prompts_csv={artists}", *clip],
    }


@pytest.fixture(scope="module")
def runs(sd15, files, tmp_path_factory):
    """Every method under every real protocol: (protocol, method) -> run directory."""
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for protocol, arguments in files.items():
        for method in METHODS:
            output = root / protocol / method
            assert train([f"recipe={method}", f"model.path={sd15}", *arguments, *FAST, *FAST_METHOD[method],
                          f"output_dir={output}"]) == 0, (protocol, method)
            done[protocol, method] = output
    return done


@pytest.mark.parametrize("protocol", ["csv", "nudity", "objects", "artists"])
def test_every_method_runs_under_the_protocol_with_intervals(runs, protocol):
    for method in METHODS:
        output = runs[protocol, method]
        metrics = json.loads((output / "metrics.json").read_text())
        assert metrics["protocol"]["name"] == protocol and (output / "report.md").is_file()
        for phase in ("before", "after"):
            accuracies = [k for k in metrics[phase] if k.endswith("_acc")]
            assert "efficacy/target_acc" in accuracies
            for name in accuracies:
                low, high = metrics[phase][f"{name}_ci95"]
                assert 0 <= low <= metrics[phase][name] <= high <= 1
        config = OmegaConf.load(output / "config.yaml")
        assert config.model.preset == "sd15" and config.sources["model.preset"].startswith("detected from")


def test_protocol_specific_outputs(runs):
    nudity = json.loads((runs["nudity", "esd"] / "metrics.json").read_text())
    assert "efficacy/target_acc/nudenet/FEMALE_BREAST_EXPOSED" in nudity["after"]  # per-class counts
    assert "alignment/clip_score" in nudity["after"] and nudity["protocol"]["suites"] == {"target": 2, "fidelity": 2}
    objects = json.loads((runs["objects", "uce"] / "metrics.json").read_text())
    assert objects["protocol"]["suites"] == {"target": 1, "retained": 2, "synonym": 1}
    artists = OmegaConf.load(runs["artists", "uce"] / "config.yaml")
    assert list(artists.method.guide) == ["art"] and list(artists.method.preserve) == ["Claude Monet", "Frida Kahlo"]
    assert list(artists.evaluation.clip.contrast) == ["Vincent van Gogh", "Claude Monet", "Frida Kahlo"]
    esd = OmegaConf.load(runs["nudity", "esd"] / "config.yaml")
    assert esd.method.train_method == "esd-u" and esd.sources["method.train_method"] == "protocol nudity"
    assert (esd.method.sample_from, esd.method.xt_bank) == ("trained", 0)  # trained with the paper's loop
    assert esd.sources["method.sample_from"] == "model preset sd15"


def test_sd15_preset_gives_the_papers_esd_settings(sd15, files):
    """recipe=esd on an SD-1.5 folder resolves to the CompVis code's loop, named in sources; esd-fast is a
    recipe away."""
    config = load_config(["recipe=esd", f"model.path={sd15}", *files["csv"]])
    assert config.method.lr == 1e-5 and config.trainer.max_steps == 1000 and config.method.train_method == "esd-x"
    assert config.sources["method.lr"] == "model preset sd15" and config.sources["trainer.max_steps"] == "model preset sd15"
    loop = ("sample_from", "xt_bank", "query_timestep", "ddim_steps", "sample_guidance", "batch_size", "eta")
    assert [config.method[k] for k in loop] == ["trained", 0, "window", 50, 3.0, 1, 1.0]
    assert {config.sources[f"method.{k}"] for k in loop} == {"model preset sd15"}
    fast = load_config(["recipe=esd-fast", f"model.path={sd15}", *files["csv"]])
    assert (fast.method.sample_from, fast.method.xt_bank, fast.method.query_timestep) == ("frozen", 16, "ddim")
    assert fast.sources["method.xt_bank"] == "recipe esd-fast" and fast.method.lr == 1e-5
    lora = load_config(["recipe=lora", f"model.path={sd15}", *files["csv"]])  # its ESD objective: the same paper loop
    assert [lora.method[k] for k in loop[:3]] == ["trained", 0, "window"]
    assert lora.sources["method.xt_bank"] == "model preset sd15"
    toy = load_config(["recipe=esd"])  # the toy world keeps its own tuned values
    assert toy.method.lr == 2e-3 and toy.trainer.max_steps == 300 and toy.model.preset == "toyworld"


def test_sd15_preset_gives_the_concept_ablation_authors_settings(sd15, files):
    """The diffusers code's style/object commands; protocol nudity its nudity command (all attention, prior
    term, lr 4e-6, 400 steps)."""
    config = load_config(["recipe=ablation", f"model.path={sd15}", *files["objects"]])
    expected = {"anchor_model": "current", "parameters": "xattn-kv", "lr": 2e-6, "scale_lr": True, "batch_size": 8,
                "num_anchor_images": 1000, "anchor_steps": 25, "anchor_guidance": 6.0, "anchor_eta": 1.0,
                "prior_weight": 0.0, "optimizer": "adamw", "weight_decay": 1e-2, "max_grad_norm": 1.0}
    assert {k: config.method[k] for k in expected} == expected and config.trainer.max_steps == 100
    assert config.sources["method.num_anchor_images"] == "model preset sd15"
    nudity = load_config(["recipe=ablation", f"model.path={sd15}", *files["nudity"]])
    assert (nudity.method.parameters, nudity.method.prior_weight, nudity.method.lr, nudity.trainer.max_steps) == (
        "attn", 1.0, 4e-6, 400)
    assert nudity.sources["method.prior_weight"] == nudity.sources["trainer.max_steps"] == "protocol nudity"
    assert nudity.method.scale_lr and nudity.method.batch_size == 8  # 4e-6 x 8 x 2 = the authors' 4e-6 x 4 x 2 GPUs x 2
    toy = load_config(["recipe=ablation"])  # the toy world's tuned values
    assert toy.method.lr == 1e-3 and toy.method.num_anchor_images == 64 and toy.method.anchor_model == "frozen"


def test_compare_and_attack_on_real_protocol_runs(runs, tmp_path, capsys):
    entries = ",".join(str(runs["csv", m]) for m in METHODS)
    assert compare([f"recipes=[{entries}]", f"output_dir={tmp_path / 'comparison'}"]) == 0
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "efficacy/target_acc" in table and "[" in table  # intervals in the table
    for method in ("esd", "uce"):
        assert attack([f"run={runs['csv', method]}", "attacks=[inversion,soft_prompt]", "attack.steps=2",
                       "attack.images=2", "attack.batch_size=1", "attack.inversion.budget=toy",
                       "attack.inversion.steps=2", "attack.inversion.images=2", "attack.inversion.batch_size=1"]) == 0
        result = json.loads((runs["csv", method] / "attacks" / "inversion.json").read_text())
        low, high = result["attack_success_rate_ci95"]
        assert 0 <= low <= result["attack_success_rate"] <= high <= 1
    # the field's attacks on runs of every real protocol (77-token CLIP context, CLIP / NudeNet / ResNet evaluators)
    field_attacks = ["attacks=[unlearndiffatk,ring_a_bell,relearn,embedding]", "attack.unlearndiffatk.iterations=2",
                     "attack.unlearndiffatk.timesteps=1", "attack.ring_a_bell.population=4",
                     "attack.ring_a_bell.generations=1", "attack.ring_a_bell.tokens=4", "attack.relearn.steps=[0,1]",
                     "attack.steps=1", "attack.images=2", "attack.batch_size=1"]
    for protocol in ("csv", "nudity", "objects", "artists"):
        assert attack([f"run={runs[protocol, 'esd']}", *field_attacks]) == 0, protocol
        for name in ("unlearndiffatk", "ring_a_bell", "relearn", "embedding"):
            result = json.loads((runs[protocol, "esd"] / "attacks" / f"{name}.json").read_text())
            assert 0 <= result["attack_success_rate"] <= 1, (protocol, name)
        prefix = json.loads((runs[protocol, "esd"] / "attacks" / "unlearndiffatk.json").read_text())["prefix_tokens"]
        assert prefix == (5 if protocol == "nudity" else 3), protocol  # the authors' k
    assert "Traceback" not in capsys.readouterr().err


def test_the_issue_command_runs_as_a_subprocess(sd15, files, tmp_path):
    """The command of the issue (three CSVs, no protocol: inferred csv) on the toy model, as a new user runs it."""
    cat = next(a.split("=", 1)[1] for a in files["csv"] if a.startswith("evaluation.target_csv="))
    result = subprocess.run([sys.executable, "-m", "erasure.train", "recipe=uce", "concept=cat",
                             f"evaluation.target_csv={cat}", f"evaluation.synonym_csv={cat}",
                             f"evaluation.retained_csv={cat}", "evaluation.images_per_prompt=1", "evaluation.steps=2",
                             f"output_dir={tmp_path / 'cat'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "cat" / "metrics.json").read_text())
    assert metrics["protocol"]["name"] == "csv" and metrics["protocol"]["evaluator"] == "none"
    assert (tmp_path / "cat" / "samples" / "target.png").is_file()


@pytest.mark.parametrize("recipe, options", [("esd", []), ("uce", []), ("ablation", ["method.anchor=dog"]), ("lora", [])])
def test_a_free_text_concept_erases_without_a_benchmark_into_weights_plain_diffusers_loads(sd15, tmp_path, recipe,
                                                                                            options):
    """No protocol, no CSV, evaluation off: the run infers protocol none, trains, and writes weights that
    StableDiffusionPipeline loads (a delta exported to a folder, or the LoRA through load_lora_weights)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from erasure.adapters import LORA_FILE
    from erasure.weights import DELTA_FILE, export_pipeline, load_delta

    output = tmp_path / "run"
    assert train([f"recipe={recipe}", f"model.path={sd15}", "concept=a black cat", "evaluation.enabled=false",
                  "trainer.max_steps=1", *FAST_METHOD[recipe], *options, f"output_dir={output}"]) == 0
    config = OmegaConf.load(output / "config.yaml")
    assert config.protocol == "none" and config.sources.protocol.startswith("inferred")
    base = StableDiffusionPipeline.from_pretrained(sd15)
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    context = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base.unet(latents, t, context).sample
    if recipe == "lora":
        erased = StableDiffusionPipeline.from_pretrained(sd15)
        erased.load_lora_weights(output / "erased")
        assert (output / "erased" / LORA_FILE).is_file()
    else:
        delta = load_delta(output / "erased" / DELTA_FILE)
        erased = StableDiffusionPipeline.from_pretrained(export_pipeline(sd15, output / "erased" / DELTA_FILE,
                                                                         tmp_path / "exported"))
        state = erased.unet.state_dict()
        assert delta and all(torch.equal(state[name], value) for name, value in delta.items())
    with torch.no_grad():
        assert not torch.allclose(erased.unet(latents, t, context).sample, before)


def test_the_quick_evaluation_judges_any_concept_with_clip_among_its_neighbours(sd15, tiny_clip, tmp_path, capsys):
    """protocol=quick with only open_clip weights: template prompts, CLIP among the concept and its neighbours,
    every accuracy with its interval; without the CLIP weights, one line naming the key."""
    output = tmp_path / "run"
    quick = ["recipe=uce", f"model.path={sd15}", "protocol=quick", "concept=a black cat", "evaluation.steps=2",
             "evaluation.images_per_prompt=1", "evaluation.clip.model=tiny-clip-test"]
    assert train([*quick, f"evaluation.clip.checkpoint={tiny_clip}", f"output_dir={output}"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    for key in ("efficacy/target_acc", "specificity/retained_acc"):
        assert 0 <= metrics["after"][key] <= 1 and len(metrics["after"][f"{key}_ci95"]) == 2
    config = OmegaConf.load(output / "config.yaml")
    assert list(config.evaluation.clip.contrast)[:2] == ["a black cat", "a person"]
    capsys.readouterr()
    assert train([*quick, f"output_dir={tmp_path / 'none'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "evaluation.clip.checkpoint" in errors[0] and not (tmp_path / "none").exists()
