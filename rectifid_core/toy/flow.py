"""The toy digits flow as a `RectifiedFlow`: K Euler windows, class prompts, CFG inside a step."""
from __future__ import annotations

import re

import torch

from ..flows.base import Conditioning, RectifiedFlow
from .data import NUM_CLASSES
from .models import NULL_CLASS, VelocityNet

_PROMPT = re.compile(r"^\s*(?:(?:a|an|the)\s+)?(?:digit\s+|number\s+)?([0-9])\s*$", re.IGNORECASE)


def parse_class(prompt: str, allow_empty: bool = False) -> int:
    """'3', 'digit 3', 'a 3' -> 3; '' -> the null class when allowed (an empty negative prompt)."""
    if allow_empty and not prompt.strip():
        return NULL_CLASS
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"the digits flow understands prompts like '3' or 'digit 3', got {prompt!r}")
    return int(match.group(1))


def cfg_velocity(net: VelocityNet, z: torch.Tensor, t: float, labels: torch.Tensor,
                 negative: torch.Tensor, scale: float) -> torch.Tensor:
    """v_neg + w (v_pos - v_neg), both branches in one batched call; w = 1 skips the negative."""
    tt = torch.full((z.shape[0],), float(t), device=z.device)
    if scale == 1.0:
        return net(z, tt, labels)
    v_pos, v_neg = net(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([labels, negative])).chunk(2)
    return v_neg + scale * (v_pos - v_neg)


def euler_sample(net: VelocityNet, noise: torch.Tensor, labels: torch.Tensor, negative: torch.Tensor,
                 scale: float, steps: int) -> torch.Tensor:
    """Uniform Euler from t=1 (noise) to t=0 (data); many steps give the flow's ODE endpoint."""
    z = noise
    for i in range(steps):
        t_s, t_e = 1.0 - i / steps, 1.0 - (i + 1) / steps
        z = z + (t_e - t_s) * cfg_velocity(net, z, t_s, labels, negative, scale)
    return z


class DigitFlow(RectifiedFlow):
    """Latent = the 8x8 digit itself in -1..1 ([B,1,8,8]); window k is one Euler step over 1/K of time."""

    latent_channels = 1
    vae_scale_factor = 1

    def __init__(self, net: VelocityNet, num_windows: int = 4) -> None:
        if num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        self.net = net.eval().requires_grad_(False)
        self.num_windows = num_windows
        self.device = next(net.parameters()).device
        self.dtype = next(net.parameters()).dtype

    def with_steps(self, num_steps: int) -> "DigitFlow":
        """The same network with `num_steps` Euler steps."""
        return self if num_steps == self.num_steps else DigitFlow(self.net, num_steps)

    def encode(self, prompts: list[str], negative_prompts: list[str], guidance_scale: float) -> Conditioning:
        if len(negative_prompts) not in (0, len(prompts)):
            raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        negatives = negative_prompts or [""] * len(prompts)
        labels = torch.tensor([parse_class(p) for p in prompts], device=self.device)
        negative = torch.tensor([parse_class(p, allow_empty=True) for p in negatives], device=self.device)
        return Conditioning(len(prompts), float(guidance_scale), {"labels": labels, "negative": negative})

    def step(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        if not 0 <= k < self.num_windows:
            raise IndexError(f"window {k} out of range for K={self.num_windows}")
        t_s = 1.0 - k / self.num_windows
        t_e = 1.0 - (k + 1) / self.num_windows
        v = cfg_velocity(self.net, z, t_s, cond.tensors["labels"], cond.tensors["negative"], cond.guidance_scale)
        return z + (t_e - t_s) * v

    def prompt_direction(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        """step(z | class) - step(z | negative class), both without CFG: dt * (v_cond - v_uncond)."""
        labels, negative = cond.tensors["labels"], cond.tensors["negative"]
        with_prompt = Conditioning(cond.batch, 1.0, {"labels": labels, "negative": negative})
        without = Conditioning(cond.batch, 1.0, {"labels": negative, "negative": negative})
        return self.step(z, k, with_prompt) - self.step(z, k, without)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((z + 1.0) / 2.0).clamp(0, 1).repeat(1, 3, 1, 1)

    def window_gammas(self) -> None:
        return None


def class_prompt(label: int) -> str:
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"digit class must be in 0..{NUM_CLASSES - 1}, got {label}")
    return f"digit {label}"
