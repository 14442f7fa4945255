"""A rectified flow over any denoiser callable, in the sigma space of k-diffusion samplers.

ComfyUI (and k-diffusion) hand a sampler `model(x, sigma)`: the guided estimate of the
clean latent, with prompts, CFG, LoRA patches and the model's parameterization already
applied. Written over that callable, one Euler step is x + (sigma' - sigma) * (x - x0) / sigma:
for flow-matching models (x = (1 - sigma) x0 + sigma n) it is the velocity Euler step
FLUX.1-schnell and SD3.5 Turbo are sampled with; for eps models in ComfyUI's variance-exploding
space (x = x0 + sigma n) it is the DDIM jump. The math lives here, free of ComfyUI, so the
same solver drives a ComfyUI MODEL and our own backends.

The ComfyUI hook: a MODEL whose ModelPatcher carries `model_options["rectifid_step_rule"]` is
sampled with that rule instead of `EulerSigmas`. The value is a callable
`(sigmas: list[float]) -> StepRule`, called with the sigmas the SAMPLER receives, that refuses
sigmas its rule cannot run (`denoiser_rules.CheckpointFlow` is one: PeRFlow / 2-RF / InstaFlow).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .base import Conditioning, RectifiedFlow

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Sigmas as Python floats, refused unless strictly decreasing, finite and positive before the last (>= 0)."""
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(f"need at least 2 sigmas (one step), got {len(values)}; connect a scheduler with steps >= 1")
    if not all(math.isfinite(s) for s in values):
        raise ValueError(f"the sigmas must be finite, got {values}")
    if values[-1] < 0 or any(s <= 0 for s in values[:-1]):
        raise ValueError(f"every sigma but the last must be > 0 and the last >= 0, got {values}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"the sigmas must decrease strictly (noise first), got {values}")
    return values


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step in sigma space from the denoised estimate x0 (k-diffusion's `to_d` times the step)."""
    return x + (sigma_next - sigma) / sigma * (x - x0)


class StepRule(Protocol):
    """How one step advances the flow's state from the denoiser, and what the solver needs to anchor it.

    `start`/`finish` map between the sampler's x and the rule's own state (identity for Euler rules).
    """

    num_steps: int

    def step(self, z: torch.Tensor, i: int, denoise: Denoiser) -> torch.Tensor: ...

    def anchor_coefficients(self) -> list[float]: ...

    def start(self, x: torch.Tensor) -> torch.Tensor: ...

    def finish(self, z: torch.Tensor) -> torch.Tensor: ...


StepRuleFactory = Callable[[list[float]], StepRule]


class EulerSigmas:
    """Euler steps between consecutive sigmas: flow-matching models, and DDIM for eps models.

    `coefficients` are the anchor c per step (1 for a plain Euler flow; a windowed flow whose
    steps are Euler steps in its own sigma space, as PeRFlow's, passes its windows' c).
    """

    def __init__(self, sigmas: Sequence[float], coefficients: Sequence[float] | None = None) -> None:
        self.sigmas = check_sigmas(sigmas)
        self.num_steps = len(self.sigmas) - 1
        self.coefficients = [1.0] * self.num_steps if coefficients is None else [float(c) for c in coefficients]
        if len(self.coefficients) != self.num_steps:
            raise ValueError(f"got {len(self.coefficients)} anchor coefficients for {self.num_steps} steps")

    def step(self, z: torch.Tensor, i: int, denoise: Denoiser) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        return euler_step(z, denoise(z, z.new_full((z.shape[0],), sigma)), sigma, sigma_next)

    def anchor_coefficients(self) -> list[float]:
        return list(self.coefficients)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        return z


class DenoiserFlow(RectifiedFlow):
    """A flow whose steps are `rule` over `denoise(x, sigma)`; `decode` maps the final state to an image.

    The prompts live inside the denoiser (ComfyUI's guider), so `encode` only records the batch.
    """

    def __init__(self, denoise: Denoiser, decode: Decoder, rule: StepRule, *, latent_channels: int,
                 vae_scale_factor: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.rule = rule
        self.num_windows = rule.num_steps
        self._denoise, self._decode = denoise, decode
        self.latent_channels, self.vae_scale_factor = int(latent_channels), int(vae_scale_factor)
        self.device, self.dtype = torch.device(device), dtype

    def encode(self, prompts: list[str], negative_prompts: list[str], guidance_scale: float) -> Conditioning:
        return Conditioning(batch=len(prompts), guidance_scale=guidance_scale)

    def conditioning(self, batch: int) -> Conditioning:
        """The (empty) conditioning for `batch` images: the denoiser carries the prompts."""
        return Conditioning(batch=int(batch), guidance_scale=1.0)

    def step(self, z: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"step index {i} is out of range for {self.num_windows} steps")
        return self.rule.step(z, i, self._denoise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._decode(z)

    def window_gammas(self) -> None:
        return None

    def window_anchor_coefficients(self) -> list[float]:
        return self.rule.anchor_coefficients()
