"""The RectifID sampler node: prompts + objective -> guided images, latent, a history plot and a text report."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from rectifid_core.compiled import COMPILE_MODES
from rectifid_core.guidance import (CK_MODES, MEMORY_MODES, PARTIAL, SOLVER_MODES, GuidanceConfig, IterationInfo,
                                    estimate_guidance_bytes, memory_family, resolve_memory_mode)
from rectifid_core.pipeline import PersonalizeResult, PersonalizeSettings, personalize, resolve_settings
from rectifid_core.plots import plot_history

from . import comfy_bridge as bridge
from .common import CATEGORY, FLOW, OBJECTIVE, ObjectiveBundle, autograd_enabled, image_to_comfy

logger = logging.getLogger("RectifID")

AUTO = 0  # widget value of width, height, steps, cfg and guidance_scale that resolves from the flow / objective
ESTIMATE_MARGIN = 1.1  # the activation estimate is a fitted model; ComfyUI adds the same 10% to model sizes


def _preview(images: torch.Tensor) -> Image.Image:
    """First image of the current iterate (already decoded by the solver), for ComfyUI's live preview."""
    image = images[0].float().clamp(0, 1)
    array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _auto(value: float) -> float | None:
    return None if value == AUTO else value


def _bytes_off_device(flow: Any, device: torch.device) -> int:
    """Weights and buffers of the flow's models not yet on `device`, so not yet in its used memory.

    The discriminators are moved to their device by their loaders and are counted there already.
    """
    components = getattr(flow, "components", None)
    if components is None or not dataclasses.is_dataclass(components):
        return 0
    total = 0
    for part in dataclasses.fields(components):
        module = getattr(components, part.name)
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors if t.device != device)
    return total


def memory_needed(flow: Any, settings: PersonalizeSettings, device: torch.device) -> int:
    """Bytes this run needs free on `device`: weights not there yet + one iteration's activations (with margin).

    `settings` are resolved (no auto left), so its memory mode is one the estimate names.
    """
    shape = flow.latent_shape(settings.batch_size, settings.height, settings.width)
    estimate = estimate_guidance_bytes(shape, settings.num_steps, memory_family(flow), flow.dtype)
    activations = estimate[settings.guidance.memory]
    return _bytes_off_device(flow, device) + int(ESTIMATE_MARGIN * activations)


def _shown(value: float, asked: float | None) -> str:
    return f"{value:g} (auto)" if asked is None else f"{value:g}"


def _shown_mode(used: str, asked: str) -> str:
    return used if used == asked else f"{used} ({asked})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def report(result: PersonalizeResult, asked: PersonalizeSettings) -> list[str]:
    """The run in words: the settings used (auto ones marked), every subject's similarity, the warnings."""
    used, g = result.settings, result.settings.guidance
    lines = [f"settings: {_shown(used.width, asked.width)} x {_shown(used.height, asked.height)} px, "
             f"{_shown(used.num_steps, asked.num_steps)} steps, {_plural(g.iterations, 'iteration')}, guidance scale "
             f"{_shown(g.scale, asked.guidance.scale)}, CFG {_shown(used.cfg_scale, asked.cfg_scale)}, solver {g.mode}, "
             f"c_k {g.ck_mode}, memory {_shown_mode(g.memory, asked.guidance.memory)}, seed {used.seed}, "
             f"batch {used.batch_size}"]
    return lines + outcome_lines(result)


def outcome_lines(result: PersonalizeResult) -> list[str]:
    """Every subject's similarity (final, first iteration, best), the loss before and after, the warnings."""
    lines = []
    for name, value in result.final_similarities.items():
        series = [v for v in result.similarities.get(name, []) if v is not None]
        start = f" (first iteration {series[0]:.3f}, best {max(series):.3f})" if series else ""
        shown = "not found in the output" if value is None else f"{value:.3f}"
        lines.append(f"{name}: similarity {shown}{start}")
    n = len(result.losses)
    if n and result.final_loss is not None:
        lines.append(f"loss {result.losses[0]:.3f} before guidance, {result.final_loss:.3f} after "
                     f"{_plural(n, 'iteration')}")
    lines += [f"warning: {w}" for w in result.warnings]
    return lines


