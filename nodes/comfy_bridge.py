"""The only place the pack touches ComfyUI (folder_paths, model_management, ProgressBar).

Every import of ComfyUI happens lazily inside a function, with a plain fallback,
so that the pack imports and its tests run without ComfyUI: model folders then
come from RECTIFID_MODELS_DIR (default ./models), interruption is a module
flag (`request_interrupt`), and progress is kept in `last_progress`.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import torch

from rectifid_core.objectives.face_models import DETECTOR_FILE, pack_folder

MODELS_ENV = "RECTIFID_MODELS_DIR"

# folder name -> (what lives there, what a user puts there); used in listings and errors
MODEL_FOLDERS: dict[str, str] = {
    "diffusers": "diffusers-format rectified-flow folders (model_index.json), e.g. perflow-sd15-dreamshaper",
    "insightface": "insightface model packs under models/, e.g. models/antelopev2/*.onnx",
    "dinov2": "transformers DINOv2 folders (config.json + weights), e.g. dinov2-base",
    "owlvit": "transformers OWL-ViT folders (config.json + weights), e.g. owlvit-base-patch32",
    "clip_vision": "transformers CLIP folders (config.json + weights), e.g. clip-vit-large-patch14",
}


class ProcessingInterrupted(RuntimeError):
    """Raised by the fallback interrupt check (ComfyUI raises its own InterruptProcessingException)."""


_interrupt_lock = threading.Lock()
_interrupt_flag = False
last_progress: dict[str, Any] = {}


def _comfy_module(name: str) -> Any | None:
    """Import a ComfyUI module if we run inside ComfyUI, else None."""
    try:
        if name == "folder_paths":
            import folder_paths
            return folder_paths
        if name == "model_management":
            import comfy.model_management
            return comfy.model_management
        if name == "utils":
            import comfy.utils
            return comfy.utils
        if name == "samplers":
            import comfy.samplers
            return comfy.samplers
        if name == "cli_args":
            import comfy.cli_args
            return comfy.cli_args
    except ImportError:
        return None
    raise ValueError(f"unknown ComfyUI module {name!r}")


def register_model_folders() -> None:
    """Declare our folders so extra_model_paths.yaml entries with these names are honoured.

    Paths from the yaml are loaded before custom nodes, so we only append the default.
    """
    fp = _comfy_module("folder_paths")
    if fp is None:
        return
    for name in MODEL_FOLDERS:
        default = os.path.join(fp.models_dir, name)
        if name in fp.folder_names_and_paths:
            if default not in fp.folder_names_and_paths[name][0]:
                fp.folder_names_and_paths[name][0].append(default)
        else:
            fp.folder_names_and_paths[name] = ([default], set())


def model_roots(folder: str) -> list[str]:
    """Every directory searched for `folder` (ComfyUI's list, or $RECTIFID_MODELS_DIR/<folder>)."""
    if folder not in MODEL_FOLDERS:
        raise ValueError(f"unknown model folder {folder!r}; known: {', '.join(MODEL_FOLDERS)}")
    fp = _comfy_module("folder_paths")
    if fp is not None:
        try:
            return list(fp.get_folder_paths(folder))
        except KeyError:
            return [os.path.join(fp.models_dir, folder)]
    return [os.path.join(os.environ.get(MODELS_ENV, "models"), folder)]


def _model_dirs(folder: str) -> dict[str, str]:
    """name shown in the UI -> absolute path, for every model directory under the roots.

    Symlinks are followed (users link model folders in), but each real folder is
    visited once: a symlink loop neither hangs ComfyUI's start-up nor lists a
    model twice.
    """
    found: dict[str, str] = {}
    seen: set[str] = set()
    for root in model_roots(folder):
        if not os.path.isdir(root):
            continue
        if folder == "insightface":  # the layouts face_models.candidate_folders searches
            packs = [os.path.join(base, name) for base in (os.path.join(root, "models"), root) if os.path.isdir(base)
                     for name in sorted(os.listdir(base)) if not (base == root and name == "models")]
            if os.path.isfile(os.path.join(root, DETECTOR_FILE)):  # files directly in the root (not inswapper's)
                packs.append(root)
            for path in map(pack_folder, packs):
                if path is not None and os.path.realpath(path) not in seen:
                    seen.add(os.path.realpath(path))
                    found.setdefault(path.name, str(path))
            continue
        marker = "model_index.json" if folder == "diffusers" else "config.json"
        for dirpath, dirnames, files in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames.clear()
                continue
            seen.add(real)
            dirnames.sort()
            if marker in files:
                found.setdefault(os.path.relpath(dirpath, root).replace(os.sep, "/"), dirpath)
                dirnames.clear()
    return found


def list_models(folder: str, prefer: tuple[str, ...] = ()) -> list[str]:
    """Model names for a combo; never empty (ComfyUI needs a value), names containing `prefer` first."""
    names = sorted(_model_dirs(folder), key=lambda n: (not any(p in n.lower() for p in prefer), n))
    return names or [f"(no models in models/{folder})"]


def resolve_model(folder: str, name: str) -> str:
    """Absolute path of a model chosen in a combo, or a FileNotFoundError that says where we looked."""
    found = _model_dirs(folder)
    if name in found:
        return found[name]
    roots = ", ".join(model_roots(folder)) or "(none)"
    layout = MODEL_FOLDERS[folder]
    what = f"no model is installed in the {folder!r} model folders" if not found else \
        f"model {name!r} not found in the {folder!r} model folders"
    raise FileNotFoundError(
        f"{what} ({roots}); expected {layout}. "
        f"Available: {', '.join(sorted(found)) or 'none'}. Put the model there or add a path for "
        f"'{folder}' in extra_model_paths.yaml, then refresh."
    )


def torch_device() -> torch.device:
    mm = _comfy_module("model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_vram_for_sampling(device: torch.device, required_bytes: int) -> None:
    """Ask ComfyUI to make `required_bytes` (plus its reserve) free on `device` before we sample.

    Our models live outside ComfyUI's model manager, so it cannot count what we need;
    `free_memory` unloads its least recently used models only as far as that amount
    needs (partially, where it can), so a user's other models stay loaded.
    """
    mm = _comfy_module("model_management")
    if mm is None or device.type == "cpu":
        return
    mm.free_memory(int(required_bytes) + int(mm.extra_reserved_memory()), device)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` as ComfyUI's model manager counts them (its caches included), None on the CPU."""
    if device.type == "cpu":
        return None
    mm = _comfy_module("model_management")
    if mm is not None:
        return int(mm.get_free_memory(device))
    return None


def request_interrupt(value: bool = True) -> None:
    """Fallback cancel button (ComfyUI's own flag is used when running inside ComfyUI)."""
    global _interrupt_flag
    with _interrupt_lock:
        _interrupt_flag = value


def check_interrupt() -> None:
    """Raise if the user pressed cancel; consumes the flag like ComfyUI does."""
    global _interrupt_flag
    mm = _comfy_module("model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
        return
    with _interrupt_lock:
        if _interrupt_flag:
            _interrupt_flag = False
            raise ProcessingInterrupted("processing interrupted by the user")


def scheduler_names() -> list[str]:
    """ComfyUI's sigma schedulers (outside ComfyUI, where nothing can sample, the two few-step flows use)."""
    samplers = _comfy_module("samplers")
    return list(samplers.SCHEDULER_NAMES) if samplers is not None else ["simple", "normal"]


def previews_enabled() -> bool:
    args = _comfy_module("cli_args")
    if args is None:
        return True
    return args.args.preview_method != args.LatentPreviewMethod.NoPreviews


def preview_max_size() -> int:
    args = _comfy_module("cli_args")
    return int(getattr(args.args, "preview_size", 512)) if args is not None else 512


class Progress:
    """ComfyUI's progress bar (with optional PIL previews) or a plain record of the last update."""

    def __init__(self, total: int):
        utils = _comfy_module("utils")
        self._bar = utils.ProgressBar(total) if utils is not None else None
        self.total = total

    def update(self, value: int, preview: Any | None = None) -> None:
        payload = ("JPEG", preview, preview_max_size()) if preview is not None else None
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, payload)
        last_progress.update(value=value, total=self.total, preview=preview)
