"""Test helpers for the pack: load it as ComfyUI does, find ComfyUI's source, build tiny models in its layout.

Workflows run on ComfyUI's own engine through tests/comfyui_runtime.py.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMFYUI_ENV = "COMFYUI_PATH"


def load_pack(name: str = "ComfyUI-RectifID") -> Any:
    """Import the pack folder as ComfyUI's load_custom_node does (spec from its __init__.py)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def comfyui_location() -> Path:
    """Where ComfyUI's source should be: $COMFYUI_PATH, default ../shared/comfyui beside the repo."""
    return Path(os.environ.get(COMFYUI_ENV, REPO.parent / "shared" / "comfyui")).resolve()


def comfyui_path() -> Path:
    """ComfyUI's source for tests that run its own code; skips the calling test, saying where it looked, when
    it is not there."""
    import pytest

    path = comfyui_location()
    if not (path / "comfy" / "model_management.py").is_file():
        pytest.skip(f"ComfyUI source not found at {path}: set {COMFYUI_ENV} to a ComfyUI 0.8.0 checkout "
                    f"(and pip install -e '.[test]' for what its modules import)")
    return path


# names the saved workflows use, so tests run them without renaming any model
MODEL_NAMES = {"diffusers": "perflow-sd15-dreamshaper", "insightface": "antelopev2", "dinov2": "dinov2-base",
               "owlvit": "owlvit-base-patch32", "clip_vision": "clip-vit-large-patch14"}
_BUILT: dict[str, Path] = {}


def tiny_models_dir(*kinds: str) -> Path:
    """A models folder (ComfyUI layout) holding tiny real-format models of `kinds`, built once per session."""
    if "root" not in _BUILT:
        _BUILT["root"] = Path(tempfile.mkdtemp(prefix="rectifid-models-"))
        atexit.register(shutil.rmtree, _BUILT["root"], True)
    root = _BUILT["root"]
    for kind in kinds:
        if kind in _BUILT:
            continue
        target = root / kind / MODEL_NAMES[kind]
        if kind == "diffusers":
            import tiny_diffusers
            tiny_diffusers.build_tiny_sd15(target)
        elif kind == "insightface":
            import tiny_faces
            tiny_faces.build_antelopev2(root / "insightface")
        else:
            import tiny_transformers
            builder = {"dinov2": tiny_transformers.build_dinov2, "owlvit": tiny_transformers.build_owlvit,
                       "clip_vision": tiny_transformers.build_clip_vision}[kind]
            builder(target)
        _BUILT[kind] = target
    return root