def log_report(lines: list[str]) -> None:
    """The console shows the report (warnings as warnings) even where its output is not connected."""
    for line in lines:
        logger.log(logging.WARNING if line.startswith("warning: ") else logging.INFO, "RectifID: %s", line)


class RectifIDSampler:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "flow": (FLOW, {"tooltip": "The rectified flow from 'Load Rectified Flow'."}),
            "objective": (OBJECTIVE, {
                "tooltip": "What to look like: a subject's 'objective' output, or 'Match Subjects' for several."}),
            "positive": ("STRING", {
                "multiline": True, "default": "a photo of a person",
                "tooltip": "The prompt. Name the subject's class (person, man, woman, dog, cat, ...); the identity "
                           "comes from the reference, the rest from the prompt."}),
            "negative": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "Negative prompt (used when CFG > 1)."}),
            "width": ("INT", {"default": AUTO, "min": 0, "max": 4096, "step": 8,
                              "tooltip": "Image width, a multiple of 8. 0 = auto: the flow's native size (512 for "
                                         "SD1.5 flows, 768 for SD2.1, 1024 for SDXL)."}),
            "height": ("INT", {"default": AUTO, "min": 0, "max": 4096, "step": 8,
                               "tooltip": "Image height, a multiple of 8. 0 = auto: the flow's native size (512 for "
                                          "SD1.5 flows, 768 for SD2.1, 1024 for SDXL)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed; the same seed gives the same image on CPU and GPU."}),
            "steps": ("INT", {"default": AUTO, "min": 0, "max": 64,
                              "tooltip": "Model calls per pass. 0 = auto: the flow's trained windows (4 for PeRFlow). "
                                         "PeRFlow runs more steps as sub-steps inside its trained windows and refuses "
                                         "fewer; 2-rectified flow and InstaFlow take that many Euler steps."}),
            "iterations": ("INT", {"default": 20, "min": 0, "max": 1000,
                                   "tooltip": "N, guidance iterations (one forward + backward each). 20 (the default) "
                                              "is fast, 50-100 give a closer likeness. 0 = plain sampling."}),
            "guidance_scale": ("FLOAT", {"default": float(AUTO), "min": 0.0, "max": 20.0, "step": 0.05,
                                         "tooltip": "s, step size of the identity guidance. 0 = auto: 2.0 when a subject "
                                                    "is an object or animal, else 1.0 (faces, CLIP), the reference "
                                                    "code's values."}),
            "cfg": ("FLOAT", {"default": float(AUTO), "min": 0.0, "max": 20.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale of the prompt; 1.0 halves the cost (no "
                                         "negative pass). 0 = auto: 3.0 for PeRFlow SD1.5, 4.5 for PeRFlow SD2.1, "
                                         "1.0 for PeRFlow SDXL, 1.5 for 2-rectified flow and InstaFlow."}),
            "ck_mode": (list(CK_MODES), {
                "default": "per_window",
                "tooltip": "Anchor coefficient c_k per window. per_window = sqrt(1-gamma_k^2) (intended); legacy = "
                           "the released code's constant 0.958; one = 1 (what Euler flows use anyway)."}),
            "solver": (list(SOLVER_MODES), {
                "default": "anchored",
                "tooltip": "anchored = RectifID, the paper's method (use this). no_anchor (Eq. 8, no anchor) and "
                           "noise_gd (gradient descent on the initial noise: lr 0.4 x guidance scale, momentum 0.9, "
                           "l2 1.0) are the paper's ablations, for comparison only. anchored_momentum: heavy-ball "
                           "momentum (beta 0.5) on the same problem; more likeness at the same iterations on the toy "
                           "benchmark, but worse realism in some runs, and not measured on real models."}),
            "memory": (list(MEMORY_MODES), {
                "default": "auto",
                "tooltip": "store keeps activations for the backward pass (fastest); recompute_vae keeps the "
                           "UNet's and recomputes the VAE decoder's (one extra decode, much less VRAM at 512 px); "
                           "partial also recomputes the UNet calls of the first steps, as few as fit in the VRAM free "
                           "now (one extra UNet call each; the report says how many: partial:N); checkpoint "
                           "recomputes every step (slower, least VRAM: SDXL, large images or batches); lowest also "
                           "runs the CFG halves one at a time (slower still); auto picks the fastest of store, "
                           "recompute_vae, partial:N, checkpoint whose estimate fits in the VRAM free now. Only as "
                           "much VRAM as the chosen mode needs is freed from ComfyUI's models."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Images generated together from one seed (each gets its own noise)."}),
            "compile": (list(COMPILE_MODES), {
                "default": "off",
                "tooltip": "on runs each guidance iteration through torch.compile (CUDA graphs on an NVIDIA GPU; "
                           "needs Triton there, a C++ compiler on the CPU). The first run of an image size, batch "
                           "and step count compiles (the console says so; minutes), later runs of the session reuse "
                           "it and kernels stay cached under ~/.cache/rectifid/torch_compile across restarts. Same "
                           "images as off up to float rounding. off (the default) until GPU timings show the gain."}),
        }}

    RETURN_TYPES = ("IMAGE", "LATENT", "IMAGE", "STRING")
    RETURN_NAMES = ("images", "latent", "history_plot", "report")
    OUTPUT_TOOLTIPS = ("The personalized images.",
                       "Their latents in ComfyUI's LATENT scale (for VAE Decode or another sampler).",
                       "Loss and similarity per iteration.",
                       "The run in words: settings used (auto values resolved), every subject's final similarity "
                       "and any warning (e.g. a subject that was never found). Connect a 'Preview as Text' (PreviewAny) node.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Generates images that keep the reference subject's identity by anchored classifier guidance "
                   "(RectifID) through a few-step rectified flow.")

    def sample(self, flow: Any, objective: ObjectiveBundle, positive: str, negative: str, width: int, height: int,
               seed: int, steps: int, iterations: int, guidance_scale: float, cfg: float, ck_mode: str,
               solver: str, memory: str, batch_size: int, compile: str = "off") -> tuple:
        if not isinstance(objective, ObjectiveBundle):
            raise TypeError(f"objective must come from a RectifID subject or 'Match Subjects' node, "
                            f"got {type(objective).__name__}")
        bridge.check_interrupt()
        asked = PersonalizeSettings(
            prompt=positive, negative_prompt=negative, width=_auto(int(width)), height=_auto(int(height)),
            seed=int(seed), batch_size=int(batch_size), cfg_scale=_auto(float(cfg)), num_steps=_auto(int(steps)),
            guidance=GuidanceConfig(scale=_auto(float(guidance_scale)), iterations=int(iterations), mode=solver,
                                    ck_mode=ck_mode, memory=memory, compile=compile))
        settings = resolve_settings(asked, flow, objective.objective)
        if memory in ("auto", PARTIAL):  # ComfyUI's count of free VRAM includes what its caches can give back
            shape = flow.latent_shape(settings.batch_size, settings.height, settings.width)
            settings.guidance = dataclasses.replace(
                settings.guidance, memory=resolve_memory_mode(memory, flow, shape, bridge.free_memory(flow.device),
                                                       settings.num_steps))
        settings.validate()
        bridge.free_vram_for_sampling(flow.device, memory_needed(flow, settings, flow.device))
        progress = bridge.Progress(max(1, int(iterations)))
        previews = bridge.previews_enabled()

        def on_iteration(info: IterationInfo) -> None:
            progress.update(info.iteration + 1, _preview(info.image) if previews else None)

        with autograd_enabled():
            result = personalize(flow, objective.objective, settings, callback=on_iteration, labels=objective.labels,
                                 interrupt=bridge.check_interrupt)
        if len(result.losses) < progress.total:  # N=0 or stopped early: still show the bar as done
            progress.update(progress.total)
        lines = report(result, asked)
        log_report(lines)
        plot = plot_history(result.losses, result.similarities)
        return (image_to_comfy(result.images), {"samples": flow.vae_latent(result.latent)}, image_to_comfy(plot), "\n".join(lines))
