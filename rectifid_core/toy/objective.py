"""Identity objective for the toy: 100 (1 - cos) between guiding features of the output and the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..objectives.base import ObjectiveOutput
from .models import EvaluatorNet, FeatureNet, to_gray


class DigitIdentityObjective:
    """Same loss shape as the face objective (Eq. 17), with the contrastive FeatureNet as discriminator."""

    def __init__(self, feature_net: FeatureNet, references: torch.Tensor) -> None:
        self.net = feature_net.eval().requires_grad_(False)
        with torch.no_grad():
            self.ref = F.normalize(self.net(to_gray(references)), dim=1)

    def __call__(self, image: torch.Tensor) -> ObjectiveOutput:
        if image.shape[0] != self.ref.shape[0]:
            raise ValueError(f"objective built for {self.ref.shape[0]} references, got {image.shape[0]} images")
        sim = F.cosine_similarity(self.net(to_gray(image)), self.ref, dim=1)
        return ObjectiveOutput(100.0 * (1.0 - sim), {"similarity": sim.detach().tolist()})


@torch.no_grad()
def evaluate(evaluator: EvaluatorNet, images: torch.Tensor, references: torch.Tensor,
             labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image held-out identity (evaluator cosine) and whether the evaluator sees the prompted class."""
    code, logits = evaluator(to_gray(images))
    ref_code, _ = evaluator(to_gray(references))
    return {
        "identity": F.cosine_similarity(code, ref_code, dim=1),
        "correct": (logits.argmax(1) == labels).float(),
    }


@torch.no_grad()
def nearest_train_distance(images: torch.Tensor, train_images: torch.Tensor) -> torch.Tensor:
    """Realism: RMS pixel distance (0..1 scale) to the closest training digit."""
    d = torch.cdist(to_gray(images).flatten(1), to_gray(train_images).flatten(1))
    return d.min(1).values / 8.0
