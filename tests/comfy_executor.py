"""A small executor for UI-format ComfyUI workflows, for running ours without ComfyUI.

It loads the pack the way ComfyUI does (the folder's __init__.py as a package),
maps every node's widgets_values onto its widget inputs in INPUT_TYPES order
(skipping the frontend's extra values: "control_after_generate" after seeds,
the upload button after LoadImage's file), follows the links, and calls each
node's FUNCTION under torch.inference_mode(), as ComfyUI's execution.py does.
Only ComfyUI's LoadImage / SaveImage / PreviewImage / PreviewAny are replaced, by
minimal stand-ins with the same inputs (importing ComfyUI's nodes.py needs its
whole runtime; `comfyui_path` finds its source for the tests that run its code).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
COMFYUI_ENV = "COMFYUI_PATH"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")  # drawn by the frontend, never sent to the server
SEED_NAMES = ("seed", "noise_seed")


def load_pack(name: str = "ComfyUI-RectifID") -> Any:
    """Import the pack folder as ComfyUI's load_custom_node does (spec from its __init__.py)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def comfyui_path() -> Path:
    """ComfyUI's source for tests that run its own code: $COMFYUI_PATH, default ../shared/comfyui beside the repo.

    Skips the calling test, saying where it looked, when it is not there.
    """
    import pytest

    path = Path(os.environ.get(COMFYUI_ENV, REPO.parent / "shared" / "comfyui")).resolve()
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


class LoadImage:
    """Stand-in for ComfyUI's LoadImage: same input, IMAGE [1,H,W,3] + MASK from a file in input_dir."""

    input_dir: Path = Path(".")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = sorted(p.name for p in cls.input_dir.iterdir()) if cls.input_dir.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    def load_image(self, image: str) -> tuple:
        with Image.open(self.input_dir / image) as im:
            rgba = ImageOps.exif_transpose(im).convert("RGBA")  # as ComfyUI's LoadImage: phone photos upright
        array = np.asarray(rgba, dtype=np.float32) / 255.0
        return torch.from_numpy(array[..., :3].copy())[None], 1.0 - torch.from_numpy(array[..., 3].copy())[None]


class SaveImage:
    """Stand-in for ComfyUI's SaveImage: keeps the images it was given."""

    saved: list[torch.Tensor] = []

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    def save_images(self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: Any = None) -> dict:
        type(self).saved.append(images)
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{i:05}_.png"} for i in range(len(images))]}}


class PreviewImage(SaveImage):
    saved: list[torch.Tensor] = []

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images: torch.Tensor, filename_prefix: str = "preview", prompt: Any = None,
                    extra_pnginfo: Any = None) -> dict:
        return super().save_images(images, filename_prefix)


class PreviewAny:
    """Stand-in for ComfyUI's core "Preview as Text" (comfy_extras/nodes_preview_any.py): any value -> ui text."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"source": ("*", {})}}

    RETURN_TYPES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True
    CATEGORY = "utils"

    def main(self, source: Any = None) -> dict:
        return {"ui": {"text": (source if isinstance(source, str) else json.dumps(source),)}}


CORE_NODES: dict[str, type] = {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage,
                               "PreviewAny": PreviewAny}


def input_kind(spec: tuple) -> str:
    """The socket/widget type of an INPUT_TYPES entry; combos (a list of choices) are "COMBO"."""
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def input_options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def all_inputs(cls: type) -> dict[str, tuple]:
    schema = cls.INPUT_TYPES()
    return {**schema.get("required", {}), **schema.get("optional", {})}


def widget_inputs(cls: type) -> list[tuple[str, tuple]]:
    """Inputs the frontend shows as widgets, in the order it serializes them."""
    return [(n, s) for n, s in all_inputs(cls).items() if input_kind(s) in WIDGET_TYPES]


def extra_widget_values(name: str, spec: tuple) -> int:
    """Values the frontend stores after a widget's own value (seed control, upload button)."""
    opts = input_options(spec)
    if input_kind(spec) == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
        return 1
    if input_kind(spec) == "COMBO" and opts.get("image_upload"):
        return 1
    return 0


def map_widgets(cls: type, values: list) -> dict[str, Any]:
    """widgets_values -> {input name: value}; raises if the counts do not line up."""
    out, i = {}, 0
    for name, spec in widget_inputs(cls):
        if i >= len(values):
            raise ValueError(f"{cls.__name__}: widgets_values has {len(values)} values, too few for widget {name!r}")
        out[name] = values[i]
        i += 1 + extra_widget_values(name, spec)
    if i != len(values):
        raise ValueError(f"{cls.__name__}: widgets_values has {len(values)} values, the widgets take {i}")
    return out


@dataclass
class Run:
    outputs: dict[int, tuple] = field(default_factory=dict)
    ui: dict[int, dict] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)


def node_classes() -> dict[str, type]:
    return {**CORE_NODES, **load_pack().NODE_CLASS_MAPPINGS}


def execute(workflow: dict | str | os.PathLike, overrides: dict[str, dict[str, Any]] | None = None) -> Run:
    """Run a UI-format workflow; `overrides` maps a node type to widget values to replace (e.g. smaller sizes)."""
    if not isinstance(workflow, dict):
        workflow = json.loads(Path(workflow).read_text(encoding="utf-8"))
    classes = node_classes()
    nodes = {n["id"]: n for n in workflow["nodes"] if n.get("mode", 0) == 0 and n["type"] not in FRONTEND_ONLY}
    links = {link[0]: link for link in workflow["links"]}
    run = Run()

    def visit(node_id: int, stack: tuple = ()) -> None:
        if node_id in run.outputs:
            return
        if node_id in stack:
            raise ValueError(f"the workflow has a cycle through node {node_id}")
        node = nodes[node_id]
        cls = classes[node["type"]]
        kwargs = map_widgets(cls, node.get("widgets_values", []))
        kwargs.update((overrides or {}).get(node["type"], {}))
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            _, src, slot, _, _, _ = links[inp["link"]]
            visit(src, stack + (node_id,))
            kwargs[inp["name"]] = run.outputs[src][slot]
        obj = cls()
        with torch.inference_mode():
            result = getattr(obj, cls.FUNCTION)(**kwargs)
        if isinstance(result, dict):
            run.ui[node_id] = result.get("ui", {})
            result = result.get("result", ())
        run.outputs[node_id] = tuple(result)
        run.order.append(node_id)

    for node_id in sorted(nodes):
        visit(node_id)
    return run
