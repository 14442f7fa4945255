"""A rectified flow over any denoiser callable, in the sigma space of k-diffusion samplers.

ComfyUI (and k-diffusion) hand a sampler `model(x, sigma)`: the guided estimate of the
clean latent, with prompts, CFG, LoRA patches and the model's parameterization already
applied. Written over that callable, one Euler step is x + (sigma' - sigma) * (x - x0) / sigma:
for flow-matching models (x = (1 - sigma) x0 + sigma n) it is the velocity Euler step
FLUX.1-schnell and SD3.5 Turbo are sampled with; for eps models in ComfyUI's variance-exploding
space (x = x0 + sigma n) it is the DDIM jump. The math lives here, free of ComfyUI, so the
same solver drives a ComfyUI MODEL and our own backends.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


class DenoiserFlow(RectifiedFlow):
    """Euler steps over `denoise(x, sigma)`, one step per pair of consecutive sigmas; `decode` maps the final x.

    The prompts live inside the denoiser (ComfyUI's guider), so `encode` only records the batch.
    `anchor` gives c per step (1 for an Euler flow, the default).
    """

    def __init__(self, denoise: Denoiser, decode: Decoder, sigmas: Sequence[float], *, latent_channels: int,
                 vae_scale_factor: int, device: torch.device | str, dtype: torch.dtype,
                 anchor: Sequence[float] | None = None) -> None:
        self.sigmas = check_sigmas(sigmas)
        self.num_windows = len(self.sigmas) - 1
        if anchor is not None and len(anchor) != self.num_windows:
            raise ValueError(f"got {len(anchor)} anchor coefficients for {self.num_windows} steps")
        self._anchor = [1.0] * self.num_windows if anchor is None else [float(c) for c in anchor]
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
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._denoise(z, z.new_full((z.shape[0],), sigma))
        return euler_step(z, x0, sigma, sigma_next)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._decode(z)

    def window_gammas(self) -> None:
        return None

    def window_anchor_coefficients(self) -> list[float]:
        return list(self._anchor)
