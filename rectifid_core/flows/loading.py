"""Load a rectified flow from a local diffusers-format folder, detecting which kind it is.

Each component is loaded on its own with `from_pretrained(..., local_files_only=True)`
rather than through a pipeline class: PeRFlow folders name a `PeRFlowScheduler`
that diffusers does not ship, and InstaFlow / 2-rectified-flow folders name a
`RectifiedFlowPipeline` that lives outside diffusers. The scheduler config is
only read for its betas, `prediction_type` and `num_time_windows`.

Detection (each step can be overridden by the caller):
- flow type: model_index.json `_class_name` FluxPipeline -> "flux", StableDiffusion3Pipeline
  -> "sd3" (transformer folders, flow_matching.py); RectifiedFlowPipeline / InstaFlowPipeline
  -> "euler_velocity"; scheduler `_class_name` PeRFlowScheduler -> "perflow"; otherwise
  the folder name ("perflow" -> perflow; "instaflow", "rectified_flow", "2rflow" ->
  euler_velocity); otherwise an error asking for an explicit flow type.
- PeRFlow prediction type: the scheduler's own value when it is a PeRFlow one
  (diff_eps / ddim_eps / velocity); "v_prediction" -> velocity (SD2.1); anything else
  (the public SD1.5 PeRFlow folders carry SD's "epsilon") -> ddim_eps for SDXL, diff_eps
  otherwise, which is how PeRFlow's own scripts sample those checkpoints.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model_files import check_weight_files, read_json_file
from .base import RectifiedFlow
from .euler import EulerVelocityFlow
from .flow_matching import FlowMatchingComponents, check_scheduler_config
from .flux import DEV_STEPS, SCHNELL_STEPS, FluxFlow
from .perflow import PeRFlow
from .sd3 import TURBO_STEPS, SD3Flow
from .schedule import PERFLOW_PREDICTIONS, perflow_timesteps
from .stable_diffusion import StableDiffusionComponents, vae_dtype

FLOW_TYPES = ("auto", "perflow", "euler_velocity", "flux", "sd3")
PREDICTION_TYPES = ("auto",) + PERFLOW_PREDICTIONS
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_EULER_PIPELINES = ("RectifiedFlowPipeline", "InstaFlowPipeline")
_SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", *_EULER_PIPELINES)
_EULER_NAME_HINTS = ("instaflow", "rectified_flow", "rectified-flow", "2rflow", "2_rflow", "2-rflow")
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                 "transformer": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model",
                 "text_encoder_3": "model"}
# flow-matching transformer pipelines -> our flow type
_TRANSFORMER_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
_TRANSFORMER_CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}
TRANSFORMER_FLOW_TYPES = tuple(_TRANSFORMER_CLASSES)
_PARTS = {
    "model_index.json": "the pipeline index (model_index.json) naming the components",
    "unet": "the UNet2DConditionModel (config.json + diffusion_pytorch_model*.safetensors)",
    "vae": "the AutoencoderKL (config.json + diffusion_pytorch_model*.safetensors)",
    "text_encoder": "the CLIP text encoder (config.json + model*.safetensors)",
    "tokenizer": "the CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json)",
    "scheduler": "the scheduler config (scheduler_config.json)",
    "text_encoder_2": "SDXL's second CLIP text encoder with projection (config.json + model*.safetensors)",
    "tokenizer_2": "SDXL's second CLIP tokenizer",
}
_TRANSFORMER_PARTS = {
    "flux": {"transformer": "the FluxTransformer2DModel (config.json + diffusion_pytorch_model*.safetensors)",
             "vae": "the AutoencoderKL (config.json + diffusion_pytorch_model*.safetensors)",
             "text_encoder": "the CLIP-L text encoder (config.json + model*.safetensors)",
             "tokenizer": "the CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json)",
             "text_encoder_2": "the T5 encoder (config.json + model*.safetensors)",
             "tokenizer_2": "the T5 tokenizer (tokenizer.json or spiece.model)",
             "scheduler": "the FlowMatchEulerDiscreteScheduler config (scheduler_config.json)"},
    "sd3": {"transformer": "the SD3Transformer2DModel (config.json + diffusion_pytorch_model*.safetensors)",
            "vae": "the AutoencoderKL (config.json + diffusion_pytorch_model*.safetensors)",
            "text_encoder": "the CLIP-L text encoder with projection (config.json + model*.safetensors)",
            "tokenizer": "the CLIP-L tokenizer (vocab.json, merges.txt, tokenizer_config.json)",
            "text_encoder_2": "the CLIP-G text encoder with projection (config.json + model*.safetensors)",
            "tokenizer_2": "the CLIP-G tokenizer (vocab.json, merges.txt, tokenizer_config.json)",
            "text_encoder_3": "the T5 encoder (config.json + model*.safetensors)",
            "tokenizer_3": "the T5 tokenizer (tokenizer.json or spiece.model)",
            "scheduler": "the FlowMatchEulerDiscreteScheduler config (scheduler_config.json)"},
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")

logger = logging.getLogger(__name__)


@dataclass
class FlowFolderInfo:
    """What `inspect_flow_folder` found, and why (shown to the user by the loader node)."""

    path: Path
    architecture: str  # "sd", "sdxl", "flux" or "sd3"
    flow_type: str  # "perflow", "euler_velocity", "flux" or "sd3"
    prediction_type: str | None  # PeRFlow only
    num_windows: int
    pipeline_class: str | None
    scheduler_class: str | None
    scheduler_config: dict[str, Any] = field(repr=False, default_factory=dict)
    force_zeros_for_empty_prompt: bool = False
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        pred = f", prediction {self.prediction_type}" if self.prediction_type else ""
        lines = [f"{self.path.name}: {self.flow_type} ({self.architecture}{pred}, {self.num_windows} windows)"]
        return "\n".join(lines + [f"- {r}" for r in self.reasons])


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_file(path, f"{path.parent.name}/{path.name}")


def _check_architecture(root: Path, pipeline_class: str | None, explicit: bool) -> None:
    """Refuse SD pipelines this loader cannot sample (inpainting, SD3, ...) before any weights are read.

    An explicit flow type skips the pipeline-class test (custom class names), never the UNet test.
    """
    if not explicit and pipeline_class is not None and pipeline_class not in _SUPPORTED_PIPELINES and not any(
            hint in pipeline_class.lower() for hint in ("perflow", "rectifiedflow", "instaflow")):
        raise ValueError(
            f"{root / 'model_index.json'} names {pipeline_class}, a pipeline this loader does not support: it loads "
            f"text-to-image SD1.x / SD2.x / SDXL rectified flows ({', '.join(_SUPPORTED_PIPELINES)}). Choose a "
            f"PeRFlow, InstaFlow or 2-rectified-flow folder, or set the flow type if this one really is one.")
    unet = _read_json(root / "unet" / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{root / 'unet' / 'config.json'} describes a {unet.get('_class_name')}, not the "
                         "UNet2DConditionModel of a Stable Diffusion rectified flow; choose another folder")
    channels = int(vae.get("latent_channels", 4))
    if int(unet.get("in_channels", channels)) != channels:
        raise ValueError(
            f"{root / 'unet' / 'config.json'} takes {unet.get('in_channels')} input channels but the VAE makes "
            f"{channels}-channel latents: an inpainting or image-conditioned UNet, which RectifID cannot sample; "
            "choose a text-to-image flow folder")


def _check_parts(root: Path, sdxl: bool) -> None:
    needed = {"model_index.json": root / "model_index.json",
              "unet": root / "unet" / "config.json", "vae": root / "vae" / "config.json",
              "text_encoder": root / "text_encoder" / "config.json", "tokenizer": root / "tokenizer",
              "scheduler": root / "scheduler" / "scheduler_config.json"}
    if sdxl:
        needed.update(text_encoder_2=root / "text_encoder_2" / "config.json", tokenizer_2=root / "tokenizer_2")
    missing = [f"{path} ({_PARTS[part]})" for part, path in needed.items() if not path.exists()]
    missing += [f"{root / part} has no weights ({_PARTS[part]})" for part, stem in _WEIGHT_STEMS.items()
                if part in needed and (root / part).is_dir() and not _weight_files(root / part, stem)]
    missing += [f"{root / part} has neither tokenizer.json nor vocab.json ({_PARTS[part]})"
                for part in ("tokenizer", "tokenizer_2") if part in needed and (root / part).is_dir()
                and not any((root / part / name).exists() for name in ("tokenizer.json", "vocab.json"))]
    if missing:
        raise FileNotFoundError(f"{root} is not a complete diffusers folder; missing:\n  " + "\n  ".join(missing))


def _weight_files(folder: Path, stem: str) -> list[str]:
    pattern = re.compile(rf"^(?:pytorch_)?{re.escape(stem)}(\.[\w-]+)?\.(safetensors|bin)(\.index(\.[\w-]+)?\.json)?$")
    return sorted(p.name for p in folder.iterdir() if pattern.match(p.name))


def _file_variant(name: str) -> str | None:
    """'model.fp16.safetensors' -> 'fp16', 'model.safetensors.index.fp16.json' -> 'fp16', plain names -> None."""
    parts = name.split(".")
    if parts[-1] == "json":
        return parts[-2] if parts[-2] != "index" else None
    return parts[1] if len(parts) == 3 else None


def _variant(folder: Path, stem: str, dtype: torch.dtype) -> str | None:
    """The weights variant to load (e.g. PeRFlow SDXL ships only `*.v0-fix.safetensors`)."""
    variants = {_file_variant(name) for name in _weight_files(folder, stem)}
    if None in variants or not variants:
        return None
    preferred = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    return preferred if preferred in variants else sorted(variants)[0]


def _detect_flow_type(root: Path, pipeline_class: str | None, scheduler_class: str | None,
                      reasons: list[str]) -> str:
    if pipeline_class in _EULER_PIPELINES:
        reasons.append(f"model_index.json names {pipeline_class} (InstaFlow / 2-rectified flow): Euler velocity")
        return "euler_velocity"
    if scheduler_class == "PeRFlowScheduler":
        reasons.append("the scheduler is PeRFlowScheduler: PeRFlow")
        return "perflow"
    name = root.name.lower()
    if "perflow" in name:
        reasons.append(f"folder name {root.name!r} contains 'perflow': PeRFlow")
        return "perflow"
    if any(hint in name for hint in _EULER_NAME_HINTS):
        reasons.append(f"folder name {root.name!r} suggests InstaFlow / 2-rectified flow: Euler velocity")
        return "euler_velocity"
    raise ValueError(
        f"cannot tell which rectified flow {root} holds (pipeline {pipeline_class}, scheduler {scheduler_class}); "
        f"choose the flow type explicitly: one of {', '.join(FLOW_TYPES[1:])}")


def _detect_prediction(scheduler_pred: str | None, sdxl: bool, reasons: list[str]) -> str:
    if scheduler_pred in PERFLOW_PREDICTIONS:
        reasons.append(f"scheduler prediction_type {scheduler_pred}")
        return scheduler_pred
    if scheduler_pred == "v_prediction":
        reasons.append("scheduler prediction_type v_prediction (SD2.1 PeRFlow): velocity")
        return "velocity"
    chosen = "ddim_eps" if sdxl else "diff_eps"
    reasons.append(f"scheduler prediction_type {scheduler_pred!r} is not a PeRFlow one; "
                   f"{'SDXL' if sdxl else 'SD1.x'} PeRFlow checkpoints use {chosen}")
    return chosen


def inspect_flow_folder(path: str | Path, *, flow_type: str = "auto",
                        prediction_type: str = "auto") -> FlowFolderInfo:
    """Detect architecture, flow type, prediction type and window count without loading weights.

    Raises FileNotFoundError naming every missing part, ValueError when detection fails.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected a diffusers-format model folder "
                                f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    if flow_type not in FLOW_TYPES:
        raise ValueError(f"unknown flow_type {flow_type!r}; expected one of {', '.join(FLOW_TYPES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    index_path = root / "model_index.json"
    index = _read_json(index_path) if index_path.exists() else {}
    pipeline_kind = _TRANSFORMER_PIPELINES.get(index.get("_class_name")) or _transformer_kind(root)
    if flow_type in _TRANSFORMER_CLASSES or (flow_type == "auto" and pipeline_kind is not None):
        kind = pipeline_kind if flow_type == "auto" else flow_type
        if pipeline_kind is None and (root / "unet" / "config.json").exists():
            raise ValueError(f"{root} holds a UNet (unet/config.json), not the {_TRANSFORMER_CLASSES[kind]} of a "
                             f"{kind} folder; set the flow type to auto, perflow or euler_velocity")
        return _inspect_transformer_folder(root, index, kind, flow_type == "auto", prediction_type)
    if pipeline_kind is not None:
        raise ValueError(f"{index_path} names {index.get('_class_name')}, a {pipeline_kind} flow-matching "
                         f"transformer, not a {flow_type} UNet flow; set the flow type to auto or {pipeline_kind}")
    sdxl = "text_encoder_2" in index or (root / "text_encoder_2").exists()
    _check_parts(root, sdxl)
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json")
    pipeline_class = index.get("_class_name")
    scheduler_class = scheduler_config.get("_class_name")
    _check_architecture(root, pipeline_class, explicit=flow_type != "auto")
    reasons: list[str] = []
    if flow_type == "auto":
        flow_type = _detect_flow_type(root, pipeline_class, scheduler_class, reasons)
    else:
        reasons.append(f"flow type {flow_type} chosen by the user")
    pred: str | None = None
    if flow_type == "perflow":
        if prediction_type == "auto":
            pred = _detect_prediction(scheduler_config.get("prediction_type"), sdxl, reasons)
        else:
            pred = prediction_type
            reasons.append(f"prediction type {pred} chosen by the user")
    elif prediction_type not in ("auto", "velocity"):
        raise ValueError(f"an Euler velocity flow predicts velocity; prediction_type {prediction_type!r} "
                         "only applies to PeRFlow")
    return FlowFolderInfo(
        path=root, architecture="sdxl" if sdxl else "sd", flow_type=flow_type, prediction_type=pred,
        num_windows=int(scheduler_config.get("num_time_windows", 4)) if flow_type == "perflow" else 4,
        pipeline_class=pipeline_class, scheduler_class=scheduler_class, scheduler_config=scheduler_config,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)), reasons=reasons)


