"""One guided run inside ComfyUI's sampling: the k-diffusion style function behind the RectifID SAMPLER.

ComfyUI has already loaded the model, applied LoRA patches, encoded the conds, scaled
the noise to sigmas[0] and wrapped CFG (any GUIDER) when it calls the function with
`model(x, sigma)`; the function runs the anchored solver from that x and returns the
final x, which ComfyUI then maps into the LATENT as for any sampler.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rectifid_core.flows.denoiser import DenoiserFlow, StepRule, check_sigmas
from rectifid_core.guidance import (AUTO_HEADROOM, GuidanceConfig, IterationInfo, auto_guidance_scale,
                                    fastest_fitting, guide)
from rectifid_core.pipeline import summarize

from . import comfy_bridge as bridge
from .common import ObjectiveBundle, autograd_enabled
from .comfy_model import (differentiable_calls, make_trainable, normal_conds, step_rule, vae_decoder,
                          with_attention_override)
from .sampler import ESTIMATE_MARGIN, _plural, _preview, log_report, outcome_lines

SAMPLER_MEMORY_MODES = ("auto", "store", "recompute_vae", "checkpoint")
AUTO_ORDER = SAMPLER_MEMORY_MODES[1:]  # fastest first


@dataclass
class RunSettings:
    """What the SAMPLER carries besides ComfyUI's inputs; `report` holds the last run's report text."""

    objective: ObjectiveBundle
    vae: Any
    guidance: GuidanceConfig
    report: str = ""
    lines: list[str] = field(default_factory=list)


def check_objective(objective: Any) -> ObjectiveBundle:
    if not isinstance(objective, ObjectiveBundle):
        raise TypeError(f"objective must come from a RectifID subject or 'Match Subjects' node, "
                        f"got {type(objective).__name__}; connect a subject node's 'objective' output")
    return objective


def check_vae(vae: Any) -> Any:
    if vae is None or not hasattr(vae, "first_stage_model") or getattr(vae, "first_stage_model", None) is None:
        raise ValueError(f"the vae input holds no VAE ({type(vae).__name__}); connect 'Load VAE' (or a checkpoint "
                         "loader's VAE) with the VAE of this model: RectifID decodes every iterate to score it")
    return vae


def memory_estimates(base_model: Any, vae: Any, shape: tuple[int, ...], steps: int) -> dict[str, int]:
    """Bytes each memory mode needs beyond the weights, from ComfyUI's own per-call estimates (with CFG's doubled
    batch for the model, as ComfyUI's sampler reserves) plus the margin our sampler adds.

    Not calibrated for the backward pass: "store" keeps every step's activations (steps x one call), the decode's
    and the recomputing modes keep one call's; it only decides how much of ComfyUI's other models to unload.
    """
    call = float(base_model.memory_required([shape[0] * 2, *shape[1:]]))
    decode = float(vae.memory_used_decode(shape, vae.vae_dtype))
    kept = {"store": steps * call + decode, "recompute_vae": steps * call + decode, "checkpoint": call + decode}
    return {mode: int(ESTIMATE_MARGIN * value) for mode, value in kept.items()}


def resolve_memory(memory: str, estimates: dict[str, int], device: torch.device, to_load: int = 0) -> str:
    """auto: the fastest mode whose estimate fits ComfyUI's count of free memory less the `to_load` bytes of weights
    still to come (the VAE's), on the CPU store."""
    if memory != "auto":
        return memory
    free = bridge.free_memory(device)
    if free is None:
        return AUTO_ORDER[0]
    return fastest_fitting(estimates, AUTO_ORDER, AUTO_HEADROOM * max(0, free - to_load))


def _check_latent(x: torch.Tensor, vae: Any) -> None:
    channels = getattr(vae, "latent_channels", None)
    if x.dim() != 4:
        raise ValueError(f"RectifID samples image latents [batch, channels, height, width]; got a latent of shape "
                         f"{tuple(x.shape)} (video and audio models are not supported)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"the latent has {x.shape[1]} channels but the VAE decodes {channels}; connect the VAE that "
                         "belongs to this model (FLUX and SD3.5 use a 16-channel VAE, SD1.5/SDXL a 4-channel one)")


@contextlib.contextmanager
def comfy_flow(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any], vae: Any,
               memory_required: int = 0) -> Iterator[tuple[DenoiserFlow, StepRule]]:
    """Inside a ComfyUI sampler function: the flow over `model(x, sigma)` and the VAE, ready for autograd.

    Loads the model and the VAE together (fully, so no offloaded weight copies stay in the graph),
    converts their inference tensors once, and keeps gradients, the rope with a backward, the
    LayerNorm input copies and SDPA attention on for the block. The flow's state is the step
    rule's (`rule.start(x)` / `rule.finish(z)`).
    """
    import comfy.model_management as mm

    guider = model.inner_model
    patcher, base_model = guider.model_patcher, guider.inner_model
    mm.load_models_gpu([patcher, vae.patcher], memory_required=memory_required, force_full_load=True)
    make_trainable(patcher.model)
    make_trainable(vae.first_stage_model)
    normal_conds(getattr(guider, "conds", None) or {})
    with autograd_enabled(), differentiable_calls(base_model.diffusion_model):
        own_sigmas = sigmas.detach().to("cpu", torch.float32).clone()
        rule = step_rule(extra_args.get("model_options") or {}, own_sigmas)
        run_args = with_attention_override(extra_args)
        decode = vae_decoder(vae, base_model, own_sigmas[-1].to(x.device))
        flow = DenoiserFlow(lambda z, sigma: model(z, sigma, **run_args),
                            lambda z: decode(rule.finish(z)).to(x.device), rule,
                            latent_channels=x.shape[1], vae_scale_factor=int(getattr(vae, "upscale_ratio", 8)),
                            device=x.device, dtype=x.dtype)
        yield flow, rule


