"""Unguided vs RectifID (anchored) vs no_anchor vs noise_gd on the toy digits task.

    python -m rectifid_core.toy.benchmark [--out rectifid_core/toy/results]

1. Scale sweep on validation references (disjoint from the test pairs): for each method
   the scale with the lowest *guiding* loss at N=20 is kept (the evaluator is not consulted).
2. Test pairs (default 6 per class = 60): every method at every N in one batched solver
   call each; the evaluator measures identity (cosine of its codes), prompt accuracy (its
   class head) and realism (RMS distance to the nearest training digit).
Writes benchmark.md, benchmark.json, samples.png and identity_curves.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..guidance import GuidanceConfig
from ..plots import line_chart
from .figures import image_grid
from .models import to_gray
from .objective import evaluate, nearest_train_distance
from .task import ToyModels, load_models, pick_references, run

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCALE_GRID = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
# The solver modes as defined, plus the two knobs the analysis needs: the released c_k
# constant (per_window is 1 for this Euler flow, so "one" is identical), and a weaker l2 pull
# for noise_gd (with |ghat| <= 1 the l2 term bounds the noise offset at 1/l2).
VARIANTS = {
    "anchored": {"mode": "anchored"},
    "no_anchor": {"mode": "no_anchor"},
    "noise_gd": {"mode": "noise_gd"},
    "anchored (c_k legacy)": {"mode": "anchored", "ck_mode": "legacy"},
    "noise_gd (l2 0.1)": {"mode": "noise_gd", "l2": 0.1},
    "noise_gd (l2 0.01)": {"mode": "noise_gd", "l2": 0.01},
    "anchored_momentum": {"mode": "anchored_momentum"},
}


def measure(models: ToyModels, images: torch.Tensor, refs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    m = evaluate(models.evaluator, images, refs, labels)
    guiding = torch.nn.functional.cosine_similarity(models.feature(to_gray(images)), models.feature(to_gray(refs)))
    n = len(labels)
    return {
        "identity": float(m["identity"].mean()),
        "identity_sem": float(m["identity"].std() / n ** 0.5),
        "prompt_acc": float(m["correct"].mean()),
        "realism_nn_dist": float(nearest_train_distance(images, models.split.train_images).mean()),
        "guiding_sim": float(guiding.mean()),
    }


def sweep(models: ToyModels, refs: torch.Tensor, labels: torch.Tensor, iterations: int) -> list[dict]:
    rows = []
    for name, options in VARIANTS.items():
        for scale in SCALE_GRID:
            res = run(models, refs, labels, GuidanceConfig(scale=scale, iterations=iterations, **options))
            rows.append({"variant": name, "scale": scale, "N": iterations, **measure(models, res.image, refs, labels)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--per-class", type=int, default=6, help="test references per digit class")
    parser.add_argument("--iterations", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--flow", default="flow", choices=["flow", "flow_1rf"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny networks: a second thread only contends on a shared machine
    t0 = time.time()
    models = load_models(args.flow)
    val_refs, val_labels = pick_references(models.split, 2, skip=args.per_class)
    refs, labels = pick_references(models.split, args.per_class)

    sweep_rows = sweep(models, val_refs, val_labels, 20)
    scales = {v: max((r for r in sweep_rows if r["variant"] == v), key=lambda r: r["guiding_sim"])["scale"]
              for v in VARIANTS}

    rows, images, curves = [], {}, {}
    base = run(models, refs, labels, GuidanceConfig(iterations=0))
    rows.append({"method": "unguided", "scale": 0.0, "ck_mode": "-", "N": 0, "seconds": 0.0,
                 **measure(models, base.image, refs, labels)})
    images["unguided"] = base.image
    for name, options in VARIANTS.items():
        config = GuidanceConfig(scale=scales[name], **options)
        for n in args.iterations:
            trace: list[float] = []

            def record(info, trace=trace):
                image = models.flow.decode(info.latent)
                trace.append(float(evaluate(models.evaluator, image, refs, labels)["identity"].mean()))

            t = time.time()
            config.iterations = n
            res = run(models, refs, labels, config, callback=record)
            seconds = time.time() - t
            rows.append({"method": name, "scale": config.scale, "ck_mode": config.ck_mode, "l2": config.l2, "N": n,
                         "seconds": seconds, "stopped_early": res.stopped_early,
                         **measure(models, res.image, refs, labels)})
            if n == max(args.iterations):
                images[name] = res.image
                curves[name] = trace + [rows[-1]["identity"]]

    conflict = prompt_conflict(models, refs, (labels + 1) % 10, scales, args.iterations)
    nearest = nearest_training_digit(models, refs, labels)
    reference_rows = {"retrieval (nearest same-class training digit)": measure(models, nearest, refs, labels)}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"flow": args.flow, "cfg": models.cfg, "pairs": len(labels), "validation_pairs": len(val_labels),
              "selected_scales": scales, "sweep_N20_validation": sweep_rows, "results": rows,
              "reference_points": reference_rows, "prompt_conflict": conflict, "total_seconds": time.time() - t0}
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=1))
    (args.out / "benchmark.md").write_text(markdown(report))
    shown = torch.arange(min(10, len(labels)))  # one reference per class
    grid = {"reference": refs.repeat(1, 3, 1, 1)[shown], **{k: v[shown] for k, v in images.items()}}
    image_grid(grid, [f"'{int(y)}'" for y in labels[shown]]).save(args.out / "samples.png")
    curves["unguided"] = [rows[0]["identity"]] * (max(args.iterations) + 1)
    line_chart(curves, "held-out identity (evaluator cosine) vs iterations N", x_start=0).save(
        args.out / "identity_curves.png")
    print(markdown(report))
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")


def prompt_conflict(models: ToyModels, refs: torch.Tensor, prompts: torch.Tensor, scales: dict[str, float],
                    iterations: list[int]) -> list[dict]:
    """Reference of class c, prompt class c+1: identity now pulls against the prompt, so this shows what wins."""
    rows = [{"method": "unguided", "scale": 0.0, "N": 0,
             **measure(models, run(models, refs, prompts, GuidanceConfig(iterations=0)).image, refs, prompts)}]
    for name in ("anchored", "no_anchor", "noise_gd"):
        for n in iterations:
            config = GuidanceConfig(scale=scales[name], iterations=n, **VARIANTS[name])
            rows.append({"method": name, "scale": config.scale, "N": n,
                         **measure(models, run(models, refs, prompts, config).image, refs, prompts)})
    return rows


@torch.no_grad()
def nearest_training_digit(models: ToyModels, refs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A non-generative yardstick: the closest training digit of the prompted class (pixel L2)."""
    train, train_labels = models.split.train_images, models.split.train_labels
    d = torch.cdist(refs.flatten(1), train.flatten(1))
    d[labels.view(-1, 1) != train_labels.view(1, -1)] = float("inf")
    return train[d.argmin(1)].repeat(1, 3, 1, 1)


