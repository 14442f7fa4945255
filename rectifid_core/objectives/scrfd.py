"""SCRFD face detection: letterbox, network, anchor decoding, NMS.

The network runs either in onnxruntime or, converted by `onnx_convert`, in torch on the
recognizer's device, so that a guidance iteration on the GPU never copies the generated image
to the host. Both backends share everything but the network call: the letterbox and the
decoding are torch code that runs where the network's outputs are (onnxruntime's come back as
CPU tensors). NMS runs on the host, after the threshold: by then only the candidates above it
are left (a few dozen floats), and the boxes end up in host `Detections` anyway, since
selection and alignment read them there. The decoding is our own (anchor centres, distance
decoding) so that it does not depend on one insightface release.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..images import to_pixel_levels
from .detections import Detections, nms

# "auto": torch when the recognizer runs on CUDA (no iteration leaves the GPU), else onnxruntime,
# which is faster on the CPU (rectifid_core/benchmark/detector.py).
DETECTOR_BACKENDS = ("auto", "torch", "onnxruntime")
ImageInput = Union[np.ndarray, torch.Tensor]
Network = Callable[[torch.Tensor], Sequence[torch.Tensor]]  # letterboxed input -> raw outputs, as tensors


def resolve_detector_backend(choice: str, device: Union[str, torch.device], onnxruntime_installed: bool = True) -> str:
    """'torch' or 'onnxruntime' for a backend choice and the recognizer's device."""
    if choice not in DETECTOR_BACKENDS:
        raise ValueError(f"unknown detector backend {choice!r}; choose one of {', '.join(DETECTOR_BACKENDS)}")
    if choice != "auto":
        return choice
    return "torch" if torch.device(device).type == "cuda" or not onnxruntime_installed else "onnxruntime"


def scrfd_layout(num_outputs: int) -> tuple[tuple[int, ...], int]:
    """(strides, anchors per cell) of a keypoint SCRFD from its output count."""
    if num_outputs == 9:
        return (8, 16, 32), 2
    if num_outputs == 15:
        return (8, 16, 32, 64, 128), 1
    raise ValueError(f"SCRFD model has {num_outputs} outputs; a keypoint model with 9 or 15 outputs "
                     "(scrfd_10g_bnkps.onnx) is needed to align faces")


def letterbox(pixels: torch.Tensor, input_hw: tuple[int, int]) -> tuple[torch.Tensor, float]:
    """[3,H,W] 0..255 -> the [1,3,h,w] network input: scaled into the top-left corner (aspect kept),
    zero-padded, normalised as SCRFD was trained; and the scale applied."""
    in_h, in_w = input_hw
    h, w = pixels.shape[-2:]
    scale = min(in_h / h, in_w / w)
    new_h, new_w = max(1, int(h * scale)), max(1, int(w * scale))
    t = pixels[None].float()
    if (new_h, new_w) != (h, w):
        t = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False)
    canvas = torch.zeros(1, 3, in_h, in_w, device=pixels.device)
    canvas[:, :, :new_h, :new_w] = t
    return (canvas - 127.5) / 128.0, new_h / h


