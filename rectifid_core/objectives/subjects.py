"""Live subjects and objects (DINOv2 on an OWL-ViT crop) and CLIP image guidance.

The reference subject is located by a text query ("dog"); in the generated
image the reference crop itself is the query (OWL-ViT image-guided
detection), which finds the same instance even when the prompt changes the
scene. Detection runs without gradient; the crop, resize, normalisation and
encoder are differentiable. As in RectifID's single_object.py, the highest
scoring box is used and, when the generated image yields none, the whole
image (the diagnostics say so; `not_found="skip"` steers nothing instead). A
label that finds nothing in a reference photo is an error.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..images import ImageLike, as_reference_list, to_uint8_hwc
from .base import ObjectiveOutput
from .common import AVERAGES, average_embeddings, check_image_batch
from .detections import Candidate, Detections, LocatedSubject, clip_box, crop, describe_choice

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_folder(path: Union[str, os.PathLike], what: str, extra: Sequence[str]) -> Path:
    """FileNotFoundError naming every file a transformers folder for `what` must hold."""
    folder = Path(path).expanduser()
    problems = []
    if not folder.is_dir():
        problems.append(f"folder does not exist: {folder}")
    else:
        for name in ("config.json", *extra):
            options = name.split("|")
            if not any((folder / o).is_file() for o in options):
                problems.append(f"missing {' or '.join(str(folder / o) for o in options)}")
        if not any((folder / w).is_file() for w in WEIGHT_FILES):
            problems.append(f"missing weights: one of {', '.join(WEIGHT_FILES)} in {folder}")
    if problems:
        raise FileNotFoundError(
            f"{what} model folder is incomplete:\n  " + "\n  ".join(problems) + "\n"
            f"Expected a transformers save_pretrained folder with config.json, weights and "
            f"{', '.join(e.replace('|', ' or ') for e in extra)} "
            f"(e.g. a local snapshot of the Hugging Face repository)"
        )
    return folder


@dataclass
class OwlVitDetector:
    """OWL-ViT with its processor; all methods take one image [3,H,W] 0..1 and return pixel boxes."""

    model: Any
    processor: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        inputs = self.processor(return_tensors="pt", **kwargs)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}

    @torch.no_grad()
    def detect_text(self, image: torch.Tensor, query: str, threshold: float = 0.1) -> Detections:
        """Boxes of `query` (e.g. "dog"), best first."""
        h, w = image.shape[-2:]
        outputs = self.model(**self._inputs(text=[[query]], images=to_uint8_hwc(image)))
        result = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=torch.tensor([[h, w]])
        )[0]
        return self._detections(result, h, w, threshold)

    @torch.no_grad()
    def detect_guided(
        self, image: torch.Tensor, query_image: torch.Tensor, threshold: float = 0.0, nms_threshold: float = 0.3
    ) -> Detections:
        """Boxes that look like `query_image` (a reference crop), best first."""
        h, w = image.shape[-2:]
        outputs = self.model.image_guided_detection(
            **self._inputs(images=to_uint8_hwc(image), query_images=to_uint8_hwc(query_image))
        )
        result = self.processor.image_processor.post_process_image_guided_detection(
            outputs, threshold=threshold, nms_threshold=nms_threshold, target_sizes=torch.tensor([[h, w]])
        )[0]
        return self._detections(result, h, w, threshold)

    @staticmethod
    def _detections(result: dict[str, torch.Tensor], h: int, w: int, threshold: float) -> Detections:
        """Boxes clipped to the image, best score first; boxes thinner than a pixel dropped."""
        scores = result["scores"].float().cpu()
        order = torch.argsort(scores, descending=True).tolist()
        boxes = [clip_box(box, h, w) for box in result["boxes"].float().cpu()[order].tolist()]
        keep = [k for k, box in enumerate(boxes) if box[2] - box[0] >= 1 and box[3] - box[1] >= 1]
        return Detections(np.array([boxes[k] for k in keep]), scores[order].numpy()[keep], threshold=threshold)


def load_owlvit(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> OwlVitDetector:
    """OWL-ViT detector from a local transformers folder (model + processor with its CLIP tokenizer)."""
    from transformers import OwlViTForObjectDetection, OwlViTProcessor

    folder = _check_folder(path, "OWL-ViT", ("preprocessor_config.json|processor_config.json", "tokenizer_config.json"))
    model = OwlViTForObjectDetection.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    processor = OwlViTProcessor.from_pretrained(folder, local_files_only=True)
    return OwlVitDetector(model=model, processor=processor)


@dataclass
class ImageEncoder:
    """A frozen vision backbone with its input convention.

    resize: "stretch" squashes a crop to `size` (DINOv2 on detection crops, as
    RectifID does), "center_crop" resizes the short side and crops the centre
    (CLIP's own preprocessing, for whole images).
    """

    model: Any
    kind: str  # "dinov2" (CLS token) or "clip" (projected image embedding)
    mean: torch.Tensor
    std: torch.Tensor
    size: tuple[int, int]
    resize: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,h,w] 0..1 -> normalised [B,3,*size], differentiable."""
        p = next(self.model.parameters())
        x = images.to(device=p.device, dtype=p.dtype)
        if self.resize == "center_crop":
            h, w = x.shape[-2:]
            s = max(self.size) / min(h, w)
            nh, nw = max(self.size[0], round(h * s)), max(self.size[1], round(w * s))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
            top, left = (nh - self.size[0]) // 2, (nw - self.size[1]) // 2
            x = x[..., top : top + self.size[0], left : left + self.size[1]]
        else:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        mean = self.mean.to(x.device, x.dtype).view(1, 3, 1, 1)
        std = self.std.to(x.device, x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocess(images))
        if self.kind == "clip":
            return out.image_embeds
        return out.last_hidden_state[:, 0]


def _preprocessing(folder: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Mean, std and input size from preprocessor_config.json (no image-processor class
    needed: the fast ones require torchvision)."""
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    size = cfg.get("crop_size") or cfg.get("size") or {}
    if isinstance(size, int):
        hw = (size, size)
    elif "height" in size:
        hw = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        hw = (int(size["shortest_edge"]),) * 2
    else:
        raise ValueError(f"cannot read the input size from {folder / 'preprocessor_config.json'}: {size!r}")
    try:
        mean, std = cfg["image_mean"], cfg["image_std"]
    except KeyError as exc:
        raise ValueError(f"{folder / 'preprocessor_config.json'} has no {exc.args[0]}") from exc
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32), hw


def _load_encoder(path, cls_name: str, kind: str, resize: str, what: str, device, dtype) -> ImageEncoder:
    import transformers

    folder = _check_folder(path, what, ("preprocessor_config.json",))
    mean, std, size = _preprocessing(folder)
    model = getattr(transformers, cls_name).from_pretrained(folder, local_files_only=True, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return ImageEncoder(model=model, kind=kind, mean=mean, std=std, size=size, resize=resize)


def load_dinov2(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """DINOv2 (transformers Dinov2Model folder) as a CLS-token encoder of subject crops."""
    return _load_encoder(path, "Dinov2Model", "dinov2", "stretch", "DINOv2", device, dtype)


def load_clip_vision(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """CLIP vision tower with projection (CLIPVisionModelWithProjection folder)."""
    return _load_encoder(path, "CLIPVisionModelWithProjection", "clip", "center_crop", "CLIP vision", device, dtype)


NOT_FOUND = ("whole_image", "skip")


class SubjectIdentityObjective:
    """DINOv2 identity loss of one subject: 100 * (1 - cos) + l1_weight * L1(crops).

    reference_images: one or more photos of the subject; with a `detector`
    and a text `query` each is cropped to its best-scoring box (ValueError
    when the query finds nothing); `reference_located` keeps every box and the
    choice. In the generated image the first reference crop is the
    image-guided query; when it finds nothing, `not_found` decides: the whole
    image ("whole_image", the reference code) or no guidance ("skip").
    `l1_weight` ~1000 helps rigid objects (cans, vases) and hurts live
    subjects whose pose changes; default 0.
    """

    kind = "subject"

    def __init__(
        self,
        encoder: ImageEncoder,
        reference_images: Union[ImageLike, Sequence[ImageLike]],
        *,
        detector: Optional[OwlVitDetector] = None,
        query: Optional[str] = None,
        text_threshold: float = 0.1,
        guided_threshold: float = 0.0,
        l1_weight: float = 0.0,
        not_found: str = "whole_image",
        average: str = "normalized",
    ) -> None:
        if detector is not None and not (query and query.strip()):
            raise ValueError("a text query naming the subject (e.g. 'dog') is needed to locate it in the reference")
        if l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {l1_weight}")
        if not_found not in NOT_FOUND:
            raise ValueError(f"not_found must be one of {', '.join(NOT_FOUND)}, got {not_found!r}")
        if average not in AVERAGES:
            raise ValueError(f"embedding average must be one of {AVERAGES}, got {average!r}")
        self.encoder, self.detector, self.query = encoder, detector, query
        self.guided_threshold, self.l1_weight, self.not_found = guided_threshold, l1_weight, not_found
        self.reference_crops: list[torch.Tensor] = []
        self.reference_located: list[LocatedSubject] = []
        for i, ref in enumerate(as_reference_list(reference_images)):
            h, w = ref.shape[-2:]
            if detector is None:
                found = LocatedSubject(Detections([[0.0, 0.0, float(w), float(h)]], [1.0]), 0)
            else:
                found = LocatedSubject(detector.detect_text(ref[0], query, text_threshold), 0)
                if not len(found.detections):
                    raise ValueError(
                        f"the object detector found no '{query}' in reference image {i + 1} ({w}x{h} pixels) at "
                        f"threshold {text_threshold}; set the label to what the photo shows in plain words "
                        f"(e.g. 'dog', 'plush toy', 'can') or use a photo where the subject is large and clear"
                    )
                if len(found.detections) > 1:
                    logger.info(describe_choice(found, f"'{query}' reference image {i + 1}", "best score"))
            self.reference_located.append(found)
            self.reference_crops.append(crop(ref, found.detections.box(0)))
        with torch.no_grad():
            emb = torch.cat([encoder(c) for c in self.reference_crops])
            self._ref_small = torch.cat([self._small(c) for c in self.reference_crops])
        self.reference_embedding = average_embeddings(emb, average)
        self.fallback_total = 0
        self.proposal_key: Hashable = ("subject", id(self))
        self.feature_key: Hashable = ("dinov2", id(encoder))

    @property
    def reference_boxes(self) -> list[list[float]]:
        """The box each reference photo was cropped to."""
        return [list(r.detections.box(r.chosen)) for r in self.reference_located]

    @property
    def can_propose(self) -> bool:
        """Only with a detector can this subject be found among several (MultiSubjectObjective)."""
        return self.detector is not None

    def _small(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops at the encoder's size in 0..1, for the pixel L1 term."""
        return F.interpolate(crops.float(), size=self.encoder.size, mode="bilinear", align_corners=False)

    def _locate(self, image: torch.Tensor) -> Detections:
        if self.detector is None:
            return Detections.empty()
        return self.detector.detect_guided(image[0], self.reference_crops[0][0], self.guided_threshold)

    def _losses(self, emb: torch.Tensor, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.reference_embedding.to(emb.device, emb.dtype)
        sim = F.cosine_similarity(emb, ref[None], dim=-1)
        loss = 100.0 * (1.0 - sim)
        if self.l1_weight:
            ref_small = self._ref_small.to(small.device, small.dtype)
            l1 = (small[:, None] - ref_small[None]).abs().mean(dim=(2, 3, 4)).mean(1)
            loss = loss + self.l1_weight * l1
        return loss, sim

    def __call__(self, image: torch.Tensor) -> ObjectiveOutput:
        check_image_batch(image)
        h, w = image.shape[-2:]
        losses, sims, boxes, fallback, missing = [], [], [], [], []
        for b in range(image.shape[0]):
            img = image[b : b + 1]
            found = self._locate(img)
            not_found = self.detector is not None and not len(found)
            fallback.append(not_found and self.not_found == "whole_image")
            missing.append([0] if not_found and self.not_found == "skip" else [])
            if missing[-1]:
                losses.append(img.sum() * 0.0)
                sims.append(None)
                boxes.append(None)
                continue
            box = found.box(0) if len(found) else (0.0, 0.0, float(w), float(h))
            c = crop(img, box)
            loss, sim = self._losses(self.encoder(c), self._small(c))
            losses.append(loss[0].to(image.device, image.dtype))
            sims.append(float(sim[0].detach()))
            boxes.append([round(v, 1) for v in box])
        n_fallback = sum(fallback)
        self.fallback_total += n_fallback
        return ObjectiveOutput(
            loss=torch.stack(losses),
            diagnostics={
                "similarity": sims,
                "boxes": boxes,
                "missing": missing,
                "whole_image_fallback": fallback,
                "fallback_count": n_fallback,
                "fallback_total": self.fallback_total,
            },
        )

    # -- MultiSubjectObjective protocol -------------------------------------

    def propose(self, image: torch.Tensor, subjects: int, limit: int) -> tuple[list[Candidate], dict[str, Any]]:
        found = self._locate(image)
        return found.candidates("subject")[:limit], {"kind": "subject", "query": self.query, "found": len(found)}

    def embed(self, image: torch.Tensor, candidates: Sequence[Candidate]) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [crop(image, c.box) for c in candidates]
        emb = torch.cat([self.encoder(c) for c in crops])
        small = torch.cat([self._small(c) for c in crops])
        return emb, small

    def candidate_losses(self, features: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._losses(*features)


class ClipImageObjective:
    """CLIP image-embedding loss of the whole image: 100 * (1 - cos) to the
    (averaged) reference embeddings, for style / reference-image guidance."""

    def __init__(
        self,
        encoder: ImageEncoder,
        reference_images: Union[ImageLike, Sequence[ImageLike]],
        *,
        average: str = "normalized",
    ) -> None:
        if encoder.kind != "clip":
            raise ValueError(f"ClipImageObjective needs a CLIP vision encoder (load_clip_vision), got a {encoder.kind} one")
        with torch.no_grad():
            emb = torch.cat([encoder(r) for r in as_reference_list(reference_images)])
        self.encoder = encoder
        self.reference_embedding = average_embeddings(emb, average)

    def __call__(self, image: torch.Tensor) -> ObjectiveOutput:
        check_image_batch(image)
        emb = self.encoder(image)
        sim = F.cosine_similarity(emb, self.reference_embedding.to(emb.device, emb.dtype)[None], dim=-1)
        return ObjectiveOutput(
            loss=(100.0 * (1.0 - sim)).to(image.device, image.dtype),
            diagnostics={"similarity": [float(s) for s in sim.detach()], "missing": [[] for _ in sim]},
        )
