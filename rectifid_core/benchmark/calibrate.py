"""Fit the activation-memory constants of `guidance.ACTIVATION_BYTES` on the real architectures.

    python -m rectifid_core.benchmark.calibrate --family sd15 --sizes 128 256
    python -m rectifid_core.benchmark.calibrate --family flux --scale 0.125 0.25 --sizes 128 256

Builds the family's random-weight models (text encoders one layer deep: prompts
are encoded once, outside the loop), measures with torch's allocation accounting
what one window call, the VAE decode and the recognizer keep for the backward,
and the peak of the decode recomputed per resnet, at two image sizes (fp32, CPU,
SDPA attention), and fits bytes = fixed + per_element * latent elements for the
window and the decodes. Activation sizes do not depend
on the device, so the CPU fit serves the CUDA memory choice.

FLUX.1-schnell (12B) and SD3.5 Large (8B) do not fit a CPU run at their real width, so
their transformers (and text encoders) are built at two or more width scales (heads
scaled, head size kept; the VAE and the recognizer keep their real widths) and each
window constant is extrapolated to the real width along a least-squares line in the
transformer's width: every activation a transformer block keeps is a multiple of its
width (hidden states, q/k/v, MLP, per-head softmax statistics), the rest (rotary
tables, the patch embedding's input) does not depend on it. Their windows are measured
at the CFG their model cards sample with (1: one call per step).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..guidance import initial_noise
from .measure import activation_bytes, environment, profiled_peak_bytes, retained_bytes
from .models import build_models
from .transformer_models import TRANSFORMER_FAMILIES, transformer_width

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BLOCK_RECOMPUTE = ("window_block_recompute", "window_block_recompute_peak")


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares line through (latent elements, bytes): (fixed, per element)."""
    n = torch.tensor([p[0] for p in points], dtype=torch.float64)
    b = torch.tensor([p[1] for p in points], dtype=torch.float64)
    a = torch.stack([torch.ones_like(n), n], dim=1)
    fixed, per = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.flatten().tolist()
    return fixed, per


def block_recompute_bytes(flow: Any, cond: Any, noise: torch.Tensor) -> dict[str, int]:
    """What one step keeps with its transformer blocks recomputed (the block inputs), and the peak of its
    forward+backward (those plus one block's activations)."""
    flow.set_memory_saving(True)
    try:
        with torch.enable_grad():
            z = noise.detach().clone().requires_grad_(True)
            kept = retained_bytes(lambda: flow.step(z, 0, cond))
            peak = profiled_peak_bytes(lambda: torch.autograd.grad(flow.step(z, 0, cond).sum(), z))
    finally:
        flow.set_memory_saving(False)
    return {"window_block_recompute": kept, "window_block_recompute_peak": peak}


def measure_width(family: str, width_scale: float, sizes: list[int]) -> list[dict]:
    """One row per image size: what each part keeps for the backward, at one width scale."""
    models = build_models(family, width_scale, text_layers=1)
    cfg = models.flow.defaults().cfg_scale if family in TRANSFORMER_FAMILIES else 4.5
    cond = models.flow.encode(["a photo of a person"], [""], cfg)
    rows = []
    for size in sizes:
        t = time.time()
        noise = initial_noise(models.flow.latent_shape(1, size, size), 0)
        parts = activation_bytes(models, cond, noise)
        if family in TRANSFORMER_FAMILIES:
            parts.update(block_recompute_bytes(models.flow, cond, noise))
        rows.append({"width_scale": width_scale, "size": size, "latent_elements": noise.numel(), **parts,
                     "seconds": time.time() - t})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def extrapolate(widths: list[float], values: list[float]) -> float:
    """The least-squares line through (width, value), read at the real width 1."""
    fixed, per = fit(list(zip(widths, values)))
    return fixed + per


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl", "tiny", *TRANSFORMER_FAMILIES))
    parser.add_argument("--scale", type=float, nargs="+", dest="width_scales",
                        help="width scale(s); several: the window constants are extrapolated to width 1 "
                             "(default 1, for flux and sd35 0.125 0.25)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if len(set(args.sizes)) < 2:
        raise ValueError(f"need at least two different --sizes to fit a line, got {args.sizes}")
    scales = args.width_scales or ([0.125, 0.25] if args.family in TRANSFORMER_FAMILIES else [1.0])
    if len(scales) > 1 and args.family not in TRANSFORMER_FAMILIES:
        raise ValueError(f"several --scale values extrapolate a transformer's width; give one for {args.family}")
    torch.set_num_threads(1)
    rows = [row for scale in scales for row in measure_width(args.family, scale, args.sizes)]
    per_width = {}
    for scale in scales:
        mine = [r for r in rows if r["width_scale"] == scale]
        per_width[scale] = {name: fit([(r["latent_elements"], r[name]) for r in mine])
                            for name in ("window", "decode", "decode_recompute", *BLOCK_RECOMPUTE) if name in mine[0]}
    first = per_width[scales[0]]
    (decode_fixed, decode), (recompute_fixed, recompute) = first["decode"], first["decode_recompute"]
    block_recompute = None
    if len(scales) > 1:  # a transformer family at widths below its real one
        widths = [transformer_width(args.family, s) for s in scales]
        window_fixed = extrapolate(widths, [per_width[s]["window"][0] for s in scales])
        window = extrapolate(widths, [per_width[s]["window"][1] for s in scales])
        # not (yet) a term of guidance.estimate_guidance_bytes, whose recomputing modes assume one step is
        # recomputed whole: what these flows keep instead, per step, in the same per-element + per-image form
        block_recompute = {name: {part: round(extrapolate(widths, [per_width[s][name][i] for s in scales]))
                                  for i, part in enumerate(("per_image", "per_element"))}
                           for name in BLOCK_RECOMPUTE}
    else:  # the UNet families, measured at their real width
        window_fixed, window = first["window"]
    constants = {"window": round(window), "window_fixed": round(window_fixed), "decode": round(decode),
                 "decode_recompute": round(recompute),
                 "fixed": round(max(r["recognizer"] for r in rows) + max(decode_fixed, recompute_fixed, 0.0))}
    report = {"family": args.family, "width_scales": scales, "measurements": rows,
              "per_width_fits": {str(s): v for s, v in per_width.items()},
              "intercepts": {"window": window_fixed, "decode": decode_fixed, "decode_recompute": recompute_fixed},
              "constants": constants, "environment": environment(torch.device("cpu"))}
    if block_recompute is not None:
        report["block_recompute"] = block_recompute
        print(f"with block recomputation, per step: {block_recompute}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"calibration_{args.family}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"ACTIVATION_BYTES[{args.family!r}] = {constants}")
    return report


if __name__ == "__main__":
    main()
