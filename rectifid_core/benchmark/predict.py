"""Predicted GPU peak memory and time per memory mode, from the calibrated estimate (no GPU needed).

    python -m rectifid_core.benchmark.predict

Peak = the weights the guidance loop keeps on the GPU (parameter counts of the real
architectures, built on the meta device, at the run's dtype; SDXL's VAE in fp32) +
`guidance.estimate_guidance_bytes` for each mode. Time relative to the floor assumes a
forward costs `--forward-share` of a forward+backward and that a recomputed part adds
one forward; for SD1.5 it uses the parts of one iteration measured on an H100 in issue 9
(window, decode, recognizer forward+backward, milliseconds; --parts-ms to change them).
For SDXL, FLUX.1-schnell and SD3.5 Large Turbo no parts were measured, so their column is
the bound every recomputing mode keeps when each activation is recomputed at most once:
1 + forward share. FLUX / SD3.5 weights on the GPU are the transformer, the VAE and the
recognizer; their text encoders (T5-XXL ~9 GiB in bf16) visit the GPU only while the
prompt is encoded, before guidance, which the "encode peak" column shows. Their
recompute_vae and checkpoint estimates are upper bounds: those flows recompute per block
(see results/README.md). These are estimates; benchmark/results/README.md lists the GPU commands that check them.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..guidance import AUTO_HEADROOM, FP32_DECODE, estimate_guidance_bytes, memory_order, recomputed_steps
from .models import IResNet, text_encoder_configs, unet_config, vae_config
from .transformer_models import TRANSFORMER_FAMILIES, clip_configs, t5_config, transformer_config
from .transformer_models import vae_config as transformer_vae_config

GIB = 1024 ** 3
# Issue 9, H100, SD1.5 512 fp16 eager: one CFG window 82 ms, VAE decode 45 ms, recognizer 36 ms (forward+backward)
ISSUE9_PARTS_MS = {"window": 82.0, "decode": 45.0, "recognizer": 36.0}
TARGETS = {"sd15": [("<= 8 GiB at <= 1.15x", 8.0, 1.15), ("<= 4 GiB at <= 1.4x", 4.0, 1.4)],
           "sdxl": [("fits 24 GiB at <= 1.5x", 24.0, 1.5)],
           "flux": [(f"fits {g} GiB", float(g), 2.0) for g in (24, 48, 80)],
           "sd35": [(f"fits {g} GiB", float(g), 2.0) for g in (24, 48, 80)]}
SIZES = {"sd15": (512,), "sdxl": (1024,), "flux": (1024,), "sd35": (1024, 768)}


def _count_bytes(models: dict[str, Any], width: int) -> dict[str, int]:
    out = {}
    for name, model in models.items():
        parts = model if isinstance(model, list) else [model]
        out[name] = width * sum(t.numel() for m in parts for t in [*m.parameters(), *m.buffers()])
    return out


def transformer_weight_bytes(family: str, dtype: torch.dtype) -> tuple[dict[str, int], int]:
    """(bytes of what stays on the GPU during guidance, bytes of the text encoders that visit it to encode)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        resident = {"transformer": cls(**transformer_config(family)),
                    "vae": AutoencoderKL(**transformer_vae_config(family)), "recognizer": IResNet()}
        texts = [CLIPTextModel(CLIPTextConfig(**c)) for c in clip_configs(family)] + [
            T5EncoderModel(T5Config(**t5_config()))]
    width = torch.finfo(dtype).bits // 8
    return _count_bytes(resident, width), _count_bytes({"texts": texts}, width)["texts"]


def weight_bytes(family: str, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each model's parameters and buffers at the dtype the flow loads it in."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**unet_config(family)), "vae": AutoencoderKL(**vae_config(family)),
                  "text_encoders": [CLIPTextModel(CLIPTextConfig(**c)) for c in text_encoder_configs(family)],
                  "recognizer": IResNet()}
    width = torch.finfo(dtype).bits // 8
    out = {}
    for name, model in models.items():
        parts = model if isinstance(model, list) else [model]
        count = sum(t.numel() for m in parts for t in [*m.parameters(), *m.buffers()])
        out[name] = count * (4 if name == "vae" and family in FP32_DECODE else width)
    return out


