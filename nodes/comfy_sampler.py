"""RectifID on ComfyUI's own models: a SAMPLER for SamplerCustomAdvanced, and a one-box node around it."""
from __future__ import annotations

from typing import Any

import torch

from rectifid_core.guidance import CK_MODES, SOLVER_MODES, GuidanceConfig

from . import comfy_bridge as bridge
from .common import CATEGORY, OBJECTIVE, image_to_comfy
from .comfy_run import SAMPLER_MEMORY_MODES, RunSettings, check_objective, check_vae, sample_rectifid
from .sampler import AUTO, _auto

GUIDANCE_INPUTS: dict[str, Any] = {
    "guidance_scale": ("FLOAT", {"default": float(AUTO), "min": 0.0, "max": 20.0, "step": 0.05,
                                 "tooltip": "s, step size of the identity guidance. 0 = auto: 2.0 when a subject is an "
                                            "object or animal, else 1.0 (faces, CLIP), the reference code's values."}),
    "iterations": ("INT", {"default": 20, "min": 0, "max": 1000,
                           "tooltip": "N, guidance iterations (one forward + backward through every step and the VAE "
                                      "each). 20 is fast, 50-100 give a closer likeness. 0 = plain Euler sampling."}),
    "memory": (list(SAMPLER_MEMORY_MODES), {
        "default": "auto",
        "tooltip": "store keeps every step's activations for the backward pass (fastest); recompute_vae recomputes "
                   "the VAE decoder's; checkpoint recomputes each step's model call too (slowest, least VRAM: large "
                   "models or images); auto picks the fastest whose estimate fits the VRAM ComfyUI can free."}),
    "solver": (list(SOLVER_MODES), {
        "default": "anchored",
        "tooltip": "anchored = RectifID, the paper's method (use this). no_anchor and noise_gd are the paper's "
                   "ablations, for comparison only; anchored_momentum adds heavy-ball momentum (not measured on "
                   "real models)."}),
    "ck_mode": (list(CK_MODES), {
        "default": "per_window",
        "tooltip": "Anchor coefficient per step: per_window = the step rule's own (1 for Euler steps, as on FLUX and "
                   "SD3.5); legacy = the released code's constant 0.958; one = 1."}),
}


def _run_settings(objective: Any, vae: Any, guidance_scale: float, iterations: int, memory: str, solver: str,
                  ck_mode: str) -> RunSettings:
    config = GuidanceConfig(scale=_auto(float(guidance_scale)), iterations=int(iterations), mode=solver,
                            ck_mode=ck_mode, memory=memory)
    config.validate()
    return RunSettings(check_objective(objective), check_vae(vae), config)


class RectifIDComfySampler:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "objective": (OBJECTIVE, {
                "tooltip": "What to look like: a subject's 'objective' output, or 'Match Subjects' for several."}),
            "vae": ("VAE", {"tooltip": "The model's VAE (e.g. 'Load VAE' with ae.safetensors for FLUX): every "
                                       "iterate is decoded and scored."}),
            **GUIDANCE_INPUTS,
        }}

    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's sampler input, with a BasicScheduler's sigmas (FLUX.1-"
                       "schnell: simple, 4 steps; SD3.5 Large Turbo: normal, 4 steps) and any guider.",)
    FUNCTION = "get_sampler"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = ("RectifID as a ComfyUI sampler: Euler steps over your own MODEL (LoRAs, prompts and guider as "
                   "connected), steered by anchored classifier guidance towards the reference subject. The report "
                   "goes to the console.")

    def get_sampler(self, objective: Any, vae: Any, guidance_scale: float, iterations: int, memory: str,
                    solver: str, ck_mode: str) -> tuple:
        import comfy.samplers

        settings = _run_settings(objective, vae, guidance_scale, iterations, memory, solver, ck_mode)
        return (comfy.samplers.KSAMPLER(sample_rectifid, {"rectifid": settings}),)


class RectifIDComfySample:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "A few-step flow model from ComfyUI's loaders (FLUX.1-schnell, SD3.5 Large "
                                           "Turbo), LoRAs applied as usual."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt; name the subject's class (a photo of a person)."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt (used when cfg > 1)."}),
            "vae": ("VAE", {"tooltip": "The model's VAE: every iterate is decoded and scored."}),
            "objective": (OBJECTIVE, {
                "tooltip": "What to look like: a subject's 'objective' output, or 'Match Subjects' for several."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to sample, e.g. 'Empty SD3 Latent Image' (its size is "
                                                   "the image size)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed, drawn as ComfyUI's KSampler draws it."}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 64,
                              "tooltip": "Euler steps per pass: 4 for FLUX.1-schnell and SD3.5 Large Turbo."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance of the prompt; 1.0 for FLUX.1-schnell and SD3.5 "
                                         "Large Turbo (and half the cost: no negative pass)."}),
            "scheduler": (bridge.scheduler_names(), {
                "default": "simple",
                "tooltip": "ComfyUI's sigma schedule: simple for FLUX.1-schnell, normal for SD3.5 Large Turbo."}),
            **GUIDANCE_INPUTS,
        }}

    RETURN_TYPES = ("IMAGE", "LATENT", "STRING")
    RETURN_NAMES = ("images", "latent", "report")
    OUTPUT_TOOLTIPS = ("The personalized images (decoded as VAE Decode does).",
                       "Their latents, for VAE Decode or another sampler.",
                       "The run in words: settings, every subject's similarity and any warning. Connect a 'Preview "
                       "as Text' (PreviewAny) node.")
    FUNCTION = "sample"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = ("RectifID on a MODEL from ComfyUI's loaders in one box: CFGGuider + the scheduler's sigmas + the "
                   "RectifID sampler (the same as SamplerCustomAdvanced with 'RectifID Sampler').")

    def sample(self, model: Any, positive: Any, negative: Any, vae: Any, objective: Any, latent_image: dict,
               seed: int, steps: int, cfg: float, scheduler: str, guidance_scale: float, iterations: int,
               memory: str, solver: str, ck_mode: str) -> tuple:
        import comfy.sample
        import comfy.samplers

        settings = _run_settings(objective, vae, guidance_scale, iterations, memory, solver, ck_mode)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, int(steps)).cpu()
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, int(seed))
        sampler = comfy.samplers.KSAMPLER(sample_rectifid, {"rectifid": settings})
        samples = guider.sample(noise, latent, sampler, sigmas, denoise_mask=latent_image.get("noise_mask"),
                                seed=int(seed))
        samples = samples.to(torch.device("cpu"))
        images = vae.decode(samples)
        out = {**latent_image, "samples": samples}
        return (image_to_comfy(images.movedim(-1, 1)), out, settings.report)
