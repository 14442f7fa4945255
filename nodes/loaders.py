"""Loader nodes: the rectified flow and the discriminators, from ComfyUI's model folders."""
from __future__ import annotations

from typing import Any

import torch

from rectifid_core.devices import parse_device
from rectifid_core.flows import FLOW_TYPES, PREDICTION_TYPES, inspect_flow_folder, load_flow
from rectifid_core.objectives.face_models import PACK_NAME, PROVIDER_CHOICES
from rectifid_core.objectives.scrfd import DETECTOR_BACKENDS
from rectifid_core.pipeline import (auto_dtype, load_clip_discriminator, load_face_discriminator,
                                    load_object_discriminator)

from . import comfy_bridge as bridge
from .common import CATEGORY, DISCRIMINATOR, FLOW, autograd_enabled

DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
# what users call the flows -> the loader's flow_type; types without a friendlier name are shown as they are
_FLOW_LABELS = {"auto": "auto", "PeRFlow": "perflow", "2-rectified flow": "euler_velocity",
                "InstaFlow": "euler_velocity"}
FLOW_TYPE_CHOICES = {**{label: t for label, t in _FLOW_LABELS.items() if t in FLOW_TYPES},
                     **{t: t for t in FLOW_TYPES if t not in _FLOW_LABELS.values()}}
DEVICE_CHOICES = ("auto", "cuda", "cpu")


def resolve_device(choice: str) -> torch.device:
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {choice!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if choice == "auto":
        return bridge.torch_device()
    return parse_device(choice, "the device input")


def _device_input() -> tuple:
    return (list(DEVICE_CHOICES), {"default": "auto",
                                   "tooltip": "Where the models run. auto = ComfyUI's GPU (CPU if none)."})


class RectifIDFlowLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "flow_folder": (bridge.list_models("diffusers", prefer=("perflow", "instaflow", "rectified", "2rflow")), {
                "tooltip": "A diffusers-format rectified flow (a folder with model_index.json) in "
                           "ComfyUI/models/diffusers, e.g. PeRFlow SD1.5 (hansyan/perflow-sd15-dreamshaper), "
                           "InstaFlow or 2-rectified flow."}),
            "flow_type": (list(FLOW_TYPE_CHOICES), {
                "default": "auto",
                "tooltip": "auto reads the folder's scheduler and pipeline class. PeRFlow = piecewise rectified "
                           "flow (K straight windows); 2-rectified flow and InstaFlow take one Euler step per "
                           "window; flux / sd3 are FLUX.1 and SD3.x folders (Euler steps on their scheduler's "
                           "sigmas)."}),
            "prediction_type": (list(PREDICTION_TYPES), {
                "default": "auto",
                "tooltip": "PeRFlow parameterisation; auto picks it from the scheduler config "
                           "(diff_eps for SD1.5, ddim_eps for SDXL, velocity for SD2.1). Keep auto (or velocity) for "
                           "2-rectified flow and InstaFlow: they always predict velocity."}),
            "dtype": (list(DTYPE_CHOICES), {
                "default": "auto",
                "tooltip": "Weight precision. auto = fp16 on a GPU (bf16 for FLUX.1 and SD3.x, as their model cards "
                           "load them), fp32 on the CPU. fp32 doubles VRAM but avoids fp16 overflow on some "
                           "checkpoints."}),
            "device": _device_input(),
        }}

    RETURN_TYPES = (FLOW,)
    RETURN_NAMES = ("flow",)
    OUTPUT_TOOLTIPS = ("The loaded few-step rectified flow for the RectifID sampler.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = ("Loads a rectified flow (PeRFlow, InstaFlow, 2-rectified flow, FLUX.1, SD3.x) from a local diffusers "
                   "folder.")

    def load(self, flow_folder: str, flow_type: str, prediction_type: str, dtype: str, device: str) -> tuple:
        if flow_type not in FLOW_TYPE_CHOICES:
            raise ValueError(f"unknown flow type {flow_type!r}; choose one of {', '.join(FLOW_TYPE_CHOICES)}")
        path = bridge.resolve_model("diffusers", flow_folder)
        dev = resolve_device(device)
        if dtype == "auto":
            kind = inspect_flow_folder(path, flow_type=FLOW_TYPE_CHOICES[flow_type], prediction_type=prediction_type)
            dtype = auto_dtype(dev, kind.flow_type)
        with autograd_enabled():
            flow = load_flow(path, flow_type=FLOW_TYPE_CHOICES[flow_type], prediction_type=prediction_type,
                             dtype=dtype, device=dev)
        return (flow,)


class RectifIDFaceModelLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model_pack": (bridge.list_models("insightface", prefer=(PACK_NAME,)), {
                "tooltip": "insightface model pack in ComfyUI/models/insightface/models/ (antelopev2, as used by "
                           "InstantID and PuLID): scrfd_10g_bnkps.onnx detects faces, glintr100.onnx (ArcFace) "
                           "judges identity."}),
            "provider": (list(PROVIDER_CHOICES), {
                "default": "auto",
                "tooltip": "onnxruntime execution provider for the face detector when it runs in onnxruntime "
                           "(see 'detector'). auto = the first GPU provider onnxruntime offers, else CPU. ArcFace "
                           "runs in torch on 'device'."}),
            "device": _device_input(),
            "detector": (list(DETECTOR_BACKENDS), {
                "default": "auto",
                "tooltip": "Where the face detector (SCRFD) runs. torch: converted to torch on 'device', so the "
                           "generated image never leaves the GPU during guidance. onnxruntime: on 'provider' (faster "
                           "on the CPU). auto = torch when 'device' is CUDA, else onnxruntime."}),
        }}

    RETURN_TYPES = (DISCRIMINATOR,)
    RETURN_NAMES = ("face_model",)
    OUTPUT_TOOLTIPS = ("Face detector + ArcFace identity model.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Loads the antelopev2 face detector (SCRFD) and face recognizer (ArcFace) for face identity."

    def load(self, model_pack: str, provider: str, device: str, detector: str = "auto") -> tuple:
        path = bridge.resolve_model("insightface", model_pack)
        dev = resolve_device(device)
        with autograd_enabled():
            return (load_face_discriminator(path, provider=provider, device=dev, detector_backend=detector),)


class RectifIDObjectModelLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "dinov2": (bridge.list_models("dinov2", prefer=("dinov2",)), {
                "tooltip": "transformers DINOv2 folder in ComfyUI/models/dinov2 (e.g. facebook/dinov2-base): "
                           "the feature that judges an object's identity."}),
            "owlvit": (bridge.list_models("owlvit", prefer=("owlvit", "owlv2")), {
                "tooltip": "transformers OWL-ViT folder in ComfyUI/models/owlvit (e.g. google/owlvit-base-patch32): "
                           "finds the object in the reference (by text label) and in the generated image."}),
            "device": _device_input(),
        }}

    RETURN_TYPES = (DISCRIMINATOR,)
    RETURN_NAMES = ("object_model",)
    OUTPUT_TOOLTIPS = ("OWL-ViT detector + DINOv2 identity feature for objects, pets and other subjects.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Loads DINOv2 (identity feature) and OWL-ViT (open-vocabulary detector) for objects and animals."

    def load(self, dinov2: str, owlvit: str, device: str) -> tuple:
        dino_path = bridge.resolve_model("dinov2", dinov2)
        owl_path = bridge.resolve_model("owlvit", owlvit)
        dev = resolve_device(device)
        with autograd_enabled():
            return (load_object_discriminator(dino_path, owl_path, device=dev),)


class RectifIDClipModelLoader:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "clip_vision": (bridge.list_models("clip_vision", prefer=("clip",)), {
                "tooltip": "transformers CLIP folder (config.json + weights, e.g. openai/clip-vit-large-patch14) "
                           "in ComfyUI/models/clip_vision: whole-image similarity, for styles and scenes."}),
            "device": _device_input(),
        }}

    RETURN_TYPES = (DISCRIMINATOR,)
    RETURN_NAMES = ("clip_model",)
    OUTPUT_TOOLTIPS = ("CLIP image encoder for whole-image similarity.",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Loads a CLIP vision encoder; the objective compares whole images (no detection)."

    def load(self, clip_vision: str, device: str) -> tuple:
        path = bridge.resolve_model("clip_vision", clip_vision)
        dev = resolve_device(device)
        with autograd_enabled():
            return (load_clip_discriminator(path, device=dev),)