def sample_rectifid(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
                    callback: Any = None, disable: Any = None, rectifid: RunSettings | None = None) -> torch.Tensor:
    """The SAMPLER's function: anchored classifier guidance from x at sigmas[0]; returns the final x."""
    if rectifid is None:
        raise ValueError("this sampler function needs its RectifID settings; build it with the 'RectifID Sampler' node")
    objective, vae = check_objective(rectifid.objective), check_vae(rectifid.vae)
    _check_latent(x, vae)
    try:
        values = check_sigmas(sigmas.tolist())
    except ValueError as exc:
        raise ValueError(f"RectifID sigmas: {exc}") from exc
    extra_args = dict(extra_args or {})
    steps = len(values) - 1
    estimates = memory_estimates(model.inner_model.inner_model, vae, tuple(x.shape), steps)
    config = rectifid.guidance
    if config.scale is None:
        config = dataclasses.replace(config, scale=auto_guidance_scale(objective.objective))
    vae_to_load = int(vae.patcher.model_size() - vae.patcher.loaded_size())
    config = dataclasses.replace(config, memory=resolve_memory(config.memory, estimates, x.device, vae_to_load))
    config.validate()
    bridge.check_interrupt()
    progress = bridge.Progress(max(1, config.iterations))
    previews = bridge.previews_enabled()

    def on_iteration(info: IterationInfo) -> None:
        progress.update(info.iteration + 1, _preview(info.image) if previews else None)

    with comfy_flow(model, x, sigmas, extra_args, vae, estimates[config.memory]) as (flow, rule):
        result = guide(flow, flow.conditioning(x.shape[0]), objective.objective, rule.start(x.detach().clone()),
                       config, on_iteration, bridge.check_interrupt)
        summary = summarize(result, objective.objective, objective.labels, x.device)
        final = rule.finish(result.latent).detach()
    if len(result.losses) < progress.total:  # N=0 or stopped early: still show the bar as done
        progress.update(progress.total)
    rectifid.lines = [f"settings: {_plural(steps, 'step')} (sigmas {', '.join(f'{s:.4g}' for s in values)}), "
                      f"{_plural(config.iterations, 'iteration')}, guidance scale {config.scale:g}"
                      f"{' (auto)' if rectifid.guidance.scale is None else ''}, solver {config.mode}, "
                      f"c_k {config.ck_mode}, memory {config.memory}, batch {x.shape[0]}"] + outcome_lines(summary)
    rectifid.report = "\n".join(rectifid.lines)
    log_report(rectifid.lines)
    if callback is not None:  # ComfyUI's denoised output and its progress bar see the final latent
        callback({"x": final, "i": steps - 1, "sigma": sigmas[-1], "sigma_hat": sigmas[-1], "denoised": final})
    return final
