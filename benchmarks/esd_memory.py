"""Peak memory of an ESD-x training step against a no-grad forward pass, on a real architecture.

    python -m benchmarks.esd_memory [--architecture sd15] [--latent 8]

Each measurement runs in its own process (peak resident memory is a high-water mark):
``forward`` builds the pipeline and runs one no-grad UNet forward; ``esd`` builds the same
pipeline, an ESD-x module, and runs one full training step (partial sampling, frozen
predictions, backward, Adam). The reference code holds two UNets, i.e. about
forward + one UNet of weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, architecture: str, latent: int) -> dict:
    import torch

    from erasure.architectures import build_random_pipeline
    from erasure.methods.esd import ESD, ESDConfig

    torch.set_grad_enabled(False)
    pipeline = build_random_pipeline(architecture, sample_size=latent)
    unet_mib = sum(p.numel() * p.element_size() for p in pipeline.unet.parameters()) / 2**20
    if kind == "forward":
        embeds = pipeline.encode_prompt(["a circle"], "cpu", 1, False)[0]
        pipeline.unet(torch.randn(1, 4, latent, latent), torch.tensor([500]), encoder_hidden_states=embeds)
    else:
        torch.set_grad_enabled(True)
        module = ESD(pipeline, ESDConfig(train_method="esd-x", ddim_steps=4, batch_size=1), ["circle"])
        module.log = lambda *args, **kwargs: None
        optimizer = module.configure_optimizers()
        module.training_step(0, 0).backward()
        optimizer.step()
    return {"kind": kind, "peak_mib": round(peak_mib(), 1), "unet_weights_mib": round(unet_mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="sd15")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--kind", choices=["forward", "esd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind:
        print(json.dumps(measure(args.kind, args.architecture, args.latent)))
        return
    results = {}
    for kind in ("forward", "esd"):
        command = [sys.executable, "-m", "benchmarks.esd_memory", "--kind", kind,
                   "--architecture", args.architecture, "--latent", str(args.latent)]
        results[kind] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    forward, esd = results["forward"]["peak_mib"], results["esd"]["peak_mib"]
    unet = results["forward"]["unet_weights_mib"]
    print(f"architecture {args.architecture}, latent {args.latent}x{args.latent}, UNet weights {unet:.0f} MiB")
    print(f"peak resident memory: no-grad forward {forward:.0f} MiB, ESD-x step {esd:.0f} MiB, ratio {esd / forward:.2f}")
    print(f"a second UNet copy (reference code) would add {unet:.0f} MiB: ratio {(forward + unet) / forward:.2f} at least")


if __name__ == "__main__":
    main()
