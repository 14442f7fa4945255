"""The RectifID sampler node: prompts + objective -> guided images, latent and a history plot."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from rectifid_core.guidance import (CK_MODES, MEMORY_MODES, SOLVER_MODES, GuidanceConfig, IterationInfo,
                                    resolve_memory_mode)
from rectifid_core.pipeline import PersonalizeResult, PersonalizeSettings, personalize
from rectifid_core.plots import plot_history

from . import comfy_bridge as bridge
from .common import CATEGORY, FLOW, OBJECTIVE, ObjectiveBundle, autograd_enabled, image_to_comfy

logger = logging.getLogger("RectifID")


def _preview(images: torch.Tensor) -> Image.Image:
    """First image of the current iterate (already decoded by the solver), for ComfyUI's live preview."""
    image = images[0].float().clamp(0, 1)
    array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def summarize(result: PersonalizeResult) -> list[str]:
    """One line per subject: similarity of the output and how it moved during guidance."""
    lines = []
    for name, value in result.final_similarities.items():
        series = [v for v in result.similarities.get(name, []) if v is not None]
        start = f" (first iteration {series[0]:.3f}, best {max(series):.3f})" if series else ""
        shown = "not found in the output" if value is None else f"{value:.3f}"
        lines.append(f"{name}: similarity {shown}{start}")
    n = len(result.losses)
    if n and result.final_loss is not None:
        lines.append(f"loss {result.losses[0]:.3f} before guidance, {result.final_loss:.3f} after {n} "
                     f"iteration{'s' if n != 1 else ''}")
    if result.stopped_early:
        lines.append(f"stopped early: {result.stopped_early}")
    return lines


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
            "width": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 8,
                              "tooltip": "Image width; a multiple of the VAE factor (8 for SD)."}),
            "height": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 8,
                               "tooltip": "Image height; a multiple of the VAE factor (8 for SD)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed; the same seed gives the same image on CPU and GPU."}),
            "windows": ("INT", {"default": 4, "min": 1, "max": 32,
                                "tooltip": "K, the number of flow windows (model calls per pass). 4 for PeRFlow; "
                                           "more is slower and rarely better."}),
            "iterations": ("INT", {"default": 20, "min": 0, "max": 1000,
                                   "tooltip": "N, guidance iterations (one forward + backward each). 20 fast, "
                                              "50 default, 100 best likeness. 0 = plain sampling."}),
            "guidance_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 20.0, "step": 0.05,
                                         "tooltip": "s, step size of the identity guidance: 1.0 for faces, "
                                                    "2.0 for objects and animals."}),
            "cfg": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 20.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale of the prompt: 3.0 for PeRFlow SD1.5, "
                                         "1.5 for 2-rectified flow. 1.0 halves the cost (no negative pass)."}),
            "ck_mode": (list(CK_MODES), {
                "default": "per_window",
                "tooltip": "Anchor coefficient c_k per window. per_window = sqrt(1-gamma_k^2) (intended); legacy = "
                           "the released code's constant 0.958; one = 1 (what Euler flows use anyway)."}),
            "solver": (list(SOLVER_MODES), {
                "default": "anchored",
                "tooltip": "anchored = RectifID. no_anchor / noise_gd = the paper's ablations. anchored_anderson "
                           "solves the same problem as anchored with Anderson acceleration (fewer iterations)."}),
            "memory": (list(MEMORY_MODES), {
                "default": "auto",
                "tooltip": "store keeps activations for the backward pass (fastest); checkpoint recomputes them "
                           "(slower, far less VRAM: SDXL, large images or batches); lowest also runs the CFG halves one "
                           "at a time (slower still); auto picks store when it fits in free VRAM, else checkpoint."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Images generated together from one seed (each gets its own noise)."}),
        }}

    RETURN_TYPES = ("IMAGE", "LATENT", "IMAGE")
    RETURN_NAMES = ("images", "latent", "history_plot")
    OUTPUT_TOOLTIPS = ("The personalized images.",
                       "Their latents (SD-scaled, for VAE Decode or further sampling).",
                       "Loss and similarity per iteration.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Generates images that keep the reference subject's identity by anchored classifier guidance "
                   "(RectifID) through a few-step rectified flow.")

    def sample(self, flow: Any, objective: ObjectiveBundle, positive: str, negative: str, width: int, height: int,
               seed: int, windows: int, iterations: int, guidance_scale: float, cfg: float, ck_mode: str,
               solver: str, memory: str, batch_size: int) -> dict[str, Any]:
        if not isinstance(objective, ObjectiveBundle):
            raise TypeError(f"objective must come from a RectifID subject or 'Match Subjects' node, "
                            f"got {type(objective).__name__}")
        bridge.check_interrupt()
        bridge.free_vram_for_sampling(flow.device)
        if memory == "auto":  # ComfyUI's count of free VRAM includes what its caches can give back
            memory = resolve_memory_mode(memory, flow, flow.latent_shape(int(batch_size), int(height), int(width)),
                                         bridge.free_memory(flow.device))
        config = GuidanceConfig(scale=float(guidance_scale), iterations=int(iterations), mode=solver,
                                ck_mode=ck_mode, memory=memory)
        settings = PersonalizeSettings(prompt=positive, negative_prompt=negative, width=int(width),
                                       height=int(height), seed=int(seed), batch_size=int(batch_size),
                                       cfg_scale=float(cfg), num_steps=int(windows), guidance=config)
        settings.validate()
        progress = bridge.Progress(max(1, int(iterations)))
        previews = bridge.previews_enabled()

        def on_iteration(info: IterationInfo) -> None:
            bridge.check_interrupt()
            progress.update(info.iteration + 1, _preview(info.image) if previews else None)

        with autograd_enabled():
            result = personalize(flow, objective.objective, settings, callback=on_iteration, labels=objective.labels)
        if len(result.losses) < progress.total:  # N=0 or stopped early: still show the bar as done
            progress.update(progress.total)
        lines = summarize(result)
        for line in lines:
            logger.info("RectifID: %s", line)
        plot = plot_history(result.losses, result.similarities)
        return {"ui": {"text": lines},
                "result": (image_to_comfy(result.images), {"samples": result.latent}, image_to_comfy(plot))}