def decode(outputs: Sequence[torch.Tensor], strides: Sequence[int], anchors: int, input_hw: tuple[int, int],
           threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw SCRFD outputs (scores, box distances, keypoint distances per stride, in that order)
    -> scores [M], boxes [M,4] and keypoints [M,5,2] in input pixels of the anchors scoring at
    least `threshold`, on the outputs' device."""
    n = len(strides)
    in_h, in_w = input_hw
    scores_l, boxes_l, kps_l = [], [], []
    for i, stride in enumerate(strides):
        score, dist, kdist = (outputs[i + k * n] for k in range(3))
        gh, gw = in_h // stride, in_w // stride
        ys, xs = torch.meshgrid(torch.arange(gh, device=score.device), torch.arange(gw, device=score.device),
                                indexing="ij")
        centres = (torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride).repeat_interleave(anchors, dim=0)
        score = score.reshape(-1)
        if score.shape[0] != centres.shape[0]:
            raise ValueError(f"SCRFD stride {stride} output has {score.shape[0]} scores, expected {centres.shape[0]} "
                             f"for a {in_w}x{in_h} input; is this an SCRFD model?")
        keep = score >= threshold
        c = centres[keep]
        d = dist.reshape(-1, 4)[keep] * stride
        boxes_l.append(torch.cat([c - d[:, :2], c + d[:, 2:]], dim=1))
        kps_l.append((c.repeat(1, 5) + kdist.reshape(-1, 10)[keep] * stride).reshape(-1, 5, 2))
        scores_l.append(score[keep])
    return torch.cat(scores_l), torch.cat(boxes_l), torch.cat(kps_l)


def _input_hw(model: Any, input_size: int) -> tuple[int, int]:
    """The graph's fixed input height and width, else (input_size, input_size)."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]
    fixed = len(dims) == 4 and dims[2] > 0 and dims[3] > 0
    return (dims[2], dims[3]) if fixed else (input_size, input_size)


class ScrfdDetector:
    """SCRFD with keypoints on either backend; `detect` takes an RGB uint8 image [H,W,3] or a
    [3,H,W] tensor in 0..1 (quantised to 8 bits the same way, on its device when the backend
    is torch)."""

    def __init__(self, network: Network, num_outputs: int, input_hw: tuple[int, int], device: torch.device,
                 backend: str, description: str, nms_threshold: float = 0.4) -> None:
        self.strides, self.anchors = scrfd_layout(num_outputs)
        self.network, self.input_hw, self.device = network, input_hw, device
        self.backend, self.description, self.nms_threshold = backend, description, nms_threshold

    @classmethod
    def from_session(cls, session: Any, model: Any, input_size: int = 640) -> "ScrfdDetector":
        """onnxruntime: the letterboxed input goes to the host, the outputs come back as CPU tensors."""
        names = [o.name for o in session.get_outputs()]
        feed = session.get_inputs()[0].name

        def network(blob: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(o) for o in session.run(names, {feed: blob.cpu().numpy()})]

        return cls(network, len(names), _input_hw(model, input_size), torch.device("cpu"), "onnxruntime",
                   f"SCRFD on onnxruntime ({', '.join(session.get_providers())})")

    @classmethod
    def from_torch(cls, model: Any, device: Union[str, torch.device], input_size: int = 640) -> "ScrfdDetector":
        """The graph converted to torch on `device`: image, network and decoding stay there."""
        from .onnx_convert import onnx_to_torch

        device = torch.device(device)
        net = onnx_to_torch(model).to(device)

        def network(blob: torch.Tensor) -> Sequence[torch.Tensor]:
            with torch.no_grad():
                return net(blob)

        return cls(network, len(net.output_names), _input_hw(model, input_size), device, "torch",
                   f"SCRFD in torch on {device}")

    def _pixels(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return to_pixel_levels(image).to(self.device)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H,W,3], got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(self.device)

    def raw_outputs(self, image: ImageInput) -> tuple[list[torch.Tensor], float]:
        """The network's outputs for an image (on `device`) and the letterbox scale."""
        blob, scale = letterbox(self._pixels(image), self.input_hw)
        return list(self.network(blob)), scale

    def detect(self, image: ImageInput, threshold: float = 0.5) -> Detections:
        """Faces with score >= threshold, in the image's pixels, best score first."""
        outputs, scale = self.raw_outputs(image)
        found = decode(outputs, self.strides, self.anchors, self.input_hw, threshold)
        scores, boxes, kps = (t.cpu().numpy() for t in found)  # the one host copy: the candidates above threshold
        boxes, kps = boxes / np.float32(scale), kps / np.float32(scale)
        keep = nms(boxes, scores, self.nms_threshold, plus_one=True) if len(scores) else []
        return Detections(boxes[keep], scores[keep], kps[keep].reshape(-1, 5, 2), threshold)


def image_hw(image: ImageInput) -> tuple[int, int]:
    """(H, W) of a detector input: [H,W,3] array or [3,H,W] tensor."""
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else tuple(image.shape[:2])
