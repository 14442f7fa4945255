"""The toy personalization task: a held-out digit is the reference, its class the prompt.

Held-out = the 20% of each class that no network trained on (a seeded random split of
scikit-learn's digits, which carry no writer labels: the same writer may be on both sides).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..guidance import Callback, GuidanceConfig, GuidanceResult, guide, initial_noise
from .data import NUM_CLASSES, DigitSplit, load_split
from .flow import DigitFlow, class_prompt
from .models import WEIGHTS_DIR, EvaluatorNet, FeatureNet, load_weights
from .objective import DigitIdentityObjective

METHODS = ("anchored", "no_anchor", "noise_gd", "anchored_momentum")
# CFG the flow is sampled with: the 2-RF was distilled from CFG-1.5 teacher samples, so it needs none.
FLOW_CFG = {"flow": 1.0, "flow_1rf": 1.5}
# Scales the benchmark selects on the 2-RF flow (best guiding cosine at N=25 on validation references;
# results/RESULTS.md says whether they still match); noise_gd's lr is 0.4 * s.
DEFAULT_SCALES = {"anchored": 0.05, "no_anchor": 0.05, "noise_gd": 0.1, "anchored_momentum": 0.05}
NOISE_SEED = 1234


@dataclass
class ToyModels:
    flow: DigitFlow
    feature: FeatureNet
    evaluator: EvaluatorNet
    split: DigitSplit
    cfg: float


def load_models(flow_name: str = "flow", weights: Path | str = WEIGHTS_DIR) -> ToyModels:
    """The networks in `weights` (default: the shipped ones) and the data split they were trained on."""
    if flow_name not in FLOW_CFG:
        raise ValueError(f"unknown toy flow {flow_name!r}; choose one of {', '.join(FLOW_CFG)}")
    flow = DigitFlow(load_weights(flow_name, weights))
    return ToyModels(flow, load_weights("feature", weights), load_weights("evaluator", weights), load_split(),
                     FLOW_CFG[flow_name])


def pick_references(split: DigitSplit, per_class: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class held-out digits of every class (after skipping `skip` per class), class-interleaved."""
    chosen = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(split.held_labels == c).flatten()
        if len(idx) < skip + per_class:
            raise ValueError(f"class {c} has {len(idx)} held-out digits, need {skip + per_class}")
        chosen.append(idx[skip:skip + per_class])
    order = torch.stack(chosen, 1).flatten()
    return split.held_images[order], split.held_labels[order]


def run(models: ToyModels, references: torch.Tensor, labels: torch.Tensor, config: GuidanceConfig,
        callback: Callback | None = None, seed: int = NOISE_SEED) -> GuidanceResult:
    """One batched solver call: every (reference, class prompt) pair is an independent image."""
    cond = models.flow.encode([class_prompt(int(y)) for y in labels], [], models.cfg)
    noise = initial_noise((len(labels), 1, 8, 8), seed)
    objective = DigitIdentityObjective(models.feature, references)
    return guide(models.flow, cond, objective, noise, config, callback)
