"""Face models from insightface's antelopev2 pack: SCRFD detector + ArcFace recognizer.

The detector runs in onnxruntime (no gradient needed: it only places the
crop); the recognizer is converted to torch so the identity loss can be
backpropagated into the image. Only these two of the pack's five models are
loaded. The SCRFD output decoding is our own (anchor centres, distance
decoding, NMS) so that it does not depend on one insightface release.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .detections import Detections, nms

logger = logging.getLogger(__name__)

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
PACK_NAME = "antelopev2"
DOWNLOAD_HINT = (
    "antelopev2 is insightface's model pack (the one InstantID and PuLID use); "
    "unzip antelopev2.zip from the insightface model zoo releases so that the .onnx files sit directly in "
    "ComfyUI/models/insightface/models/antelopev2/"
)

PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDERS)


def candidate_folders(root: Union[str, os.PathLike]) -> list[Path]:
    """Folders searched for the pack, in order: the layouts InstantID/PuLID users have."""
    root = Path(root).expanduser()
    return [
        root / "models" / PACK_NAME,
        root / PACK_NAME,
        root / PACK_NAME / PACK_NAME,
        root / "models" / PACK_NAME / PACK_NAME,
        root,
    ]


def find_antelopev2(root: Union[str, os.PathLike]) -> Path:
    """Folder under `root` holding the detector and recognizer; FileNotFoundError lists every place looked at."""
    folders = candidate_folders(root)
    for folder in folders:
        if (folder / DETECTOR_FILE).is_file() and (folder / RECOGNIZER_FILE).is_file():
            return folder
    lines = []
    for folder in folders:
        missing = [f for f in (DETECTOR_FILE, RECOGNIZER_FILE) if not (folder / f).is_file()]
        lines.append(f"  {folder}  (missing: {', '.join(missing)})")
    raise FileNotFoundError(
        f"antelopev2 face models not found under {Path(root).expanduser()}.\n"
        f"Expected {DETECTOR_FILE} and {RECOGNIZER_FILE} in one of:\n" + "\n".join(lines) + f"\n{DOWNLOAD_HINT}"
    )


def resolve_providers(choice: str = "auto", available: Optional[Sequence[str]] = None) -> list[str]:
    """onnxruntime providers for `choice`; an unavailable one falls back to CPU with a warning."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    key = choice.lower().strip()
    if key not in PROVIDER_CHOICES:
        raise ValueError(f"unknown execution provider {choice!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    cpu = PROVIDERS["cpu"]
    if key == "auto":
        for name in ("cuda", "rocm", "directml", "coreml"):
            if PROVIDERS[name] in available:
                return [PROVIDERS[name], cpu]
        return [cpu]
    wanted = PROVIDERS[key]
    if wanted in available:
        return [wanted] if wanted == cpu else [wanted, cpu]
    message = (
        f"onnxruntime execution provider {wanted} is not available (available: {', '.join(available)}); "
        "the face detector runs on CPU instead"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    logger.warning(message)
    return [cpu]


class ScrfdDetector:
    """SCRFD with keypoints (9 or 15 outputs: scores, box distances, keypoint
    distances per stride) on an onnxruntime session; RGB uint8 images in."""

    def __init__(self, session: Any, input_size: int = 640, nms_threshold: float = 0.4) -> None:
        outputs = session.get_outputs()
        if len(outputs) == 9:
            self.strides, self.anchors = (8, 16, 32), 2
        elif len(outputs) == 15:
            self.strides, self.anchors = (8, 16, 32, 64, 128), 1
        else:
            raise ValueError(
                f"SCRFD model has {len(outputs)} outputs; a keypoint model with 9 or 15 outputs "
                f"({DETECTOR_FILE}) is needed to align faces"
            )
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in outputs]
        self.batched = len(outputs[0].shape) == 3
        shape = session.get_inputs()[0].shape
        fixed = shape[2:4] if len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape[2:4]) else None
        self.input_hw = (int(fixed[0]), int(fixed[1])) if fixed else (input_size, input_size)
        self.nms_threshold = nms_threshold

    def _blob(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Letterbox into the input size (top-left, aspect kept), normalise as SCRFD was trained."""
        in_h, in_w = self.input_hw
        h, w = image.shape[:2]
        scale = min(in_h / h, in_w / w)
        new_h, new_w = max(1, int(h * scale)), max(1, int(w * scale))
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        if (new_h, new_w) != (h, w):
            t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
        canvas = torch.zeros(1, 3, in_h, in_w)
        canvas[:, :, :new_h, :new_w] = t
        return ((canvas - 127.5) / 128.0).numpy(), new_h / h

    def detect(self, image: np.ndarray, threshold: float = 0.5) -> Detections:
        """Faces with score >= threshold in an RGB uint8 image [H,W,3]."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H,W,3], got shape {image.shape}")
        blob, scale = self._blob(image)
        outs = self.session.run(self.output_names, {self.input_name: blob})
        n = len(self.strides)
        in_h, in_w = blob.shape[2:]
        scores_l, boxes_l, kps_l = [], [], []
        for i, stride in enumerate(self.strides):
            score, dist, kdist = (outs[i + k * n] for k in range(3))
            if self.batched:
                score, dist, kdist = score[0], dist[0], kdist[0]
            gh, gw = in_h // stride, in_w // stride
            ys, xs = np.mgrid[:gh, :gw]
            centres = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
            centres = np.repeat(centres, self.anchors, axis=0)
            score = score.reshape(-1)
            if score.shape[0] != centres.shape[0]:
                raise ValueError(
                    f"SCRFD stride {stride} output has {score.shape[0]} scores, expected {centres.shape[0]} "
                    f"for a {in_w}x{in_h} input; is this an SCRFD model?"
                )
            keep = score >= threshold
            d = dist.reshape(-1, 4)[keep] * stride
            c = centres[keep]
            boxes_l.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            kps_l.append((np.tile(c, 5) + kdist.reshape(-1, 10)[keep] * stride).reshape(-1, 5, 2))
            scores_l.append(score[keep])
        scores = np.concatenate(scores_l).astype(np.float32)
        boxes = np.concatenate(boxes_l).astype(np.float32) / scale
        kps = np.concatenate(kps_l).astype(np.float32) / scale
        keep = nms(boxes, scores, self.nms_threshold, plus_one=True) if len(scores) else []
        return Detections(boxes[keep], scores[keep], kps[keep].reshape(-1, 5, 2), threshold)