def markdown(report: dict) -> str:
    head = ("| method | s | c_k | N | identity (evaluator cos) | prompt acc | realism: NN dist | guiding cos | sec |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"Flow: {report['flow']} (CFG {report['cfg']}), {report['pairs']} test pairs, "
             f"scales chosen on {report['validation_pairs']} validation pairs: {report['selected_scales']}\n", head]
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['scale']} | {r['ck_mode']} | {r['N']} | {r['identity']:.4f} "
                     f"± {r['identity_sem']:.4f} | {r['prompt_acc']:.3f} | {r['realism_nn_dist']:.4f} | "
                     f"{r['guiding_sim']:.4f} | {r['seconds']:.2f} |\n")
    for name, r in report["reference_points"].items():
        lines.append(f"| {name} | - | - | - | {r['identity']:.4f} ± {r['identity_sem']:.4f} | {r['prompt_acc']:.3f} "
                     f"| {r['realism_nn_dist']:.4f} | {r['guiding_sim']:.4f} | - |\n")
    lines.append("\nPrompt conflict (reference of class c, prompt c+1; accuracy is for the prompted class)\n\n"
                 "| method | s | N | identity | prompt acc | realism: NN dist |\n|---|---|---|---|---|---|\n")
    for r in report["prompt_conflict"]:
        lines.append(f"| {r['method']} | {r['scale']} | {r['N']} | {r['identity']:.4f} ± {r['identity_sem']:.4f} "
                     f"| {r['prompt_acc']:.3f} | {r['realism_nn_dist']:.4f} |\n")
    lines.append("\nValidation sweep (N=20): guiding cos / evaluator identity / prompt acc\n\n| variant | "
                 + " | ".join(f"s={s}" for s in SCALE_GRID) + " |\n|---|" + "---|" * len(SCALE_GRID) + "\n")
    for name in VARIANTS:
        cells = [f"{r['guiding_sim']:.3f} / {r['identity']:.3f} / {r['prompt_acc']:.2f}"
                 for r in report["sweep_N20_validation"] if r["variant"] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


if __name__ == "__main__":
    main()
