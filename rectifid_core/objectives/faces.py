"""Face identity objective: 100 * (1 - cos(ArcFace(aligned face), reference)), found as RectifID finds it.

Detection follows the released code (single_person.py, multi_person_perflow.ipynb): SCRFD at
threshold 0.5, lowered by 0.1 with no floor until as many faces as subjects pass, then
insightface's `detect(max_num=N)` ranking keeps N of them. A faint face early in the
optimisation is therefore still steered. `no_face="skip"` stops lowering at the floor instead
and gives such an image no gradient for that iteration (reported in the diagnostics "missing").
Reference photos keep the floor: a photo without a face is an error, not a guess.
"""
from __future__ import annotations

import logging
from typing import Any, Hashable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..images import ImageLike, as_reference_list, ensure_min_size
from .base import ObjectiveOutput
from .common import AVERAGES, average_embeddings, check_image_batch
from .detections import (SELECTIONS, Candidate, Detections, LocatedSubject, Region, describe_choice, inside_region,
                         select, top_n)
from .face_align import align_faces
from .face_models import FaceModels
from .scrfd import ImageInput, image_hw

logger = logging.getLogger(__name__)

FACE_SELECTIONS = SELECTIONS
# "fallback": lower the threshold without a floor (the reference code); "skip": stop at the floor.
NO_FACE = ("fallback", "skip")
# SCRFD finds nothing useful below ~20 px faces; smaller references are rejected.
MIN_REFERENCE_SIDE = 32


def detect_faces(
    models: FaceModels,
    image: ImageInput,
    *,
    min_count: int = 1,
    threshold: float = 0.5,
    step: float = 0.1,
    floor: Optional[float] = 0.1,
    region: Optional[Region] = None,
) -> Detections:
    """Detect in an RGB uint8 image [H,W,3] (or a [3,H,W] tensor in 0..1) at `threshold`, lowering
    it by `step` until at least `min_count` faces (at least half inside `region`, if given) are found.

    floor=None is the reference code's loop: no floor; it ends after the first threshold <= 0,
    where every anchor passes. Otherwise it stops before going below `floor`. Returns the last
    detections (possibly fewer than min_count), carrying the threshold they were found at.
    """
    if not 0.0 < threshold <= 1.0 or step <= 0 or min_count < 1 or (floor is not None and not 0.0 < floor <= threshold):
        raise ValueError(f"need 0 < floor <= threshold <= 1, step > 0 and min_count >= 1, got "
                         f"{floor=}, {threshold=}, {step=}, {min_count=}")
    hw = image_hw(image)
    thr = threshold
    while True:
        dets = inside_region(models.detector.detect(image, thr), region, hw)
        following = thr - step  # repeated subtraction, as the reference's det_thresh -= 0.1
        if len(dets) >= min_count or (thr <= 0.0 if floor is None else following < floor - 1e-9):
            return dets
        thr = following


def faces_needed(selection: str, index: int) -> int:
    """How many faces the selection needs to pick one: "index" 2 needs three, -2 needs two."""
    if selection != "index":
        return 1
    return index + 1 if index >= 0 else -index


def locate_face(models: FaceModels, image: torch.Tensor, *, selection: str = "insightface", index: int = 0,
                region: Optional[Region] = None, threshold: float = 0.5, step: float = 0.1,
                floor: float = 0.1) -> LocatedSubject:
    """Every face in a reference photo [1,3,H,W] (threshold lowered down to `floor` until one
    passes) and the chosen one."""
    dets = detect_faces(models, image[0], threshold=threshold, step=step, floor=floor)
    chosen = select(dets, tuple(image.shape[-2:]), selection, index, region) if len(dets) else None
    return LocatedSubject(dets, chosen)


