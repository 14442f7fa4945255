"""Personalize a few digits and save the comparison figure.

    python -m rectifid_core.toy.demo --out DIR

For each held-out reference: the reference, the unguided sample of its class, and each
solver mode after N iterations (scales from the benchmark's sweep). Runs in seconds on a CPU.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..guidance import GuidanceConfig
from .figures import image_grid
from .objective import evaluate
from .task import DEFAULT_SCALES, METHODS, load_models, pick_references, run


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for rectifid_toy_demo.png")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=1, help="references per digit class")
    args = parser.parse_args(argv)
    t0 = time.time()
    models = load_models()
    refs, labels = pick_references(models.split, args.per_class)
    columns = {"reference": refs.repeat(1, 3, 1, 1)}
    scores = {}
    for name, config in [("unguided", GuidanceConfig(iterations=0))] + [
            (m, GuidanceConfig(scale=DEFAULT_SCALES[m], iterations=args.iterations, mode=m)) for m in METHODS]:
        image = run(models, refs, labels, config).image
        columns[name] = image
        m = evaluate(models.evaluator, image, refs, labels)
        scores[name] = (float(m["identity"].mean()), float(m["correct"].mean()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rectifid_toy_demo.png"
    image_grid(columns, [f"'{int(y)}'" for y in labels]).save(path)
    for name, (identity, acc) in scores.items():
        print(f"{name:>17}: held-out identity {identity:.3f}, prompt accuracy {acc:.2f}")
    print(f"wrote {path} ({time.time() - t0:.1f}s)")
    return path


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny networks: a second thread only contends on a shared machine
    main()
