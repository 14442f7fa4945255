"""Several subjects in one image: detect, assign detections to references, sum.

Each reference is a `MatchableObjective` (a face or a subject objective built
for one person/object). Every iteration the generated image is searched for
candidates, every reference scores every candidate of its kind, and the
assignment minimising the total loss (Hungarian algorithm) decides
which candidate is pulled towards which reference. The assignment is redone
every iteration because the subjects move while the image is optimised.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Hashable, Optional, Protocol, Sequence

import numpy as np
import torch

from .base import ObjectiveOutput
from .common import check_image_batch
from .detections import Candidate, nms

# Cost given to pairs that cannot be matched (a face reference and an object
# box); finite so that the assignment solver always has a solution.
_FORBIDDEN = 1e9


class MatchableObjective(Protocol):
    """What a per-reference objective offers to the multi-subject combiner.

    Objectives with the same `proposal_key` share one detection pass; those
    with the same `feature_key` share one feature extraction of the pooled
    candidates (e.g. all faces go through ArcFace once). An optional
    `can_propose` attribute set to False marks an objective that cannot
    detect its subject (it is rejected by the combiner).
    """

    kind: str
    proposal_key: Hashable
    feature_key: Hashable

    def propose(self, image: torch.Tensor, subjects: int, limit: int) -> tuple[list[Candidate], dict[str, Any]]:
        """Detections (no gradient) in one image [1,3,H,W] 0..1, at most `limit`, plus diagnostics.

        `subjects` is how many references share this detection pass (faces: the reference
        code lowers its threshold until that many are found and keeps that many).
        """

    def embed(self, image: torch.Tensor, candidates: Sequence[Candidate]) -> Any:
        """Differentiable features of the candidates in image [1,3,H,W]."""

    def candidate_losses(self, features: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [M], similarity [M]) of each candidate against this reference."""


