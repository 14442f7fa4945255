"""Face identity objective: 100 * (1 - cos(ArcFace(aligned face), reference)).

Early in the optimisation the generated face is often faint, so detection is
retried with a lower threshold before giving up; an image where no face is
found at all contributes no gradient for that iteration (and is counted),
rather than stopping the run.
"""
from __future__ import annotations

from typing import Any, Hashable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..images import ImageLike, as_reference_list, ensure_min_size, to_uint8_hwc
from .base import ObjectiveOutput
from .common import AVERAGES, average_embeddings, check_image_batch
from .face_align import align_faces
from .face_models import FaceDetections, FaceModels
from .matching import Candidate

FACE_SELECTIONS = ("largest", "center", "index")
# SCRFD finds nothing useful below ~20 px faces; smaller references are rejected.
MIN_REFERENCE_SIDE = 32

Region = Union[tuple[float, float, float, float], torch.Tensor, np.ndarray]


def detect_faces(
    models: FaceModels,
    image: np.ndarray,
    threshold: float = 0.5,
    floor: float = 0.1,
    step: float = 0.1,
) -> FaceDetections:
    """Detect at `threshold`, lowering it by `step` down to `floor` until a face is found.

    The returned detections carry the threshold that found them (None when
    nothing was found even at the floor).
    """
    if not 0.0 < floor <= threshold <= 1.0 or step <= 0:
        raise ValueError(f"need 0 < floor <= threshold <= 1 and step > 0, got {floor=}, {threshold=}, {step=}")
    n_tries = int(np.floor((threshold - floor) / step + 1e-6)) + 1
    for k in range(n_tries):
        dets = models.detector.detect(image, round(threshold - k * step, 6))
        if len(dets):
            return dets
    empty = np.zeros(0, dtype=np.float32)
    return FaceDetections(empty.reshape(0, 4), empty, empty.reshape(0, 5, 2), None)


def _region_coverage(dets: FaceDetections, region: Region, hw: tuple[int, int]) -> np.ndarray:
    """Fraction of each face box inside the region (a pixel box or a mask)."""
    h, w = hw
    if isinstance(region, (torch.Tensor, np.ndarray)):
        if isinstance(region, torch.Tensor):
            m = region.detach().float().cpu()
        else:
            m = torch.from_numpy(np.asarray(region, dtype=np.float32))
        while m.ndim > 2:
            if m.shape[0] != 1:
                raise ValueError(f"region mask must be [H,W] (or with leading 1-dims), got shape {tuple(m.shape)}")
            m = m[0]
        m = F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0].numpy() > 0.5
    else:
        if len(region) != 4:
            raise ValueError(f"region box must be (x1, y1, x2, y2) in pixels, got {region!r}")
        x1, y1, x2, y2 = (float(v) for v in region)
        m = np.zeros((h, w), dtype=bool)
        m[max(0, int(round(y1))) : max(0, int(round(y2))), max(0, int(round(x1))) : max(0, int(round(x2)))] = True
    cover = np.zeros(len(dets))
    for i, (x1, y1, x2, y2) in enumerate(dets.boxes):
        xa, ya = int(np.clip(np.floor(x1), 0, w)), int(np.clip(np.floor(y1), 0, h))
        xb, yb = int(np.clip(np.ceil(x2), 0, w)), int(np.clip(np.ceil(y2), 0, h))
        if xb > xa and yb > ya:
            cover[i] = m[ya:yb, xa:xb].mean()
    return cover


