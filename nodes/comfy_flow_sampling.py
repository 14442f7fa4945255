"""ComfyUI's side of 'RectifID Checkpoint Flow': a MODEL clone sampled in the flow's own sigma space.

The math is rectifid_core.flows.denoiser_rules.CheckpointFlow; this module only puts it where
ComfyUI looks: a model_sampling object patch (flow-matching sigma = t, multiplier T, the UNet
output turned into x0 by the flow's window rule) and the step rule in model_options for the
RectifID SAMPLER. ComfyUI is imported inside the functions, so the pack imports without it.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from rectifid_core.flows.denoiser_rules import EULER_VELOCITY, CheckpointFlow
from rectifid_core.flows.schedule import PERFLOW_PREDICTIONS, alphas_cumprod, betas_from_config

from .comfy_model import STEP_RULE_KEY

# node label -> prediction type of the rule; 2-RF and InstaFlow are the same Euler velocity flow
FLOW_KINDS = {"perflow": None, "2-rf": EULER_VELOCITY, "instaflow": EULER_VELOCITY}
DEFAULT_WINDOWS = 4  # PeRFlow's released checkpoints and the reference scripts' num_steps for every flow


@functools.cache
def _flow_sampling_class() -> type:
    import comfy.model_sampling as ms

    class RectifIDFlowSampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
        """Flow-matching sampling (sigma = t, timestep = sigma * T) whose x0 comes from the flow's window rule."""

        def __init__(self, flow: CheckpointFlow) -> None:
            super().__init__()
            self.set_parameters(shift=1.0, timesteps=flow.num_train_timesteps, multiplier=flow.num_train_timesteps)
            self.flow = flow

        def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
            return self.flow.model_timestep(sigma)

        def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                               model_input: torch.Tensor) -> torch.Tensor:
            return self.flow.denoised(model_output, model_input, sigma)

    return RectifIDFlowSampling


def _auto_prediction(model: Any, sampling: Any) -> str:
    """What our folder loader picks for PeRFlow: velocity for v-prediction (SD2.1), ddim_eps for SDXL, else diff_eps."""
    import comfy.model_base
    import comfy.model_sampling as ms

    if isinstance(sampling, ms.V_PREDICTION):
        return "velocity"
    return "ddim_eps" if isinstance(model.model, comfy.model_base.SDXL) else "diff_eps"


def _sd_alphas_cumprod(sampling: Any) -> torch.Tensor:
    """The checkpoint's alphas_cumprod as PeRFlow's scheduler computes it (scaled_linear betas, float64),
    refused unless it is the schedule ComfyUI itself samples this model with."""
    config = {"beta_schedule": "scaled_linear", "beta_start": float(sampling.linear_start),
              "beta_end": float(sampling.linear_end), "num_train_timesteps": int(sampling.num_timesteps)}
    abar = alphas_cumprod(betas_from_config(config))
    with torch.inference_mode(False):
        theirs = sampling.sigmas.detach().clone().double().cpu()
    if not torch.allclose(((1 - abar) / abar).sqrt(), theirs, rtol=1e-4, atol=0):
        raise ValueError("this checkpoint's noise schedule is not Stable Diffusion's scaled_linear one (zero-terminal-SNR "
                         "or a custom schedule?), which PeRFlow's eps windows are defined on; choose prediction_type "
                         "velocity if it is a velocity PeRFlow, or use a PeRFlow SD1.5 / SDXL checkpoint")
    return abar


def checkpoint_flow(model: Any, flow_type: str, prediction_type: str, steps: int) -> CheckpointFlow:
    """The window rule for a MODEL from ComfyUI's checkpoint loader; refuses models that are not SD-family UNets."""
    import comfy.model_sampling as ms

    if flow_type not in FLOW_KINDS:
        raise ValueError(f"unknown flow type {flow_type!r}; choose one of {', '.join(FLOW_KINDS)}")
    if prediction_type != "auto" and prediction_type not in PERFLOW_PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose auto or one of "
                         f"{', '.join(PERFLOW_PREDICTIONS)}")
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0 (0 = the flow's own {DEFAULT_WINDOWS} windows), got {steps}")
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, ms.ModelSamplingDiscrete):
        raise ValueError(f"this MODEL samples with {type(sampling).__name__}, not the discrete diffusion schedule of a "
                         "Stable Diffusion UNet: 'RectifID Checkpoint Flow' is for PeRFlow, 2-rectified flow and "
                         "InstaFlow checkpoints from Load Checkpoint, connected before any other sampling patch. "
                         "Flow-matching models (FLUX, SD3.5) need no patch: give them to the RectifID sampler directly")
    n = int(steps) or None
    if FLOW_KINDS[flow_type] == EULER_VELOCITY:
        if prediction_type not in ("auto", "velocity"):
            raise ValueError(f"{flow_type} predicts velocity; prediction_type {prediction_type!r} only applies to "
                             "PeRFlow (keep auto)")
        return CheckpointFlow(EULER_VELOCITY, steps=n or DEFAULT_WINDOWS, num_train_timesteps=sampling.num_timesteps)
    pred = _auto_prediction(model, sampling) if prediction_type == "auto" else prediction_type
    abar = None if pred == "velocity" else _sd_alphas_cumprod(sampling)
    return CheckpointFlow(pred, steps=n, num_windows=DEFAULT_WINDOWS, alphas_cumprod=abar,
                          num_train_timesteps=sampling.num_timesteps)


def patch_model(model: Any, flow: CheckpointFlow) -> Any:
    """A clone of `model` sampled as `flow` (model_sampling patch) carrying its step rule for the RectifID SAMPLER."""
    patched = model.clone()
    patched.add_object_patch("model_sampling", _flow_sampling_class()(flow))
    patched.model_options[STEP_RULE_KEY] = flow
    return patched


def flow_sigmas(flow: CheckpointFlow) -> torch.Tensor:
    """The flow's sigmas as ComfyUI's SIGMAS (float32 on the CPU, like its schedulers' output)."""
    return torch.tensor(flow.sigmas, dtype=torch.float32)
