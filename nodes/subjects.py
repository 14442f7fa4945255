"""Reference nodes: find and crop a subject, turn reference photos into objectives, match several subjects."""
from __future__ import annotations

import json
from typing import Any

import torch

from rectifid_core.pipeline import (LOCATE_POLICIES, Discriminator, box_mask, locate_subject,
                                    multi_subject_objective, reference_previews, square_crop, subject_objective)

from .common import (CATEGORY, DISCRIMINATOR, OBJECTIVE, SUBJECT, ObjectiveBundle, Subject, autograd_enabled,
                     image_to_comfy, image_to_core, mask_to_core)

MAX_SUBJECTS = 4


def _check_discriminator(value: Any) -> Discriminator:
    if not isinstance(value, Discriminator):
        raise TypeError(f"expected a RectifID face/object/CLIP model loader output, got {type(value).__name__}")
    return value


class RectifIDDetectCrop:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (DISCRIMINATOR, {"tooltip": "Face model (finds faces) or object models (find the label)."}),
                "image": ("IMAGE", {"tooltip": "Photo(s) to search; one crop per image."}),
                "selection": (list(LOCATE_POLICIES), {
                    "default": "insightface",
                    "tooltip": "Which detection to keep: insightface (its own ranking: large and near the centre, "
                               "as RectifID's code), largest, center (nearest the centre), index (index-th from "
                               "the left), or mask (the largest inside the mask)."}),
                "index": ("INT", {"default": 0, "min": -16, "max": 16,
                                  "tooltip": "For selection 'index': 0 = leftmost, -1 = rightmost."}),
                "label": ("STRING", {"default": "", "tooltip": "Object models only: what to find, e.g. 'dog'."}),
                "padding": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 2.0, "step": 0.05,
                                      "tooltip": "Margin around the box, as a fraction of its longer side."}),
                "crop_size": ("INT", {"default": 512, "min": 32, "max": 2048, "step": 8,
                                      "tooltip": "Side of the square crops (all crops share one size)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "For selection 'mask': keep the subject inside the painted area."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING", "MASK", "IMAGE")
    RETURN_NAMES = ("crops", "boxes_json", "mask", "preview")
    OUTPUT_TOOLTIPS = ("Square crops around the chosen subject.",
                       "JSON list per image: every box [x1, y1, x2, y2] and the chosen index.",
                       "The chosen box as a mask over the input image.",
                       "The input with all boxes drawn (chosen in red).")
    FUNCTION = "detect"
    CATEGORY = f"{CATEGORY}/reference"
    DESCRIPTION = "Finds faces or a named object in a photo and crops the chosen one."

    def detect(self, model: Discriminator, image: torch.Tensor, selection: str, index: int, label: str,
               padding: float, crop_size: int, mask: torch.Tensor | None = None) -> tuple:
        model = _check_discriminator(model)
        if model.kind == "clip":
            raise ValueError("a CLIP model compares whole images and cannot detect; connect a face or object model")
        images = image_to_core(image, "image")
        # the mask matters only to selection 'mask'; one left connected for another selection is not checked
        masks = mask_to_core(mask, "mask") if mask is not None and selection == "mask" else None
        if masks is not None and masks.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"mask batch {masks.shape[0]} does not match the image batch {images.shape[0]}")
        kwargs = {"face_models": model.models["faces"]} if model.kind == "face" else {
            "detector": model.models["detector"], "label": label}
        crops, records, out_masks, located = [], [], [], []
        for i in range(images.shape[0]):
            img = images[i:i + 1]
            region = None if masks is None else masks[min(i, masks.shape[0] - 1)]
            found = locate_subject(img, policy=selection, index=index, mask=region, **kwargs)
            what = "face" if model.kind == "face" else f"'{label.strip()}'"
            if found.chosen is None:
                detail = (f"{len(found.boxes)} found, none matches selection '{selection}'"
                          + (f" index {index}" if selection == "index" else "")) if found.boxes else "nothing detected"
                raise ValueError(f"no {what} found in image {i + 1} of {images.shape[0]} ({detail})")
            box = found.boxes[found.chosen]
            crops.append(square_crop(img, box, padding, crop_size))
            out_masks.append(box_mask(img.shape[-2], img.shape[-1], box))
            located.append(found)
            records.append({"boxes": [[round(v, 1) for v in b] for b in found.boxes],
                            "scores": [round(s, 3) for s in found.scores], "chosen": found.chosen})
        return (image_to_comfy(torch.cat(crops)), json.dumps(records), torch.stack(out_masks),
                image_to_comfy(reference_previews(list(images.split(1)), located)))