def select_face(
    dets: FaceDetections,
    hw: tuple[int, int],
    selection: str = "largest",
    index: int = 0,
    region: Optional[Region] = None,
) -> Optional[int]:
    """Index of the chosen face, or None.

    region (pixel box x1y1x2y2 or mask) first restricts to faces at least half
    inside it; then "largest" (box area), "center" (closest to the image
    centre) or "index" (the index-th face from the left).
    """
    if selection not in FACE_SELECTIONS:
        raise ValueError(f"face selection must be one of {FACE_SELECTIONS}, got {selection!r}")
    pool = np.arange(len(dets))
    if region is not None and len(pool):
        pool = pool[_region_coverage(dets, region, hw) >= 0.5]
    if len(pool) == 0:
        return None
    boxes = dets.boxes[pool]
    if selection == "largest":
        return int(pool[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    if selection == "center":
        return int(pool[np.argmin((cx - hw[1] / 2) ** 2 + (cy - hw[0] / 2) ** 2)])
    order = pool[np.argsort(cx, kind="stable")]
    return int(order[index]) if -len(order) <= index < len(order) else None


class FaceIdentityObjective:
    """ArcFace identity loss of the selected face in each generated image.

    reference_images: one or several photos of the same person (PIL, numpy,
    [3,H,W] / [B,3,H,W] tensors 0..1); their embeddings are averaged
    ("normalized": mean of unit vectors, robust to photos of different
    quality; "plain": mean of raw embeddings). The largest face of each
    reference is used unless `reference_selection` says otherwise ("index"
    uses the same `index` as the generated image).
    selection / index / region choose the face in the generated image;
    threshold / threshold_floor / threshold_step drive `detect_faces`.
    """

    kind = "face"

    def __init__(
        self,
        models: FaceModels,
        reference_images: Union[ImageLike, Sequence[ImageLike]],
        *,
        selection: str = "largest",
        index: int = 0,
        region: Optional[Region] = None,
        reference_selection: str = "largest",
        threshold: float = 0.5,
        threshold_floor: float = 0.1,
        threshold_step: float = 0.1,
        average: str = "normalized",
    ) -> None:
        if selection not in FACE_SELECTIONS or reference_selection not in FACE_SELECTIONS:
            raise ValueError(f"face selection must be one of {FACE_SELECTIONS}, got {selection!r} / {reference_selection!r}")
        if average not in AVERAGES:
            raise ValueError(f"embedding average must be one of {AVERAGES}, got {average!r}")
        self.models = models
        self.selection, self.index, self.region = selection, index, region
        self.thresholds = (threshold, threshold_floor, threshold_step)
        self.skipped_total = 0
        refs = as_reference_list(reference_images)
        embeddings = []
        self.reference_boxes: list[list[float]] = []
        for i, ref in enumerate(refs):
            h, w = ref.shape[-2:]
            ensure_min_size(ref, MIN_REFERENCE_SIDE, upscale=False, what=f"face reference image {i}")
            dets = detect_faces(models, to_uint8_hwc(ref[0]), *self.thresholds)
            pick = select_face(dets, (h, w), reference_selection, index) if len(dets) else None
            if len(dets) and pick is None:
                raise ValueError(f"reference image {i} has {len(dets)} face(s); face index {index} is out of range")
            if pick is None:
                raise ValueError(
                    f"no face found in reference image {i} ({w}x{h} pixels) even at detection threshold "
                    f"{threshold_floor}; use a photo where the face is visible and at least ~64 pixels wide"
                )
            self.reference_boxes.append([float(v) for v in dets.boxes[pick]])
            with torch.no_grad():
                embeddings.append(self._embed(ref, dets.keypoints[pick : pick + 1])[0])
        self.reference_embedding = average_embeddings(torch.stack(embeddings), average)
        self.proposal_key: Hashable = ("face", id(models), self.thresholds, None if region is None else id(region))
        self.feature_key: Hashable = ("arcface", id(models))

    def _embed(self, image: torch.Tensor, keypoints: np.ndarray) -> torch.Tensor:
        return self.models.embed_crops(align_faces(image.to(self.models.device, torch.float32), keypoints))

    def _similarity(self, embedding: torch.Tensor) -> torch.Tensor:
        ref = self.reference_embedding.to(device=embedding.device, dtype=embedding.dtype)
        return F.cosine_similarity(embedding, ref[None], dim=-1)

    def __call__(self, image: torch.Tensor) -> ObjectiveOutput:
        check_image_batch(image)
        hw = tuple(image.shape[-2:])
        losses, sims, boxes, used, skipped = [], [], [], [], []
        for b in range(image.shape[0]):
            dets = detect_faces(self.models, to_uint8_hwc(image[b]), *self.thresholds)
            pick = select_face(dets, hw, self.selection, self.index, self.region) if len(dets) else None
            used.append(dets.threshold)
            if pick is None:
                losses.append(image[b].sum() * 0.0)
                sims.append(None)
                boxes.append(None)
                skipped.append(True)
                continue
            sim = self._similarity(self._embed(image[b : b + 1], dets.keypoints[pick : pick + 1]))[0]
            losses.append((100.0 * (1.0 - sim)).to(image.device, image.dtype))
            sims.append(float(sim.detach()))
            boxes.append([round(float(v), 1) for v in dets.boxes[pick]])
            skipped.append(False)
        n_skipped = sum(skipped)
        self.skipped_total += n_skipped
        return ObjectiveOutput(
            loss=torch.stack(losses),
            diagnostics={
                "similarity": sims,
                "boxes": boxes,
                "det_threshold": used,
                "skipped": skipped,
                "skipped_count": n_skipped,
                "skipped_total": self.skipped_total,
            },
        )

    # -- MultiSubjectObjective protocol -------------------------------------

    def propose(self, image: torch.Tensor, max_candidates: int) -> tuple[list[Candidate], dict[str, Any]]:
        dets = detect_faces(self.models, to_uint8_hwc(image[0]), *self.thresholds)
        if self.region is not None and len(dets):
            inside = _region_coverage(dets, self.region, tuple(image.shape[-2:])) >= 0.5
            dets = dets.subset(np.flatnonzero(inside))
        areas = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
        order = np.argsort(-areas, kind="stable")[:max_candidates]
        cands = [
            Candidate(tuple(float(v) for v in dets.boxes[i]), float(dets.scores[i]), "face", dets.keypoints[i])
            for i in order
        ]
        return cands, {"kind": "face", "found": len(dets), "det_threshold": dets.threshold}

    def embed(self, image: torch.Tensor, candidates: Sequence[Candidate]) -> torch.Tensor:
        return self._embed(image, np.stack([c.keypoints for c in candidates]))

    def candidate_losses(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = self._similarity(features)
        return 100.0 * (1.0 - sim), sim
