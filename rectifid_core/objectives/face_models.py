"""Face models from insightface's antelopev2 pack: SCRFD detector + ArcFace recognizer.

The recognizer is converted to torch so the identity loss can be
backpropagated into the image. The detector (no gradient needed: it only
places the crop) runs in onnxruntime or, converted the same way, in torch on
the recognizer's device (see `scrfd`). Only these two of the pack's five
models are loaded.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .scrfd import ScrfdDetector, resolve_detector_backend

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


def pack_folder(folder: Union[str, os.PathLike]) -> Optional[Path]:
    """The folder holding a pack's .onnx files: `folder` itself or its nested `folder/<same name>`; else None.

    The loader node lists packs with it; it accepts the same nested layout
    (`antelopev2/antelopev2/`, left by unzipping) that `candidate_folders` searches.
    """
    folder = Path(folder)
    for candidate in (folder, folder / folder.name):
        try:
            if candidate.is_dir() and any(p.suffix == ".onnx" for p in candidate.iterdir()):
                return candidate
        except OSError:  # unreadable folder or a symlink loop: not a pack
            continue
    return None


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
    _warn(f"onnxruntime execution provider {wanted} is not available (available: {', '.join(available)}); "
          "the face detector runs on CPU instead. Install onnxruntime-gpu (only, not next to onnxruntime) "
          "for CUDA, or choose provider 'cpu'")
    return [cpu]


def _warn(message: str) -> None:
    """Both channels: ComfyUI's console shows the log, tests and scripts see the warning."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def check_session_providers(requested: Sequence[str], active: Sequence[str]) -> None:
    """Warn when onnxruntime quietly dropped the GPU provider it was asked for (e.g. CUDA libraries missing)."""
    wanted = requested[0]
    if wanted != PROVIDERS["cpu"] and wanted not in active:
        _warn(f"onnxruntime was asked for {wanted} but the face detector session runs on {', '.join(active)}: "
              "the GPU provider could not start (often a CUDA / cuDNN version that does not match "
              "onnxruntime-gpu). Detection still works, only slower; install the matching onnxruntime-gpu "
              "or choose provider 'cpu' to silence this")


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
    providers: list[str] = field(default_factory=list)  # onnxruntime's, empty when the detector runs in torch
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
    detector_backend: str = "auto",
) -> FaceModels:
    """Load SCRFD and ArcFace (torch, `device`) from an antelopev2 folder.

    detector_backend: "torch" runs SCRFD converted to torch on `device`; "onnxruntime" on
    `provider`; "auto" picks torch when `device` is CUDA (or onnxruntime is not installed),
    else onnxruntime.
    """
    folder = find_antelopev2(root)
    try:
        from onnx.external_data_helper import load_external_data_for_model
    except ImportError as exc:
        raise ImportError("the face models need onnx: pip install onnx (and onnxruntime-gpu on NVIDIA or "
                          "onnxruntime elsewhere, for the detector on CPU)") from exc
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    backend = resolve_detector_backend(detector_backend, device, onnxruntime_installed=onnxruntime is not None)
    if backend == "onnxruntime" and onnxruntime is None:
        raise ImportError("the face detector backend 'onnxruntime' needs onnxruntime: pip install onnxruntime-gpu "
                          "(NVIDIA) or onnxruntime (CPU), or choose the detector backend 'torch'")

    from ..model_files import check_onnx_file
    from .onnx_convert import UnsupportedOnnxOperator, onnx_to_torch

    detector_file, recognizer_file = folder / DETECTOR_FILE, folder / RECOGNIZER_FILE
    detector_proto = check_onnx_file(detector_file)  # a damaged file must not be blamed on the GPU provider below
    load_external_data_for_model(detector_proto, str(folder))
    proto = check_onnx_file(recognizer_file)
    load_external_data_for_model(proto, str(folder))
    if backend == "torch":
        try:
            detector = ScrfdDetector.from_torch(detector_proto, device, input_size=detector_size)
        except UnsupportedOnnxOperator as exc:
            if detector_backend != "auto" or onnxruntime is None:
                raise UnsupportedOnnxOperator(f"the face detector {detector_file} cannot run in torch: {exc}. "
                                              "Choose the detector backend 'onnxruntime'") from exc
            _warn(f"the face detector {detector_file} cannot run in torch ({exc}); it runs in onnxruntime instead, "
                  "and the generated image goes to the host for it each iteration")
            backend = "onnxruntime"
    if backend == "torch":
        providers: list[str] = []
    else:
        session = _detector_session(onnxruntime, detector_file, resolve_providers(provider))
        detector = ScrfdDetector.from_session(session, detector_proto, input_size=detector_size)
        providers = list(session.get_providers())
    mean, std = recognizer_input_range(proto)
    recognizer = onnx_to_torch(proto).to(device)
    return FaceModels(
        detector=detector,
        recognizer=recognizer,
        folder=folder,
        providers=providers,
        input_mean=mean,
        input_std=std,
    )


def _detector_session(onnxruntime: Any, detector_file: Path, providers: list[str]) -> Any:
    """onnxruntime session for SCRFD; a GPU provider that fails to start falls back to CPU with a warning."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(detector_file), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types; a broken provider install must not stop the run
        if providers == [PROVIDERS["cpu"]]:
            raise ValueError(f"onnxruntime cannot run the face detector {detector_file} ({exc}); it is not the "
                             f"{DETECTOR_FILE} of the antelopev2 pack, or it is damaged: download the pack again") \
                from exc
        _warn(f"{providers[0]} failed to start ({exc}); the face detector runs on CPU. Install the onnxruntime-gpu "
              "build matching your CUDA, or choose provider 'cpu'")
        providers = [PROVIDERS["cpu"]]
        session = onnxruntime.InferenceSession(str(detector_file), sess_options=options, providers=providers)
    check_session_providers(providers, session.get_providers())
    return session
