"""Identity objectives: differentiable image -> loss callables for the solver.

Heavy dependencies (onnx, onnxruntime, transformers, scipy) are imported only
when a name that needs them is first used, so that `import
rectifid_core.objectives` works in a bare environment.

Detections (`detections`): Detections, select(..., "insightface"), top_n, nms, crop
Faces (`faces`, `face_models`, `scrfd`, `face_align`, `onnx_convert`):
    load_face_models(root, provider="auto", device="cpu", detector_backend="auto") -> FaceModels
    FaceIdentityObjective(models, reference_images, selection="insightface", ...)
Live subjects and objects, CLIP guidance (`subjects`):
    load_owlvit(path), load_dinov2(path), load_clip_vision(path)
    SubjectIdentityObjective(encoder, reference_images, detector=..., query=...)
    ClipImageObjective(encoder, reference_images)
Several subjects (`matching`):
    MultiSubjectObjective(subjects, weights=None)
"""
from importlib import import_module
from typing import Any

from .base import Objective, ObjectiveOutput, as_output

_LAZY = {
    # faces
    "FaceModels": "face_models",
    "ScrfdDetector": "scrfd",
    "DETECTOR_BACKENDS": "scrfd",
    "resolve_detector_backend": "scrfd",
    "find_antelopev2": "face_models",
    "load_face_models": "face_models",
    "resolve_providers": "face_models",
    "recognizer_input_range": "face_models",
    "ARCFACE_TEMPLATE": "face_align",
    "similarity_transform": "face_align",
    "warp_affine": "face_align",
    "align_faces": "face_align",
    "alignment_matrix": "face_align",
    "OnnxGraphModule": "onnx_convert",
    "UnsupportedOnnxOperator": "onnx_convert",
    "onnx_to_torch": "onnx_convert",
    "FACE_SELECTIONS": "faces",
    "FaceIdentityObjective": "faces",
    "average_embeddings": "common",
    "NO_FACE": "faces",
    "detect_faces": "faces",
    "locate_face": "faces",
    # detections, rankings, selections and box geometry shared by faces, objects and matching
    "Detections": "detections",
    "LocatedSubject": "detections",
    "SELECTIONS": "detections",
    "box_mask": "detections",
    "crop": "detections",
    "insightface_values": "detections",
    "iou_matrix": "detections",
    "nms": "detections",
    "select": "detections",
    "top_n": "detections",
    # subjects / objects / CLIP
    "OwlVitDetector": "subjects",
    "ImageEncoder": "subjects",
    "load_owlvit": "subjects",
    "load_dinov2": "subjects",
    "load_clip_vision": "subjects",
    "SubjectIdentityObjective": "subjects",
    "NOT_FOUND": "subjects",
    "ClipImageObjective": "subjects",
    # several subjects
    "Candidate": "detections",
    "MatchableObjective": "matching",
    "MultiSubjectObjective": "matching",
    "assign_subjects": "matching",
}

__all__ = ["Objective", "ObjectiveOutput", "as_output", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
