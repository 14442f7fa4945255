"""`python -m rectifid_core.benchmark`: time/memory of the guidance loop (see README in results/)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..cli import memory_mode
from ..guidance import MEMORY_MODES, SOLVER_MODES
from .measure import DTYPES, BenchSettings, measure_in_subprocess, run_settings
from .models import FAMILIES
from .report import markdown_table, write_results

PRESETS = {
    "tiny": {"family": "tiny", "width_scale": 0.1, "size": 64},
    "sd15": {"family": "sd15", "width_scale": 1.0, "size": 512},
    "sdxl": {"family": "sdxl", "width_scale": 1.0, "size": 1024},
    # FLUX.1-schnell and SD3.5 Large Turbo: real configs (benchmark/transformer_models.py), 4 steps, no CFG
    # (their model cards' settings); --size 768 for SD3.5's smaller size
    "flux": {"family": "flux", "width_scale": 1.0, "size": 1024, "cfg_scale": 1.0},
    "sd35": {"family": "sd35", "width_scale": 1.0, "size": 1024, "cfg_scale": 1.0},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rectifid_core.benchmark",
                                description="Seconds per guidance iteration, its floor and peak memory.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model family + width + image size; the flags below override it")
    p.add_argument("--family", choices=FAMILIES)
    p.add_argument("--scale", type=float, dest="width_scale", help="width multiplier of every layer")
    p.add_argument("--size", type=int, help="image side in pixels")
    p.add_argument("--cfg", type=float, dest="cfg_scale",
                   help="classifier-free guidance scale (default 4.5; 1 = off for the flux and sd35 presets)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--windows", "-K", type=int, default=4)
    p.add_argument("--iterations", "-N", type=int, default=6, help="timed solver iterations (first = warm-up)")
    p.add_argument("--floor-repeats", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", nargs="+", type=memory_mode, default=["store", "checkpoint"],
                   help=f"one subprocess per memory mode: {', '.join(MEMORY_MODES)} or partial:n (n steps recomputed)")
    p.add_argument("--mode", choices=SOLVER_MODES, default="anchored")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    p.add_argument("--compile", action="store_true",
                   help="run the solver compiled (GuidanceConfig.compile='on'); the first image includes compiling")
    p.add_argument("--faces", default="", help="antelopev2 folder: the face objective with SCRFD in the loop "
                                               "(default: the recognizer alone on the whole image)")
    p.add_argument("--reference", default="", help="reference photo for --faces")
    p.add_argument("--out", default="rectifid_core/benchmark/results")
    p.add_argument("--name", help="result file stem (default: preset_device_dtype)")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["_one"]:  # internal: one configuration in this fresh process
        print(json.dumps(run_settings(BenchSettings(**json.loads(argv[1])))))
        return 0
    args = _parser().parse_args(argv)
    base = dict(PRESETS[args.preset])
    for key in ("family", "width_scale", "size", "cfg_scale"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    results = []
    for memory in args.memory:
        s = BenchSettings(**base, batch=args.batch, windows=args.windows, iterations=args.iterations,
                          floor_repeats=args.floor_repeats, dtype=args.dtype, device=args.device, memory=memory,
                          mode=args.mode, channels_last=args.channels_last, threads=args.threads,
                          compile="on" if args.compile else "off", faces=args.faces, reference=args.reference)
        s.validate()
        print(f"measuring {asdict(s)}", file=sys.stderr, flush=True)
        results.append(measure_in_subprocess(s))
    name = args.name or (f"{args.preset}_{args.device.replace(':', '')}_{args.dtype}"
                         + ("_faces" if args.faces else "") + ("_compile" if args.compile else ""))
    json_path, md_path = write_results(results, args.out, name)
    print(markdown_table(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