class RectifIDSubject:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (DISCRIMINATOR, {"tooltip": "Face model, object models or CLIP model: what judges likeness."}),
                "images": ("IMAGE", {"tooltip": "One or more photos of the same subject (a batch); their "
                                                "features are averaged."}),
                "label": ("STRING", {"default": "person",
                                     "tooltip": "Name of the subject in reports. Object models also use it to find "
                                                "the subject in the reference photos, so name its class ('dog')."}),
                "selection": (list(LOCATE_POLICIES), {
                    "default": "insightface",
                    "tooltip": "Faces: which face is used in each reference photo and steered in the generated "
                               "image: insightface (its own ranking: large and near the centre, as RectifID's "
                               "code), largest, center (nearest the centre), index (index-th from the left), mask "
                               "(the largest inside 'region'; references use insightface). 'Match Subjects' "
                               "assigns the generated faces itself."}),
                "index": ("INT", {"default": 0, "min": -16, "max": 16,
                                  "tooltip": "For selection 'index': 0 = leftmost face, -1 = rightmost."}),
                "l1_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10000.0, "step": 10.0,
                                        "tooltip": "Objects only: weight of a pixel L1 term on the crop. ~1000 helps "
                                                   "rigid objects (cans, vases); keep 0 for animals and people."}),
            },
            "optional": {
                "more_images": ("IMAGE", {"tooltip": "More photos of the same subject at another size."}),
                "region": ("MASK", {"tooltip": "Faces: only steer a face at least half inside this area of the "
                                               "generated image (mask at any resolution)."}),
            },
        }

    RETURN_TYPES = (SUBJECT, OBJECTIVE, "IMAGE")
    RETURN_NAMES = ("subject", "objective", "reference_preview")
    OUTPUT_TOOLTIPS = ("This reference, for 'Match Subjects' (several subjects in one image).",
                       "This reference alone, ready for the RectifID Sampler.",
                       "Each reference photo with every detection drawn and numbered; the one used in red.")
    FUNCTION = "build"
    CATEGORY = f"{CATEGORY}/reference"
    DESCRIPTION = "Builds the identity objective of one subject from reference photos."

    def build(self, model: Discriminator, images: torch.Tensor, label: str, selection: str, index: int,
              l1_weight: float, more_images: torch.Tensor | None = None, region: torch.Tensor | None = None) -> tuple:
        model = _check_discriminator(model)
        refs = list(image_to_core(images, "reference image").split(1))
        if more_images is not None:
            refs += list(image_to_core(more_images, "extra reference image").split(1))
        area = mask_to_core(region, "region")[0] if region is not None else None
        with autograd_enabled():
            objective = subject_objective(model, refs, label=label, selection=selection, index=index, region=area,
                                          l1_weight=l1_weight)
        subject = Subject(objective, label.strip() or model.kind, model.kind)
        preview = reference_previews(refs, getattr(objective, "reference_located", None))
        return subject, ObjectiveBundle(objective, [subject.label]), image_to_comfy(preview)


class RectifIDMatchSubjects:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        def weight(j: int) -> tuple:
            return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                              "tooltip": f"How strongly subject {j} is pulled towards its reference."})

        optional: dict[str, Any] = {}
        for j in range(2, MAX_SUBJECTS + 1):
            optional[f"subject_{j}"] = (SUBJECT, {"tooltip": f"Reference subject {j}."})
            optional[f"weight_{j}"] = weight(j)
        return {"required": {"subject_1": (SUBJECT, {"tooltip": "Reference subject 1."}), "weight_1": weight(1)},
                "optional": optional}

    RETURN_TYPES = (OBJECTIVE,)
    RETURN_NAMES = ("objective",)
    OUTPUT_TOOLTIPS = ("All subjects as one objective: every iteration, the subjects found in the image are "
                       "assigned to the references by minimum total cost (Hungarian matching).",)
    FUNCTION = "match"
    CATEGORY = f"{CATEGORY}/reference"
    DESCRIPTION = "Combines several reference subjects (faces, pets, objects) for one image with several subjects."

    def match(self, subject_1: Subject, weight_1: float, **more: Any) -> tuple:
        pairs = [(subject_1, weight_1)] + [(more.get(f"subject_{j}"), more.get(f"weight_{j}", 1.0))
                                           for j in range(2, MAX_SUBJECTS + 1)]
        pairs = [(s, float(w)) for s, w in pairs if s is not None]
        for j, (s, _) in enumerate(pairs):
            if not isinstance(s, Subject):
                raise TypeError(f"subject {j + 1} must come from a 'Reference Subject' node, got {type(s).__name__}")
        subjects = [s for s, _ in pairs]
        objective = multi_subject_objective([s.objective for s in subjects], [s.kind for s in subjects],
                                            [s.label for s in subjects], [w for _, w in pairs])
        return (ObjectiveBundle(objective, [s.label for s in subjects]),)
