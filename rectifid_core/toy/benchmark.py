"""The toy benchmark, every number of rectifid_core/toy/results/ from one command:

    python -m rectifid_core.toy.benchmark                   # writes out/toy-benchmark/
    python -m rectifid_core.toy.benchmark --update-shipped  # rewrites rectifid_core/toy/results/

For each toy flow (2-rectified and 1-rectified, K=4):
1. Scale selection on validation references (digits 7-8 of each class, disjoint from every
   test subset): per solver the scale with the best *guiding* cosine at N=25 (the evaluator
   is not consulted).
2. The four modes (anchored = RectifID, no_anchor, noise_gd, anchored_momentum) on the main
   test subset, one N=100 run each, scored after every iteration (the output after i
   iterations is exactly what a run with N=i returns): identity, prompt accuracy, realism.
3. Robustness: every mode and momentum beta on 4 test subsets x 3 noise seeds (N=50).
4. Prompt conflict (reference of class c, prompt c+1 or c+5) on the main test pairs: plain
   RectifID at s, s/2, s/4 next to parallel rescaling factors at s, both sign conventions.
Writes benchmark.json, benchmark.md, RESULTS.md and the figures into the output folder.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..guidance import GuidanceConfig
from ..plots import chart_grid
from . import output_folder
from .data import augment
from .figures import image_grid
from .models import WEIGHTS_DIR, to_gray
from .objective import evaluate, nearest_train_distance
from .report import benchmark_markdown, results_markdown
from .task import DEFAULT_SCALES, NOISE_SEED, ToyModels, load_models, pick_references, run

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = Path("out/toy-benchmark")
FLOWS = {"flow": "2-rectified flow", "flow_1rf": "1-rectified flow"}
SELECT_N = 25
WINDOW_SCALES = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
NOISE_GD_SCALES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # lr = 0.4 * s: s = 1 is the paper's lr 0.4
BETAS = (0.3, 0.5, 0.7)
PARALLEL_FACTORS = (0.75, 0.5, 0.25, 0.0)
LARGE_STEPS = (0.25, 1.0)  # where anchored and no_anchor part ways, if anywhere
CONFLICT_SHIFTS = (1, 5)
VALIDATION_SKIP = 6  # validation = held-out digits 6-7 of every class (0-based), test subsets avoid them


@dataclass
class Plan:
    per_class: int = 6
    iterations: int = 100
    checkpoints: tuple[int, ...] = (10, 25, 50, 100)
    robust_iterations: int = 50
    budget: int = 25
    subsets: tuple[int, ...] = (0, 8, 14, 20)  # first held-out digit of each test subset, per class
    seeds: tuple[int, ...] = (NOISE_SEED, 1, 2)


@dataclass
class Curve:
    """Scores after 0..N iterations, per pair: [N+1, pairs] each."""

    identity: torch.Tensor
    correct: torch.Tensor
    realism: torch.Tensor
    guiding: torch.Tensor
    final: torch.Tensor  # the images after N iterations

    def at(self, n: int) -> dict[str, float]:
        k = self.identity.shape[1]
        return {"identity": float(self.identity[n].mean()), "identity_sem": float(self.identity[n].std() / k ** 0.5),
                "prompt_acc": float(self.correct[n].mean()), "realism_nn_dist": float(self.realism[n].mean()),
                "guiding_sim": float(self.guiding[n].mean())}

    def mean_curve(self, name: str) -> list[float]:
        return getattr(self, name).mean(1).tolist()


@torch.no_grad()
def pair_scores(models: ToyModels, images: torch.Tensor, refs: torch.Tensor,
                labels: torch.Tensor) -> list[torch.Tensor]:
    """identity (evaluator cosine), correct (evaluator class = prompt), realism (NN distance), guiding cosine."""
    m = evaluate(models.evaluator, images, refs, labels)
    guiding = F.cosine_similarity(models.feature(to_gray(images)), models.feature(to_gray(refs)))
    return [m["identity"], m["correct"], nearest_train_distance(images, models.split.train_images), guiding]


def trace(models: ToyModels, refs: torch.Tensor, labels: torch.Tensor, config: GuidanceConfig,
          seed: int = NOISE_SEED) -> Curve:
    """One solver run scored after every iteration (the callback's image is the iterate the loss saw)."""
    scores: list[list[torch.Tensor]] = []
    result = run(models, refs, labels, config, callback=lambda info: scores.append(
        pair_scores(models, info.image, refs, labels)), seed=seed)
    if result.stopped_early:
        raise RuntimeError(f"{config.mode} (s={config.scale}) stopped early: {result.stopped_early}")
    scores.append(pair_scores(models, result.image, refs, labels))
    return Curve(*(torch.stack(s) for s in zip(*scores)), final=result.image)


def select_scale(models: ToyModels, options: dict[str, Any], grid: tuple[float, ...]) -> tuple[float, list[dict]]:
    """The scale with the best guiding cosine at N=SELECT_N on the validation references."""
    refs, labels = pick_references(models.split, 2, skip=VALIDATION_SKIP)
    rows = []
    for scale in grid:
        res = run(models, refs, labels, GuidanceConfig(scale=scale, iterations=SELECT_N, **options))
        identity, correct, realism, guiding = pair_scores(models, res.image, refs, labels)
        rows.append({"scale": scale, "guiding_sim": float(guiding.mean()), "identity": float(identity.mean()),
                     "prompt_acc": float(correct.mean()), "realism_nn_dist": float(realism.mean())})
    return max(rows, key=lambda r: r["guiding_sim"])["scale"], rows


def first_reaching(curve: Curve, target: Curve, n_target: int, budget: int) -> int | None:
    """Smallest N <= budget with identity >= the target's at n_target, prompt accuracy no lower and realism
    no worse (paired mean increase of the nearest-training-digit distance within two standard errors)."""
    goal = target.at(n_target)
    for n in range(min(budget, curve.identity.shape[0] - 1) + 1):
        diff = curve.realism[n] - target.realism[n_target]
        margin = 2.0 * float(diff.std()) / len(diff) ** 0.5
        r = curve.at(n)
        if r["identity"] >= goal["identity"] and r["prompt_acc"] >= goal["prompt_acc"] and float(diff.mean()) <= margin:
            return n
    return None


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean of a - b over the same pairs and its standard error."""
    d = a - b
    return {"mean": float(d.mean()), "sem": float(d.std() / len(d) ** 0.5)}


def main_table(models: ToyModels, plan: Plan, scales: dict[str, float]) -> tuple[dict[str, Any], dict[str, Curve]]:
    """The four modes plus the comparisons the analysis needs, N=plan.iterations each on the main subset."""
    s_a, s_na, s_gd = scales["anchored"], scales["no_anchor"], scales["noise_gd"]
    variants: dict[str, dict[str, Any]] = {
        "anchored": {"mode": "anchored", "scale": s_a},
        "no_anchor": {"mode": "no_anchor", "scale": s_na},
        "noise_gd": {"mode": "noise_gd", "scale": s_gd},
        "anchored_momentum": {"mode": "anchored_momentum", "scale": s_a},
        "no_anchor at anchored's s": {"mode": "no_anchor", "scale": s_a},
        "anchored at no_anchor's s": {"mode": "anchored", "scale": s_na},
        **{f"{mode} at s={big:g}": {"mode": mode, "scale": big} for big in LARGE_STEPS
           for mode in ("anchored", "no_anchor")},
        "noise_gd at the paper's lr 0.4 (s=1)": {"mode": "noise_gd", "scale": 1.0},
        "noise_gd, l2 toward zero": {"mode": "noise_gd", "scale": s_gd, "l2_target": "zero"},
    }
    refs, labels = pick_references(models.split, plan.per_class)
    curves = {"unguided": trace(models, refs, labels, GuidanceConfig(iterations=0))}
    rows = {"unguided": {"config": {}, "at": {0: curves["unguided"].at(0)}}}
    done: dict[str, str] = {}
    for name, options in variants.items():
        key = json.dumps(options, sort_keys=True)
        if key in done:  # a comparison row that coincides with a selected one
            rows[name] = {**rows[done[key]], "same_as": done[key]}
            curves[name] = curves[done[key]]
            continue
        config = GuidanceConfig(iterations=plan.iterations, **options)
        curves[name] = trace(models, refs, labels, config)
        rows[name] = {"config": {**options, "offset_momentum": config.offset_momentum} if
                      options["mode"] == "anchored_momentum" else options,
                      "at": {n: curves[name].at(n) for n in plan.checkpoints if n <= plan.iterations}}
        done[key] = name
    n = plan.iterations
    pairs = [("anchored", "no_anchor"), ("anchored", "noise_gd"), ("noise_gd", "no_anchor"),
             ("anchored", "no_anchor at anchored's s")]
    differences = {f"{a} - {b}": paired(curves[a].identity[n], curves[b].identity[n]) for a, b in pairs}
    return {"rows": rows, "paired_identity": differences}, curves


def robustness(models: ToyModels, plan: Plan, scales: dict[str, float]) -> list[dict]:
    """Every mode and momentum beta on each test subset x noise seed: the ablation lead and momentum's gain."""
    n, budget = plan.robust_iterations, plan.budget
    out = []
    for skip in plan.subsets:
        refs, labels = pick_references(models.split, plan.per_class, skip=skip)
        for seed in plan.seeds:
            curves = {m: trace(models, refs, labels, GuidanceConfig(scale=scales[m], iterations=n, mode=m), seed)
                      for m in ("anchored", "no_anchor", "noise_gd")}
            base = curves["anchored"]
            row: dict[str, Any] = {"subset": skip, "seed": seed, **{f"{m}_identity": c.at(n)["identity"]
                                                                     for m, c in curves.items()}}
            row["unguided_identity"] = base.at(0)["identity"]
            row["anchored_prompt_acc"] = base.at(n)["prompt_acc"]
            for beta in BETAS:
                cfg = GuidanceConfig(scale=scales["anchored"], iterations=n, mode="anchored_momentum",
                                     offset_momentum=beta)
                mom = trace(models, refs, labels, cfg, seed)
                row[f"beta {beta}"] = {
                    "first_reaching": first_reaching(mom, base, n, budget),
                    **{f"identity_gain_N{k}": mom.at(k)["identity"] - base.at(k)["identity"] for k in (10, budget)},
                    f"realism_increase_N{n}": paired(mom.realism[n], base.realism[n]),
                    f"realism_increase_N{budget}": paired(mom.realism[budget], base.realism[budget]),
                    f"prompt_acc_N{n}": mom.at(n)["prompt_acc"],
                }
            out.append(row)
    return out


def prompt_conflict(models: ToyModels, plan: Plan, scale: float) -> tuple[dict[str, dict], dict[str, Curve]]:
    """Reference of class c, prompt c+shift: plain RectifID at s, s/2, s/4 and parallel rescaling at s."""
    refs, labels = pick_references(models.split, plan.per_class)
    refs = torch.cat([refs] * len(CONFLICT_SHIFTS))
    prompts = torch.cat([(labels + shift) % 10 for shift in CONFLICT_SHIFTS])
    variants: dict[str, dict[str, Any]] = {"unguided": {"iterations": 0, "scale": scale}}
    for div in (1, 2, 4):
        variants[f"RectifID s={scale / div:g}"] = {"scale": scale / div}
    for sign in ("opposing", "both"):
        for factor in PARALLEL_FACTORS:
            variants[f"parallel {factor:g} ({sign}) s={scale:g}"] = {
                "scale": scale, "parallel_rescale": factor, "parallel_sign": sign}
    rows, curves = {}, {}
    for name, options in variants.items():
        config = GuidanceConfig(**{"iterations": plan.iterations, **options})
        curves[name] = trace(models, refs, prompts, config)
        checkpoints = [0] if config.iterations == 0 else [n for n in plan.checkpoints if n <= plan.iterations]
        rows[name] = {"config": options, "at": {n: curves[name].at(n) for n in checkpoints}}
    return rows, curves


@torch.no_grad()
def lookups(models: ToyModels, plan: Plan) -> dict[str, dict[str, float]]:
    """Non-generative yardsticks on the main test pairs: copy a same-class training digit."""
    refs, labels = pick_references(models.split, plan.per_class)
    train, train_labels = models.split.train_images, models.split.train_labels
    other_class = labels.view(-1, 1) != train_labels.view(1, -1)
    pixel = torch.cdist(refs.flatten(1), train.flatten(1)).masked_fill(other_class, float("inf"))
    codes = F.normalize(models.evaluator(to_gray(train))[0], dim=1)
    ref_codes = F.normalize(models.evaluator(to_gray(refs))[0], dim=1)
    evaluator_cos = (ref_codes @ codes.T).masked_fill(other_class, -2.0)
    chosen = {"nearest same-class training digit (pixels)": pixel.argmin(1),
              "oracle: the same-class training digit the evaluator scores best": evaluator_cos.argmax(1)}
    out = {}
    for name, idx in chosen.items():
        identity, correct, _, guiding = pair_scores(models, train[idx], refs, labels)
        out[name] = {"identity": float(identity.mean()), "prompt_acc": float(correct.mean()),
                     "guiding_sim": float(guiding.mean())}
    return out


@torch.no_grad()
def what_the_networks_see(models: ToyModels, plan: Plan) -> dict[str, dict[str, float]]:
    """Mean cosine to a reference of: a mildly re-drawn copy, another held-out digit of its class, another class."""
    refs, labels = pick_references(models.split, plan.per_class)
    per = plan.per_class
    classes = len(labels) // per
    same_class = torch.roll(refs.view(per, classes, 1, 8, 8), 1, dims=0).reshape_as(refs)  # class-interleaved
    other_class = torch.roll(refs, 1, dims=0)
    redrawn = augment(refs, torch.Generator().manual_seed(5), strength=0.5)
    embed = {"evaluator": lambda x: models.evaluator(to_gray(x))[0],
             "feature (guides)": lambda x: models.feature(to_gray(x))}
    return {name: {what: float(F.cosine_similarity(f(x), f(refs)).mean())
                   for what, x in (("re-drawn copy", redrawn), ("another digit, same class", same_class),
                                   ("another class", other_class))}
            for name, f in embed.items()}


def benchmark_flow(flow_name: str, plan: Plan, weights: Path) -> tuple[dict, dict[str, Curve], dict[str, Curve]]:
    models = load_models(flow_name, weights)
    t0 = time.time()
    scales, sweeps = {}, {}
    for mode, grid in (("anchored", WINDOW_SCALES), ("no_anchor", WINDOW_SCALES), ("noise_gd", NOISE_GD_SCALES)):
        scales[mode], sweeps[mode] = select_scale(models, {"mode": mode}, grid)
    scales["anchored_momentum"] = scales["anchored"]
    table, curves = main_table(models, plan, scales)
    conflict, conflict_curves = prompt_conflict(models, plan, scales["anchored"])
    report = {"name": FLOWS[flow_name], "cfg": models.cfg, "selected_scales": scales, "sweeps": sweeps,
              "table": table, "robustness": robustness(models, plan, scales), "conflict": conflict,
              "seconds": time.time() - t0}
    return report, curves, conflict_curves


def figures(out: Path, report: dict, curves: dict[str, dict[str, Curve]], conflict: dict[str, dict[str, Curve]],
            models: ToyModels, plan: Plan) -> None:
    modes = ("unguided", "anchored", "no_anchor", "noise_gd", "anchored_momentum")
    panels = []
    for flow_name, flow_curves in curves.items():
        label = report["flows"][flow_name]["name"]
        for metric, title in (("identity", "held-out identity"), ("realism", "realism: NN distance (lower = better)")):
            series = {m: flow_curves[m].mean_curve(metric) for m in modes}
            series["unguided"] = series["unguided"] * (plan.iterations + 1)
            panels.append((f"{label}: {title} vs N", series))
    chart_grid(panels, columns=2, x_start=0).save(out / "curves.png")
    panels = []
    for flow_name, flow_curves in conflict.items():
        label = report["flows"][flow_name]["name"]
        shown = [n for n in flow_curves if n == "unguided" or "RectifID" in n or "(opposing)" in n]
        for metric, title in (("correct", "prompt accuracy"), ("identity", "identity")):
            series = {n.replace(" (opposing)", ""): flow_curves[n].mean_curve(metric) for n in shown}
            series["unguided"] = series["unguided"] * (plan.iterations + 1)
            panels.append((f"{label}, prompt conflict: {title} vs N", series))
    chart_grid(panels, columns=2, x_start=0).save(out / "conflict.png")
    refs, labels = pick_references(models.split, plan.per_class)
    shown = torch.arange(min(10, len(labels)))  # one reference per class
    main = curves["flow"]
    grid = {"reference": refs.repeat(1, 3, 1, 1)[shown], **{m: main[m].final[shown] for m in modes}}
    image_grid(grid, [f"'{int(y)}'" for y in labels[shown]]).save(out / "samples.png")
    scale = report["flows"]["flow"]["selected_scales"]["anchored"]
    c = conflict["flow"]
    grid = {"reference": refs.repeat(1, 3, 1, 1)[shown], "unguided": c["unguided"].final[shown],
            "RectifID": c[f"RectifID s={scale:g}"].final[shown],
            "parallel 0 (opposing)": c[f"parallel 0 (opposing) s={scale:g}"].final[shown],
            "parallel 0 (both)": c[f"parallel 0 (both) s={scale:g}"].final[shown]}
    image_grid(grid, [f"'{int(y)}'->'{(int(y) + CONFLICT_SHIFTS[0]) % 10}'" for y in labels[shown]]).save(
        out / "conflict_samples.png")


def output_dir(args: argparse.Namespace) -> Path:
    """--out (default out/toy-benchmark), or the package's results with --update-shipped (shipped weights only)."""
    if args.update_shipped and Path(args.weights).resolve() != WEIGHTS_DIR.resolve():
        raise SystemExit("--update-shipped rewrites the shipped results, which must come from the shipped weights; "
                         "drop --weights or write to --out")
    return output_folder(args.out, args.update_shipped, RESULTS_DIR, DEFAULT_OUT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--update-shipped", action="store_true",
                        help=f"write into the package's results folder ({RESULTS_DIR}) instead")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                        help="folder with the four .safetensors files (default: the shipped ones)")
    parser.add_argument("--per-class", type=int, default=Plan.per_class, help="test references per digit class")
    parser.add_argument("--iterations", type=int, default=Plan.iterations)
    parser.add_argument("--robust-iterations", type=int, default=Plan.robust_iterations)
    parser.add_argument("--budget", type=int, default=Plan.budget,
                        help="iterations within which momentum must reach anchored's identity at --robust-iterations")
    parser.add_argument("--subsets", type=int, nargs="+", default=list(Plan.subsets),
                        help="first held-out digit (per class) of each robustness test subset")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Plan.seeds))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine may be shared)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = output_dir(args)
    plan = Plan(args.per_class, args.iterations, tuple(n for n in Plan.checkpoints if n < args.iterations)
                + (args.iterations,), args.robust_iterations, args.budget, tuple(args.subsets), tuple(args.seeds))
    if not plan.budget <= plan.robust_iterations <= plan.iterations:
        raise SystemExit(f"need --budget ({plan.budget}) <= --robust-iterations ({plan.robust_iterations}) "
                         f"<= --iterations ({plan.iterations})")
    for skip in plan.subsets:
        if skip < VALIDATION_SKIP + 2 and skip + plan.per_class > VALIDATION_SKIP:
            raise SystemExit(f"test subset starting at {skip} overlaps the validation digits "
                             f"{VALIDATION_SKIP}-{VALIDATION_SKIP + 1} of each class")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    shipped = Path(args.weights).resolve() == WEIGHTS_DIR.resolve()
    report: dict[str, Any] = {"plan": plan.__dict__, "weights": "shipped" if shipped else str(args.weights),
                              "flows": {},
                              "shipped_default_scales": DEFAULT_SCALES}
    curves, conflict = {}, {}
    for flow_name in FLOWS:
        report["flows"][flow_name], curves[flow_name], conflict[flow_name] = benchmark_flow(
            flow_name, plan, args.weights)
        print(f"{flow_name}: done in {report['flows'][flow_name]['seconds']:.0f}s", flush=True)
    models = load_models("flow", args.weights)
    report["lookups"] = lookups(models, plan)
    report["networks"] = what_the_networks_see(models, plan)
    report["seconds"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "benchmark.md").write_text(benchmark_markdown(report), encoding="utf-8")
    (out / "RESULTS.md").write_text(results_markdown(report), encoding="utf-8")
    figures(out, report, curves, conflict, models, plan)
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return report


if __name__ == "__main__":
    main()