def _transformer_parts(root: Path, kind: str, index: dict[str, Any]) -> dict[str, str]:
    """The parts a FLUX / SD3 folder needs; SD3's T5 only when model_index.json lists one (it may be [null, null])."""
    parts = dict(_TRANSFORMER_PARTS[kind])
    if kind == "sd3" and index and (index.get("text_encoder_3") or [None])[0] is None:
        del parts["text_encoder_3"], parts["tokenizer_3"]
    return parts


def _transformer_kind(root: Path) -> str | None:
    """flux / sd3 from transformer/config.json's class, for a folder whose model_index.json is missing."""
    config = root / "transformer" / "config.json"
    if not config.exists():
        return None
    name = _read_json(config).get("_class_name")
    return next((kind for kind, cls in _TRANSFORMER_CLASSES.items() if cls == name), None)


def _inspect_transformer_folder(root: Path, index: dict[str, Any], kind: str, detected: bool,
                                prediction_type: str) -> FlowFolderInfo:
    """A FluxPipeline / StableDiffusion3Pipeline folder: every part present, the classes and scheduler it needs."""
    source = f"model_index.json names {index['_class_name']}" if "_class_name" in index else \
        f"transformer/config.json names {_TRANSFORMER_CLASSES[kind]}"
    reasons = [f"{source}: {kind}" if detected else f"flow type {kind} chosen by the user"]
    if prediction_type not in ("auto", "velocity"):
        raise ValueError(f"a {kind} flow predicts velocity; prediction_type {prediction_type!r} only applies to "
                         "PeRFlow")
    parts = _transformer_parts(root, kind, index)
    files = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
             "text_encoder_2": "config.json", "text_encoder_3": "config.json", "scheduler": "scheduler_config.json"}
    missing = [] if (root / "model_index.json").exists() else [
        f"{root / 'model_index.json'} ({_PARTS['model_index.json']})"]
    for part, what in parts.items():
        path = root / part / files[part] if part in files else root / part
        if not path.exists():
            missing.append(f"{path} ({what})")
        elif part in _WEIGHT_STEMS and not _weight_files(root / part, _WEIGHT_STEMS[part]):
            missing.append(f"{root / part} has no weights ({what})")
        elif part.startswith("tokenizer") and not any((path / n).exists() for n in _TOKENIZER_FILES):
            missing.append(f"{path} has none of {', '.join(_TOKENIZER_FILES)} ({what})")
    if missing:
        raise FileNotFoundError(f"{root} is not a complete diffusers {kind} folder; missing:\n  "
                                + "\n  ".join(missing))
    transformer = _read_json(root / "transformer" / "config.json")
    if transformer.get("_class_name", _TRANSFORMER_CLASSES[kind]) != _TRANSFORMER_CLASSES[kind]:
        raise ValueError(f"{root / 'transformer' / 'config.json'} describes a {transformer.get('_class_name')}, "
                         f"not the {_TRANSFORMER_CLASSES[kind]} of a {kind} folder; choose another folder or flow type")
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json")
    scheduler_class = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if scheduler_class != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{root / 'scheduler' / 'scheduler_config.json'} names {scheduler_class}; {kind} flows are "
                         "sampled with FlowMatchEulerDiscreteScheduler's Euler steps, which RectifID guides")
    try:
        check_scheduler_config(scheduler_config)
    except ValueError as exc:
        raise ValueError(f"{root / 'scheduler' / 'scheduler_config.json'}: {exc}") from None
    if kind == "flux":
        distilled = bool(transformer.get("guidance_embeds", False))
        steps = DEV_STEPS if distilled else SCHNELL_STEPS
        reasons.append("guidance-distilled transformer (FLUX.1-dev style): cfg is its embedded guidance, "
                       f"{steps} steps by default" if distilled else f"FLUX.1-schnell style: {steps} steps, no CFG")
    else:
        steps = TURBO_STEPS
        reasons.append(f"SD3.5 Large Turbo style: {steps} steps, no CFG by default"
                       + ("" if "text_encoder_3" in parts else "; no T5 encoder (zeros, as the pipeline)"))
    return FlowFolderInfo(path=root, architecture=kind, flow_type=kind, prediction_type=None, num_windows=steps,
                          pipeline_class=index.get("_class_name"), scheduler_class=scheduler_class,
                          scheduler_config=scheduler_config, reasons=reasons)


