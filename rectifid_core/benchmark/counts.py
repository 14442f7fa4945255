"""How many times each part runs per guided iteration in each memory mode (recomputations show as extra runs).

    python -m rectifid_core.benchmark.counts [--memory store recompute_vae partial:2 checkpoint lowest]

Counts forward calls of the UNet's first layer (one per UNet call, a CFG half counting
as a call) and of the first layer of the VAE decoder's last up block, during one
guided iteration of the tiny benchmark models, the final gradient-free pass excluded.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from ..cli import memory_mode
from ..guidance import MEMORY_MODES, GuidanceConfig, guide, initial_noise
from .models import build_models


def forward_counts(memory: str) -> dict[str, int]:
    """Calls of the UNet and of a decoder block's layer in one iteration (K=4 tiny models)."""
    models = build_models("tiny", 0.1)
    flow = models.flow
    c = flow.components
    cond = flow.encode(["a photo of a person"], [""], 4.5)
    noise = initial_noise(flow.latent_shape(1, 64, 64), 0)
    probes = {"unet": c.unet.conv_in, "decoder_block": c.vae.decoder.up_blocks[-1].resnets[0].conv1}
    calls: Counter = Counter()
    handles = [m.register_forward_hook(lambda *_, key=key: calls.update([key])) for key, m in probes.items()]
    try:
        guide(flow, cond, models.objective, noise, GuidanceConfig(scale=1.0, iterations=1, memory=memory))
    finally:
        for h in handles:
            h.remove()
    final_pass = {"unet": flow.num_steps, "decoder_block": 1}
    return {key: calls[key] - final_pass[key] for key in probes}


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", nargs="+", type=memory_mode,
                        default=["store", "recompute_vae", "partial:2", "checkpoint", "lowest"],
                        help=f"{', '.join(MEMORY_MODES)} or partial:n")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = {memory: forward_counts(memory) for memory in args.memory}
    print("| memory | UNet calls (K=4) | decoder block runs |\n|---|---|---|")
    for memory, counts in out.items():
        print(f"| {memory} | {counts['unet']} | {counts['decoder_block']} |")
    return out


if __name__ == "__main__":
    main()
