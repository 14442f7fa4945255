"""Does the accelerated solver reach the anchored solver's N=50 identity in fewer iterations?

    python -m rectifid_core.benchmark.convergence [--flow flow] [--out rectifid_core/benchmark/results]

On the toy digits task (rectifid_core/toy): every solver runs at the anchored
solver's guidance scale. The accelerated solver's own knob (momentum beta) is
chosen on validation pairs by the *guiding* similarity
at N=budget (the evaluator is not consulted); then on the test pairs each
solver runs N=50 once, and the output after every iteration (the callback's latent is
exactly what a run with that N returns) is scored by the evaluator: identity,
prompt accuracy, realism (RMS distance to the nearest training digit).
Pass criterion per solver: identity >= anchored's N=50 identity at some
N <= budget, with prompt accuracy >= anchored's N=50 and realism no worse
(paired over the test pairs: mean distance increase within two standard errors).
Writes convergence.json, convergence.md and convergence.png.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..guidance import GuidanceConfig, IterationInfo
from ..plots import line_chart
from ..toy.benchmark import measure
from ..toy.objective import nearest_train_distance
from ..toy.task import DEFAULT_SCALES, ToyModels, load_models, pick_references, run

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KNOBS = {"anchored_momentum": ("offset_momentum", (0.5, 0.7, 0.8))}


def curve(models: ToyModels, refs: torch.Tensor, labels: torch.Tensor,
          config: GuidanceConfig) -> tuple[list[dict], torch.Tensor]:
    """Metrics after 0..N iterations of one solver run (entry i = the output of a run with N=i),
    and the per-pair realism distances [N+1, pairs] for paired comparisons."""
    rows: list[dict[str, Any]] = []
    realism: list[torch.Tensor] = []

    def score(image: torch.Tensor) -> None:
        rows.append(measure(models, image, refs, labels))
        realism.append(nearest_train_distance(image, models.split.train_images))

    def record(info: IterationInfo) -> None:
        with torch.no_grad():
            score(models.flow.decode(info.latent))

    result = run(models, refs, labels, config, callback=record)
    score(result.image)
    return rows, torch.stack(realism)


def select_knob(models: ToyModels, mode: str, scale: float, budget: int) -> tuple[Any, list[dict]]:
    """The knob value with the best guiding similarity at N=budget on validation pairs."""
    refs, labels = pick_references(models.split, 2, skip=6)
    name, values = KNOBS[mode]
    rows = []
    for v in values:
        cfg = GuidanceConfig(scale=scale, iterations=budget, mode=mode, **{name: v})
        res = run(models, refs, labels, cfg)
        rows.append({"mode": mode, name: v, **measure(models, res.image, refs, labels)})
    best = max(rows, key=lambda r: r["guiding_sim"])
    return best[name], rows


def first_reaching(rows: list[dict], realism: torch.Tensor, target: dict, target_realism: torch.Tensor,
                   budget: int) -> int | None:
    """Smallest N <= budget with identity >= the target's and prompt accuracy and realism no worse.

    Realism "no worse": the mean per-pair increase of the nearest-training-digit distance
    is within two standard errors of zero (the same 60 pairs, so the comparison is paired).
    """
    for n, r in enumerate(rows[:budget + 1]):
        diff = realism[n] - target_realism
        margin = 2.0 * float(diff.std()) / len(diff) ** 0.5
        if (r["identity"] >= target["identity"] and r["prompt_acc"] >= target["prompt_acc"]
                and float(diff.mean()) <= margin):
            return n
    return None


def markdown(report: dict) -> str:
    t = report["target"]
    lines = [f"Toy flow {report['flow']}, {report['pairs']} test pairs, scale {report['scale']} for every solver; "
             f"target = anchored N={report['iterations']}: identity {t['identity']:.4f}, prompt acc "
             f"{t['prompt_acc']:.3f}, realism dist {t['realism_nn_dist']:.4f}\n\n",
             "| solver | knob | identity N=10 | N=25 | N=50 | prompt acc N=25 | realism N=25 | "
             f"first N reaching target (<= {report['budget']}) |\n|---|---|---|---|---|---|---|---|\n"]
    for name, s in report["solvers"].items():
        r = s["curve"]
        lines.append(f"| {name} | {s['knob']} | {r[10]['identity']:.4f} | {r[25]['identity']:.4f} | "
                     f"{r[-1]['identity']:.4f} | {r[25]['prompt_acc']:.3f} | {r[25]['realism_nn_dist']:.4f} | "
                     f"{s['first_reaching'] if s['first_reaching'] is not None else 'not reached'} |\n")
    lines.append("\nValidation selection (N=budget, guiding cos):\n\n")
    for r in report["selection"]:
        knob = {k: v for k, v in r.items() if k in [name for name, _ in KNOBS.values()]}
        lines.append(f"- {r['mode']} {knob}: guiding {r['guiding_sim']:.4f}, identity {r['identity']:.4f}\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow", default="flow")
    parser.add_argument("--per-class", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--budget", type=int, default=25)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.budget > args.iterations:
        raise ValueError(f"--budget ({args.budget}) must be <= --iterations ({args.iterations})")
    t0 = time.time()
    models = load_models(args.flow)
    scale = DEFAULT_SCALES["anchored"]
    refs, labels = pick_references(models.split, args.per_class)
    base = GuidanceConfig(scale=scale, iterations=args.iterations)
    configs = {"anchored": ("-", base)}
    selection = []
    for mode, (name, _) in KNOBS.items():
        value, rows = select_knob(models, mode, scale, args.budget)
        selection += rows
        configs[mode] = (f"{name}={value}", replace(base, mode=mode, **{name: value}))
    solvers: dict[str, dict[str, Any]] = {}
    realism = {}
    for mode, (knob, cfg) in configs.items():
        rows, realism[mode] = curve(models, refs, labels, cfg)
        solvers[mode] = {"knob": knob, "curve": rows}
    target = solvers["anchored"]["curve"][args.iterations]
    for mode, s in solvers.items():
        s["first_reaching"] = first_reaching(s["curve"], realism[mode], target,
                                             realism["anchored"][args.iterations], args.budget)
    report = {"flow": args.flow, "pairs": len(labels), "scale": scale, "iterations": args.iterations,
              "budget": args.budget, "target": target, "solvers": solvers, "selection": selection,
              "seconds": time.time() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (args.out / "convergence.md").write_text(markdown(report), encoding="utf-8")
    curves = {name: [r["identity"] for r in s["curve"]] for name, s in solvers.items()}
    line_chart(curves, "toy: held-out identity (evaluator cosine) vs iterations N", x_start=0).save(
        args.out / "convergence.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