def image_size_multiple(path: str | Path) -> int:
    """What an image side of a flow folder must be a multiple of: the VAE factor, times the transformers' latent
    patch side for FLUX (2x2 packing) and SD3 (patch_size)."""
    root = Path(path).expanduser()
    index_path = root / "model_index.json"
    index = _read_json(index_path) if index_path.exists() else {}
    kind = _TRANSFORMER_PIPELINES.get(index.get("_class_name")) or _transformer_kind(root)
    if kind is None:
        return vae_scale_factor(root)
    patch = 2 if kind == "flux" else int(_read_json(root / "transformer" / "config.json").get("patch_size", 2))
    return vae_scale_factor(root) * patch


def vae_scale_factor(path: str | Path) -> int:
    """Pixels per latent cell of a flow folder's VAE (8 for SD1.x, SD2.x and SDXL), read from its config."""
    blocks = _read_json(Path(path).expanduser() / "vae" / "config.json").get("block_out_channels", [0] * 4)
    return 2 ** (len(blocks) - 1)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Parse "fp32"/"fp16"/"bf16"; fp16 on the CPU falls back to fp32 (many CPU kernels lack fp16)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)} or a torch.dtype")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; expected torch.float32, float16 or bfloat16")
    if dtype == torch.float16 and device.type == "cpu":
        warnings.warn("fp16 is not supported well on the CPU; loading the flow in fp32 instead", stacklevel=3)
        return torch.float32
    return dtype


