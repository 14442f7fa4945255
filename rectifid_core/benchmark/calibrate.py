"""Fit the activation-memory constants of `guidance.ACTIVATION_BYTES` on the real architectures.

    python -m rectifid_core.benchmark.calibrate --family sd15 --sizes 128 256

Builds the family's random-weight models (text encoders one layer deep: prompts
are encoded once, outside the loop), measures with torch's allocation accounting
what one window call, the VAE decode and the recognizer keep for the backward,
and the peak of the decode recomputed per resnet, at two image sizes (fp32, CPU,
SDPA attention), and fits bytes = fixed + per_element * latent elements for the
window and the decodes. Activation sizes do not depend
on the device, so the CPU fit serves the CUDA memory choice.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..guidance import initial_noise
from .measure import activation_bytes, environment
from .models import build_models

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares line through (latent elements, bytes): (fixed, per element)."""
    n = torch.tensor([p[0] for p in points], dtype=torch.float64)
    b = torch.tensor([p[1] for p in points], dtype=torch.float64)
    a = torch.stack([torch.ones_like(n), n], dim=1)
    fixed, per = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.flatten().tolist()
    return fixed, per


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl", "tiny"))
    parser.add_argument("--scale", type=float, default=1.0, dest="width_scale")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if len(set(args.sizes)) < 2:
        raise ValueError(f"need at least two different --sizes to fit a line, got {args.sizes}")
    torch.set_num_threads(1)
    models = build_models(args.family, args.width_scale, text_layers=1)
    cond = models.flow.encode(["a photo of a person"], [""], 4.5)
    rows = []
    for size in args.sizes:
        t = time.time()
        noise = initial_noise(models.flow.latent_shape(1, size, size), 0)
        rows.append({"size": size, "latent_elements": noise.numel(), **activation_bytes(models, cond, noise),
                     "seconds": time.time() - t})
        print(json.dumps(rows[-1]), flush=True)
    window_fixed, window = fit([(r["latent_elements"], r["window"]) for r in rows])
    decode_fixed, decode = fit([(r["latent_elements"], r["decode"]) for r in rows])
    recompute_fixed, recompute = fit([(r["latent_elements"], r["decode_recompute"]) for r in rows])
    constants = {"window": round(window), "window_fixed": round(window_fixed), "decode": round(decode),
                 "decode_recompute": round(recompute),
                 "fixed": round(max(r["recognizer"] for r in rows) + max(decode_fixed, recompute_fixed, 0.0))}
    report = {"family": args.family, "width_scale": args.width_scale, "measurements": rows,
              "intercepts": {"window": window_fixed, "decode": decode_fixed, "decode_recompute": recompute_fixed},
              "constants": constants, "environment": environment(torch.device("cpu"))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"calibration_{args.family}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"ACTIVATION_BYTES[{args.family!r}] = {constants}")
    return report


if __name__ == "__main__":
    main()