class FaceIdentityObjective:
    """ArcFace identity loss of the selected face in each generated image.

    reference_images: one or several photos of the same person (PIL, numpy,
    [3,H,W] / [B,3,H,W] tensors 0..1); their embeddings are averaged
    ("normalized": mean of unit vectors, robust to photos of different
    quality; "plain": mean of raw embeddings). `reference_selection` picks the
    face in a reference with several ("index" uses the same `index`; a photo
    with one face uses it); `reference_located` keeps every detection and the
    choice, for previews.
    selection / index / region choose the face in the generated image;
    threshold / threshold_step / no_face / threshold_floor drive `detect_faces`.
    """

    kind = "face"

    def __init__(
        self,
        models: FaceModels,
        reference_images: Union[ImageLike, Sequence[ImageLike]],
        *,
        selection: str = "insightface",
        index: int = 0,
        region: Optional[Region] = None,
        reference_selection: str = "insightface",
        threshold: float = 0.5,
        threshold_step: float = 0.1,
        threshold_floor: float = 0.1,
        no_face: str = "fallback",
        average: str = "normalized",
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"face selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if reference_selection not in SELECTIONS or reference_selection == "mask":
            raise ValueError(f"reference face selection must be one of {', '.join(SELECTIONS[:-1])} (a reference "
                             f"photo has no mask), got {reference_selection!r}")
        if selection == "mask" and region is None:
            raise ValueError("face selection 'mask' needs a region mask that marks where the face may be")
        if no_face not in NO_FACE:
            raise ValueError(f"no_face must be one of {', '.join(NO_FACE)}, got {no_face!r}")
        if average not in AVERAGES:
            raise ValueError(f"embedding average must be one of {AVERAGES}, got {average!r}")
        self.models = models
        self.selection, self.index, self.region, self.no_face = selection, index, region, no_face
        self.threshold, self.threshold_step, self.threshold_floor = threshold, threshold_step, threshold_floor
        self.skipped_total = 0
        refs = as_reference_list(reference_images)
        embeddings = []
        self.reference_located: list[LocatedSubject] = []
        for i, ref in enumerate(refs):
            h, w = ref.shape[-2:]
            ensure_min_size(ref, MIN_REFERENCE_SIDE, upscale=False, what=f"face reference image {i + 1}")
            found = locate_face(models, ref, selection=reference_selection, index=index, threshold=threshold,
                                step=threshold_step, floor=threshold_floor)
            if len(found.detections) == 1:
                found.chosen = 0
            dets, pick = found.detections, found.chosen
            if pick is None and len(dets):
                raise ValueError(f"reference image {i + 1} has {len(dets)} face(s); face index {index} is out of "
                                 f"range (0 = leftmost, -1 = rightmost)")
            if pick is None:
                raise ValueError(
                    f"no face found in reference image {i + 1} ({w}x{h} pixels) even at detection threshold "
                    f"{threshold_floor}; use a photo where the face is visible and at least ~64 pixels wide"
                )
            if len(dets) > 1:
                logger.info(describe_choice(found, f"face reference image {i + 1}", reference_selection))
            self.reference_located.append(found)
            with torch.no_grad():
                embeddings.append(self._embed(ref, dets.keypoints[pick : pick + 1])[0])
        self.reference_embedding = average_embeddings(torch.stack(embeddings), average)
        self.proposal_key: Hashable = ("face", id(models), threshold, threshold_step, threshold_floor, no_face,
                                       None if region is None else id(region))
        self.feature_key: Hashable = ("arcface", id(models))

    @property
    def reference_boxes(self) -> list[list[float]]:
        """The chosen face box of each reference photo."""
        return [list(r.detections.box(r.chosen)) for r in self.reference_located]

    def _detect(self, image: torch.Tensor, min_count: int) -> Detections:
        floor = None if self.no_face == "fallback" else self.threshold_floor
        return detect_faces(self.models, image[0], min_count=min_count, threshold=self.threshold,
                            step=self.threshold_step, floor=floor, region=self.region)

    def _embed(self, image: torch.Tensor, keypoints: np.ndarray) -> torch.Tensor:
        return self.models.embed_crops(align_faces(image.to(self.models.device, torch.float32), keypoints))

    def _similarity(self, embedding: torch.Tensor) -> torch.Tensor:
        ref = self.reference_embedding.to(device=embedding.device, dtype=embedding.dtype)
        return F.cosine_similarity(embedding, ref[None], dim=-1)

    def __call__(self, image: torch.Tensor) -> ObjectiveOutput:
        check_image_batch(image)
        hw = tuple(image.shape[-2:])
        losses, sims, boxes, used, found, skipped = [], [], [], [], [], []
        for b in range(image.shape[0]):
            dets = self._detect(image[b : b + 1], faces_needed(self.selection, self.index))
            pick = select(dets, hw, self.selection, self.index, self.region) if len(dets) else None
            used.append(dets.threshold if len(dets) else None)
            found.append(len(dets))
            skipped.append(pick is None)
            if pick is None:
                losses.append(image[b].sum() * 0.0)
                sims.append(None)
                boxes.append(None)
                continue
            sim = self._similarity(self._embed(image[b : b + 1], dets.keypoints[pick : pick + 1]))[0]
            losses.append((100.0 * (1.0 - sim)).to(image.device, image.dtype))
            sims.append(float(sim.detach()))
            boxes.append([round(float(v), 1) for v in dets.boxes[pick]])
        n_skipped = sum(skipped)
        self.skipped_total += n_skipped
        return ObjectiveOutput(
            loss=torch.stack(losses),
            diagnostics={
                "similarity": sims,
                "boxes": boxes,
                "det_threshold": used,
                "faces_found": found,
                "missing": [[0] if s else [] for s in skipped],
                "skipped": skipped,
                "skipped_count": n_skipped,
                "skipped_total": self.skipped_total,
            },
        )

    # -- MultiSubjectObjective protocol -------------------------------------

    def propose(self, image: torch.Tensor, subjects: int, limit: int) -> tuple[list[Candidate], dict[str, Any]]:
        """As the reference for several people: lower the threshold until `subjects` faces are
        found, keep insightface's top `subjects` of them."""
        dets = self._detect(image, subjects)
        kept = top_n(dets, tuple(image.shape[-2:]), subjects)
        info = {"kind": "face", "found": len(dets), "det_threshold": dets.threshold if len(dets) else None}
        return kept.candidates("face")[:limit], info

    def embed(self, image: torch.Tensor, candidates: Sequence[Candidate]) -> torch.Tensor:
        return self._embed(image, np.stack([c.keypoints for c in candidates]))

    def candidate_losses(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = self._similarity(features)
        return 100.0 * (1.0 - sim), sim