def load_components(info: FlowFolderInfo, dtype: torch.dtype) -> StableDiffusionComponents:
    """Load the models of an inspected folder on the CPU in `dtype` (the SDXL VAE as its config asks)."""
    # imported here: diffusers/transformers take seconds to import, the rest of the package does not need them
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = info.path
    sdxl = info.architecture == "sdxl"
    upcast = bool(_read_json(root / "vae" / "config.json").get("force_upcast", False))
    part_dtype = {"vae": vae_dtype(sdxl, upcast, dtype)}

    def model(cls: Any, part: str) -> Any:
        folder = root / part
        variant = _variant(folder, _WEIGHT_STEMS[part], dtype)
        # a damaged file is named here, before diffusers / transformers fail on it with their own words
        names = _weight_files(folder, _WEIGHT_STEMS[part])
        check_weight_files(folder, [n for n in names if _file_variant(n) == variant])
        # diffusers and transformers 5 name the dtype argument differently
        dtype_arg = {"torch_dtype" if part in ("unet", "vae") else "dtype": part_dtype.get(part, dtype)}
        return cls.from_pretrained(folder, local_files_only=True, variant=variant, **dtype_arg)

    def tokenizer(part: str) -> Any:
        return CLIPTokenizer.from_pretrained(root / part, local_files_only=True)

    return StableDiffusionComponents(
        unet=model(UNet2DConditionModel, "unet"), vae=model(AutoencoderKL, "vae"),
        text_encoder=model(CLIPTextModel, "text_encoder"), tokenizer=tokenizer("tokenizer"),
        text_encoder_2=model(CLIPTextModelWithProjection, "text_encoder_2") if sdxl else None,
        tokenizer_2=tokenizer("tokenizer_2") if sdxl else None,
        force_zeros_for_empty_prompt=info.force_zeros_for_empty_prompt)