def assign_subjects(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-total-cost matching of candidates (rows) to references (columns).

    Returns (candidate, reference) pairs; with fewer candidates than references
    some references stay unmatched, and vice versa.
    """
    from scipy.optimize import linear_sum_assignment

    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost matrix must be 2-D [candidates, references], got shape {cost.shape}")
    if cost.size == 0:
        return []
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost matrix contains NaN or infinite values")
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def _pool(groups: Sequence[list[Candidate]], iou: float, limit: int) -> list[Candidate]:
    """Merge proposals of several detection passes, best score first; the same subject found by
    two passes (two image-guided queries) must count once (NMS within each kind)."""
    pooled = sorted((c for g in groups for c in g), key=lambda c: -c.score)
    keep: set[int] = set()
    for kind in {c.kind for c in pooled}:
        idx = [i for i, c in enumerate(pooled) if c.kind == kind]
        kept = nms(np.array([pooled[i].box for i in idx]), np.array([pooled[i].score for i in idx]), iou)
        keep.update(idx[k] for k in kept)
    return [pooled[i] for i in sorted(keep)][:limit]


class MultiSubjectObjective:
    """Sum of matched per-reference losses over the subjects in each image.

    `weights` scales each reference's matched loss (default 1); the matching
    itself uses the unweighted losses, so that a weight says how hard a
    subject is pulled, not who it is. `max_candidates` caps
    the detections considered per image (default: twice the references);
    faces bring as many as there are face references (the reference code's
    rule, see FaceIdentityObjective.propose), objects up to the cap.
    Diagnostics per image: "boxes" of the candidates, "assignment" (for each
    reference the index of its candidate in "boxes", or None), "similarity"
    per reference. A reference left without a candidate contributes nothing
    that iteration and is listed in "missing"; an image with no candidate at
    all is skipped (zero loss, graph kept valid) and counted.
    """

    def __init__(
        self,
        subjects: Sequence[MatchableObjective],
        weights: Optional[Sequence[float]] = None,
        *,
        max_candidates: Optional[int] = None,
        duplicate_iou: float = 0.7,
    ) -> None:
        if len(subjects) == 0:
            raise ValueError("MultiSubjectObjective needs at least one subject objective")
        for i, s in enumerate(subjects):
            for attr in ("kind", "proposal_key", "feature_key", "propose", "embed", "candidate_losses"):
                if not hasattr(s, attr):
                    raise TypeError(f"subject {i + 1} ({type(s).__name__}) cannot be matched: it has no {attr!r}")
            if not getattr(s, "can_propose", True):
                raise ValueError(f"subject {i + 1} ({type(s).__name__}) has no detector to find it among several subjects")
        if weights is None:
            weights = [1.0] * len(subjects)
        if len(weights) != len(subjects):
            raise ValueError(f"got {len(weights)} weights for {len(subjects)} subjects")
        if any((not np.isfinite(w)) or w < 0 for w in weights):
            raise ValueError(f"subject weights must be finite and >= 0, got {list(weights)}")
        self.subjects = list(subjects)
        self.weights = [float(w) for w in weights]
        self.max_candidates = max_candidates if max_candidates is not None else 2 * len(subjects)
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.duplicate_iou = duplicate_iou
        self.skipped_total = 0

    def __call__(self, image: torch.Tensor) -> ObjectiveOutput:
        check_image_batch(image)
        losses, per_image = [], []
        for b in range(image.shape[0]):
            loss, diag = self._one(image[b : b + 1])
            losses.append(loss)
            per_image.append(diag)
        skipped = sum(1 for d in per_image if d["skipped"])
        self.skipped_total += skipped
        return ObjectiveOutput(
            loss=torch.stack(losses),
            diagnostics={
                "similarity": [d["similarity"] for d in per_image],
                "boxes": [d["boxes"] for d in per_image],
                "assignment": [d["assignment"] for d in per_image],
                "missing": [d["missing"] for d in per_image],
                "detection": [d["detection"] for d in per_image],
                "skipped": [d["skipped"] for d in per_image],
                "skipped_count": skipped,
                "skipped_total": self.skipped_total,
            },
        )

    def _one(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        n = len(self.subjects)
        proposals: dict[Hashable, list[Candidate]] = {}
        detection: list[dict[str, Any]] = []
        sharing = Counter(s.proposal_key for s in self.subjects)
        for s in self.subjects:
            if s.proposal_key not in proposals:
                cands, info = s.propose(image, sharing[s.proposal_key], self.max_candidates)
                proposals[s.proposal_key] = cands
                detection.append(info)
        candidates = _pool(list(proposals.values()), self.duplicate_iou, self.max_candidates)
        empty = {
            "similarity": [None] * n,
            "boxes": [],
            "assignment": [None] * n,
            "missing": list(range(n)),
            "detection": detection,
            "skipped": True,
        }
        if not candidates:
            return image.sum() * 0.0, empty

        features: dict[Hashable, tuple[list[int], Any]] = {}
        cost = np.full((len(candidates), n), _FORBIDDEN)
        columns: list[Optional[tuple[torch.Tensor, torch.Tensor, list[int]]]] = []
        for j, s in enumerate(self.subjects):
            idx = [i for i, c in enumerate(candidates) if c.kind == s.kind]
            if not idx:
                columns.append(None)
                continue
            if s.feature_key not in features or features[s.feature_key][0] != idx:
                features[s.feature_key] = (idx, s.embed(image, [candidates[i] for i in idx]))
            loss, sim = s.candidate_losses(features[s.feature_key][1])
            columns.append((loss, sim, idx))
            cost[idx, j] = loss.detach().double().cpu().numpy()

        total = image.sum() * 0.0
        similarity: list[Optional[float]] = [None] * n
        assignment: list[Optional[int]] = [None] * n
        for i, j in assign_subjects(cost):
            col = columns[j]
            if col is None or cost[i, j] >= _FORBIDDEN:
                continue
            loss, sim, idx = col
            k = idx.index(i)
            total = total + self.weights[j] * loss[k].to(total.device, total.dtype)
            similarity[j] = float(sim[k].detach())
            assignment[j] = i
        return total, {
            "similarity": similarity,
            "boxes": [[round(float(v), 1) for v in c.box] for c in candidates],
            "assignment": assignment,
            "missing": [j for j in range(n) if assignment[j] is None],
            "detection": detection,
            "skipped": all(a is None for a in assignment),
        }
