"""`python -m rectifid_core.benchmark.compare_compiled`: the compiled path against eager on the benchmark's models.

Runs the same guidance (same noise, prompt, N) eagerly and compiled and prints, per iteration, the loss
of each and the largest difference of the scored iterates, then of the final latent and image, as JSON.
Meant for the real architectures in fp16 on a GPU, where the tolerance is the question (fp16 keeps
~3 decimal digits; inductor fuses and reorders, so differences of a few 1e-3 in the image are rounding,
a wrong graph moves the image by far more); the tests check the same in float64 on tiny models.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from ..guidance import GuidanceConfig, IterationInfo, guide, initial_noise
from .measure import DTYPES
from .models import FAMILIES, build_models


def compare(family: str, width_scale: float, size: int, iterations: int, device: str, dtype: str,
            memory: str = "store", seed: int = 0) -> dict:
    """Eager vs compiled guidance on random-weight models of `family`; differences per iteration and at the end."""
    models = build_models(family, width_scale, 4, device, DTYPES[dtype], seed)
    flow = models.flow
    cond = flow.encode(["a photo of a person"], [""], 3.0)
    noise = initial_noise(flow.latent_shape(1, size, size), seed, device, DTYPES[dtype])
    config = GuidanceConfig(scale=1.0, iterations=iterations, memory=memory)
    runs = {}
    for name, cfg in (("eager", config), ("compiled", dataclasses.replace(config, compile="on"))):
        seen: list[IterationInfo] = []
        result = guide(flow, cond, models.objective, noise, cfg, callback=seen.append)
        runs[name] = (result, [(i.latent.float().cpu(), i.image.float().cpu()) for i in seen])
    (eager, eager_its), (fast, fast_its) = runs["eager"], runs["compiled"]
    return {
        "settings": {"family": family, "width_scale": width_scale, "size": size, "iterations": iterations,
                     "device": device, "dtype": dtype, "memory": memory, "seed": seed},
        "losses": {"eager": eager.losses, "compiled": fast.losses},
        "iterate_max_abs_diff": [{"latent": float((a[0] - b[0]).abs().max()), "image": float((a[1] - b[1]).abs().max())}
                                 for a, b in zip(eager_its, fast_its)],
        "final_latent_max_abs_diff": float((eager.latent.float() - fast.latent.float()).abs().max()),
        "final_image_max_abs_diff": float((eager.image.float() - fast.image.float()).abs().max()),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m rectifid_core.benchmark.compare_compiled", description=__doc__)
    p.add_argument("--family", choices=FAMILIES, default="tiny")
    p.add_argument("--scale", type=float, default=0.1, dest="width_scale", help="width multiplier of every layer")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--iterations", "-N", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--memory", default="store")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    report = compare(args.family, args.width_scale, args.size, args.iterations, args.device, args.dtype, args.memory)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