def load_transformer_components(info: FlowFolderInfo, dtype: torch.dtype) -> FlowMatchingComponents:
    """Load the models of an inspected FLUX / SD3 folder on the CPU in `dtype`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              T5EncoderModel)

    root, kind = info.path, info.architecture
    index_path = root / "model_index.json"
    parts = _transformer_parts(root, kind, _read_json(index_path) if index_path.exists() else {})

    def model(cls: Any, part: str) -> Any:
        folder = root / part
        variant = _variant(folder, _WEIGHT_STEMS[part], dtype)
        names = _weight_files(folder, _WEIGHT_STEMS[part])
        check_weight_files(folder, [n for n in names if _file_variant(n) == variant])
        dtype_arg = {"torch_dtype" if part in ("transformer", "vae") else "dtype": dtype}
        return cls.from_pretrained(folder, local_files_only=True, variant=variant, **dtype_arg)

    def tokenizer(cls: Any, part: str) -> Any:
        return cls.from_pretrained(root / part, local_files_only=True)

    transformer_cls = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    clip_cls = CLIPTextModel if kind == "flux" else CLIPTextModelWithProjection
    components = FlowMatchingComponents(
        transformer=model(transformer_cls, "transformer"), vae=model(AutoencoderKL, "vae"),
        scheduler_config=info.scheduler_config, text_encoder=model(clip_cls, "text_encoder"),
        tokenizer=tokenizer(CLIPTokenizer, "tokenizer"))
    if kind == "flux":
        components.text_encoder_2 = model(T5EncoderModel, "text_encoder_2")
        components.tokenizer_2 = tokenizer(AutoTokenizer, "tokenizer_2")
    else:
        components.text_encoder_2 = model(CLIPTextModelWithProjection, "text_encoder_2")
        components.tokenizer_2 = tokenizer(CLIPTokenizer, "tokenizer_2")
        if "text_encoder_3" in parts:
            components.text_encoder_3 = model(T5EncoderModel, "text_encoder_3")
            components.tokenizer_3 = tokenizer(AutoTokenizer, "tokenizer_3")
    return components


def load_flow(path: str | Path, *, flow_type: str = "auto", prediction_type: str = "auto",
              dtype: str | torch.dtype = "fp32", device: str | torch.device | None = None,
              num_windows: int | None = None, steps: int | None = None) -> RectifiedFlow:
    """Load a PeRFlow, Euler-velocity (InstaFlow / 2-rectified flow), FLUX.1 or SD3.x flow from a local diffusers
    folder.

    flow_type: "auto" | "perflow" | "euler_velocity" | "flux" | "sd3"; prediction_type: "auto" | "diff_eps" |
    "ddim_eps" | "velocity" (PeRFlow only). num_windows K defaults to the scheduler's
    num_time_windows (PeRFlow) or 4 (28 for a guidance-distilled FLUX.1-dev transformer); steps
    (model calls in total) defaults to K and must be >= K for PeRFlow; an Euler flow (2-RF /
    InstaFlow, FLUX, SD3) has one window per step, so steps and num_windows name the same number
    there. FLUX / SD3 text encoders stay on the CPU except while prompts are encoded. device defaults
    to cuda when available. Never downloads anything.
    """
    info = inspect_flow_folder(path, flow_type=flow_type, prediction_type=prediction_type)
    logger.info("loading %s", info.describe())
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    for name, value in (("num_windows", num_windows), ("steps", steps)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    if info.flow_type == "perflow":
        k = int(num_windows) if num_windows is not None else info.num_windows
        n = int(steps) if steps is not None else k
        perflow_timesteps(k, n)  # rejects bad steps before any weights are read
        components = load_components(info, torch_dtype)
        return PeRFlow(components, info.scheduler_config, info.prediction_type, num_windows=k, steps=n,
                       device=device, dtype=torch_dtype)

    if num_windows is not None and steps is not None and int(num_windows) != int(steps):
        raise ValueError(f"an Euler flow ({info.flow_type}) has one window per step; got num_windows={num_windows} "
                         f"and steps={steps}")
    k = int(num_windows if num_windows is not None else steps if steps is not None else info.num_windows)
    if info.flow_type in _TRANSFORMER_CLASSES:
        cls = FluxFlow if info.flow_type == "flux" else SD3Flow
        return cls(load_transformer_components(info, torch_dtype), k, device=device, dtype=torch_dtype)
    components = load_components(info, torch_dtype)
    return EulerVelocityFlow(components, num_windows=k, device=device, dtype=torch_dtype,
                             num_train_timesteps=int(info.scheduler_config.get("num_train_timesteps", 1000)))
