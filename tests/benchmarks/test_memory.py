"""The memory estimate: live bytes counted on fake tensors, checked where the true count is known."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.memory import LiveMemory, fake_model, flux_lora, sdxl_esd_x
from erasure.architectures import architecture_config, tiny_flux, tiny_sdxl


def test_a_storage_counts_from_its_op_until_it_is_freed():
    with FakeTensorMode():
        memory = LiveMemory()
        with memory:
            first = torch.empty(1000, dtype=torch.bfloat16)
            second = first + 1
            view = second[:10]  # shares second's storage
            second.mul_(2)  # in place: nothing new
            del first, second
        assert memory.peak == 4000
        assert memory.live["transient"] == 2000  # the view keeps its storage alive
        del view
        assert memory.live["transient"] == 0


def test_a_linear_layer_keeps_its_input_only_for_its_weight_gradient():
    with FakeTensorMode():
        layer = fake_model(lambda: torch.nn.Linear(64, 32))
        memory = LiveMemory()
        for parameter in layer.parameters():
            memory.track(parameter, "weights")
        assert memory.live["weights"] == (64 * 32 + 32) * 2  # bf16
        with memory, memory.counting(part="activations"):
            loss = layer(torch.randn(8, 64, dtype=torch.bfloat16)).sum()
        assert memory.live["activations"] == 8 * 64 * 2 + 2  # the input (the output is not saved) and the loss
        layer.weight.requires_grad_(False)
        del loss
        with memory, memory.counting(part="activations"):
            loss = layer(torch.randn(8, 64, dtype=torch.bfloat16)).sum()
        assert loss.requires_grad and memory.live["activations"] == 2  # the bias gradient needs no input


def test_tiny_steps_count_weights_optimizer_and_checkpointed_activations():
    unet = tiny_sdxl(architecture_config("sdxl"))["unet"]
    sdxl = sdxl_esd_x(unet, resolution=64, bank=1)
    trained = sdxl["trained_parameters"]
    step = sdxl["phases"]["optimizer step"]
    assert step["weights"] == 2 * sdxl["parameters"]
    assert (step["frozen copies"], step["master copies"], step["grads"]) == (2 * trained, 4 * trained, 4 * trained)
    assert 8 * trained < step["optimizer states"] < 8 * trained + 4 * 1000  # two fp32 moments, a step count per tensor
    assert sdxl["phases"]["backward"]["activations"] <= sdxl["saved_for_backward"]
    without = sdxl_esd_x(unet, resolution=64, bank=1, checkpointing=False)
    assert sdxl["saved_for_backward"] < without["saved_for_backward"] / 3

    flux = flux_lora(tiny_flux(architecture_config("flux"))["transformer"], resolution=64, bank=1)
    lora = flux["trained_parameters"]
    assert lora == (8 + 3) * 4 * (32 + 32)  # rank 4 on the 8 + 3 projections (32 -> 32) of the two blocks
    assert flux["phases"]["backward"]["weights"] == 2 * (flux["parameters"] + lora)
    assert flux["phases"]["bank sampling"]["x_t bank"] == 1 * 50 * 16 * 8 * 8 * 2
