"""A linear test flow (z -> a_k z per window, decode = identity) and a quadratic objective.

Every gradient is known in closed form, so solver updates can be recomputed by hand.
`directions` (optional, one tensor per window) is what the flow reports as the prompt's
displacement over each window, for parallel rescaling.
"""
from __future__ import annotations

import torch

from rectifid_core.flows.base import Conditioning, RectifiedFlow


class LinearFlow(RectifiedFlow):
    latent_channels = 3
    vae_scale_factor = 1
    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self, gains: tuple[float, ...] = (0.9, 1.1, 0.8), directions: list[torch.Tensor] | None = None):
        self.gains = gains
        self.num_windows = len(gains)
        self.directions = directions
        self.direction_calls: list[torch.Tensor] = []

    def encode(self, prompts, negative_prompts, guidance_scale):
        return Conditioning(batch=len(prompts), guidance_scale=guidance_scale)

    def step(self, z, k, cond):
        return self.gains[k] * z

    def decode(self, z):
        return z

    def window_gammas(self):
        return None

    def prompt_direction(self, z, k, cond):
        self.direction_calls.append(z.detach().clone())
        return self.directions[k].expand_as(z)


def quadratic(target: torch.Tensor, weight: float = 0.01):
    """weight * ||image - target||^2 per image; a small weight keeps ||g|| < 1 (normalization inactive)."""
    return lambda image: weight * ((image - target) ** 2).flatten(1).sum(1)