def relative_time(mode: str, parts_ms: dict[str, float] | None, steps: int, forward_share: float) -> float:
    """Iteration time over the floor when each recomputed part costs one more forward (no parts: the bound).

    Every mode but store recomputes the decoder; partial:n and checkpoint also the model calls of n (all) steps.
    """
    if parts_ms is None:
        return 1.0 if mode == "store" else 1.0 + forward_share
    floor = steps * parts_ms["window"] + parts_ms["decode"] + parts_ms["recognizer"]
    extra = 0.0 if mode == "store" else recomputed_steps(mode, steps) * parts_ms["window"] + parts_ms["decode"]
    return 1.0 + forward_share * extra / floor


def predict(family: str, size: int, steps: int, dtype: torch.dtype, parts_ms: dict[str, float] | None,
            forward_share: float) -> dict[str, Any]:
    encode_extra = 0
    if family in TRANSFORMER_FAMILIES:
        weights, encode_extra = transformer_weight_bytes(family, dtype)
        channels = 16
    else:
        weights, channels = weight_bytes(family, dtype), 4
    activations = estimate_guidance_bytes((1, channels, size // 8, size // 8), steps, family, dtype)
    rows = {}
    for mode in memory_order(steps):
        peak = sum(weights.values()) + activations[mode]
        rows[mode] = {"activations_gib": activations[mode] / GIB, "peak_gib": peak / GIB,
                      "auto_from_free_gib": activations[mode] / AUTO_HEADROOM / GIB,
                      "time_vs_floor": relative_time(mode, parts_ms, steps, forward_share)}
    targets = {name: [m for m, r in rows.items() if r["peak_gib"] <= gib and r["time_vs_floor"] <= ratio]
               for name, gib, ratio in TARGETS[family]}
    return {"family": family, "size": size, "steps": steps, "dtype": str(dtype), "time_is_bound": parts_ms is None,
            "weights_gib": {k: v / GIB for k, v in weights.items()},
            "encode_peak_gib": (sum(weights.values()) + encode_extra) / GIB if encode_extra else None,
            "modes": rows, "targets_met_by": targets}


def markdown(report: dict[str, Any]) -> str:
    encode = report["encode_peak_gib"]
    lines = [f"{report['family']} {report['size']} px, K={report['steps']}, {report['dtype']}: weights "
             f"{sum(report['weights_gib'].values()):.2f} GiB"
             + (f" (encode peak, text encoders on the GPU: {encode:.2f} GiB)" if encode else ""),
             "", f"| mode | activations GiB | peak GiB | time / floor{' (bound)' if report['time_is_bound'] else ''} "
             "| auto picks it from GiB free (weights loaded) |", "|---|---|---|---|---|"]
    for mode, r in report["modes"].items():
        lines.append(f"| {mode} | {r['activations_gib']:.2f} | {r['peak_gib']:.2f} | {r['time_vs_floor']:.2f} "
                     f"| {r['auto_from_free_gib']:.2f} |")
    for name, modes in report["targets_met_by"].items():
        lines.append(f"\ntarget {name}: " + (", ".join(modes) if modes else "no mode, by this estimate"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", "-K", type=int, default=4)
    parser.add_argument("--parts-ms", type=json.loads, default=ISSUE9_PARTS_MS,
                        help="JSON {window, decode, recognizer}: SD1.5 forward+backward milliseconds of each part")
    parser.add_argument("--forward-share", type=float, default=1 / 3,
                        help="a forward's share of a forward+backward (default 1/3)")
    args = parser.parse_args(argv)
    parts = {"sd15": args.parts_ms}
    # FLUX / SD3.5 in bf16, as their model cards load them (and as the CLI does on CUDA)
    reports = [predict(f, size, args.windows, torch.bfloat16 if f in TRANSFORMER_FAMILIES else torch.float16,
                       parts.get(f), args.forward_share) for f in SIZES for size in SIZES[f]]
    for report in reports:
        print(markdown(report) + "\n")
    return reports


if __name__ == "__main__":
    main()