def recognizer_input_range(model: Any) -> tuple[float, float]:
    """(mean, std) that 0..255 RGB crops are normalised with before the recognizer.

    Models converted from MXNet normalise inside the graph (a Sub and a Mul
    among the first nodes) and take raw pixels; PyTorch exports such as
    glintr100 take (x - 127.5) / 127.5. Same rule as insightface's ArcFaceONNX.
    """
    head = model.graph.node[:8]
    is_sub = any(n.op_type == "Sub" or n.name.startswith(("Sub", "_minus")) for n in head)
    is_mul = any(n.op_type == "Mul" or n.name.startswith(("Mul", "_mul")) for n in head)
    return (0.0, 1.0) if is_sub and is_mul else (127.5, 127.5)


@dataclass
class FaceModels:
    """The loaded antelopev2 pair.

    `recognizer` maps [N,3,112,112] RGB crops, normalised as (255*x - input_mean)
    / input_std, to identity embeddings (see `embed_crops`).
    """

    detector: ScrfdDetector
    recognizer: torch.nn.Module
    folder: Path
    providers: list[str] = field(default_factory=list)
    input_mean: float = 127.5
    input_std: float = 127.5

    @property
    def device(self) -> torch.device:
        return next(iter(self.recognizer.buffers())).device

    def embed_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """Embeddings of aligned crops [N,3,112,112] in 0..1 (differentiable)."""
        buf = next(iter(self.recognizer.buffers()))
        x = crops.to(device=buf.device, dtype=buf.dtype) * 255.0
        return self.recognizer((x - self.input_mean) / self.input_std)


def load_face_models(
    root: Union[str, os.PathLike],
    provider: str = "auto",
    device: Union[str, torch.device] = "cpu",
    detector_size: int = 640,
) -> FaceModels:
    """Load SCRFD (onnxruntime, `provider`) and ArcFace (torch, `device`) from an antelopev2 folder."""
    folder = find_antelopev2(root)
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            "the face models need onnx and onnxruntime: pip install onnx onnxruntime-gpu (NVIDIA) "
            "or onnx onnxruntime (CPU)"
        ) from exc
    from .onnx_convert import onnx_to_torch

    providers = resolve_providers(provider)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(folder / DETECTOR_FILE), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types; a broken provider install must not stop the run
        if providers == [PROVIDERS["cpu"]]:
            raise RuntimeError(f"could not load the face detector {folder / DETECTOR_FILE}: {exc}") from exc
        warnings.warn(f"{providers[0]} failed to start ({exc}); the face detector runs on CPU", RuntimeWarning)
        providers = [PROVIDERS["cpu"]]
        session = onnxruntime.InferenceSession(str(folder / DETECTOR_FILE), sess_options=options, providers=providers)
    detector = ScrfdDetector(session, input_size=detector_size)
    proto = onnx.load(str(folder / RECOGNIZER_FILE))
    mean, std = recognizer_input_range(proto)
    recognizer = onnx_to_torch(proto).to(device)
    return FaceModels(
        detector=detector,
        recognizer=recognizer,
        folder=folder,
        providers=list(session.get_providers()),
        input_mean=mean,
        input_std=std,
    )
