"""The toy personalization task: a held-out digit is the reference, its class the prompt."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..guidance import Callback, GuidanceConfig, GuidanceResult, guide, initial_noise
from .data import NUM_CLASSES, DigitSplit, load_split
from .flow import DigitFlow, class_prompt
from .models import EvaluatorNet, FeatureNet, load_weights
from .objective import DigitIdentityObjective

METHODS = ("anchored", "no_anchor", "noise_gd")
# CFG the flow is sampled with: the 2-RF was distilled from CFG-1.5 teacher samples, so it needs none.
FLOW_CFG = {"flow": 1.0, "flow_1rf": 1.5}
# Scales the benchmark's validation sweep selected (best guiding loss at N=20, see results/RESULTS.md).
DEFAULT_SCALES = {"anchored": 0.1, "no_anchor": 0.25, "noise_gd": 0.25}
NOISE_SEED = 1234


@dataclass
class ToyModels:
    flow: DigitFlow
    feature: FeatureNet
    evaluator: EvaluatorNet
    split: DigitSplit
    cfg: float


def load_models(flow_name: str = "flow") -> ToyModels:
    """The shipped networks and the data split they were trained on."""
    if flow_name not in FLOW_CFG:
        raise ValueError(f"unknown toy flow {flow_name!r}; choose one of {', '.join(FLOW_CFG)}")
    return ToyModels(DigitFlow.shipped(flow_name), load_weights("feature"), load_weights("evaluator"),
                     load_split(), FLOW_CFG[flow_name])


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
