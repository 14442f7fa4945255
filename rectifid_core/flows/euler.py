"""Euler velocity flows: 2-rectified flow and InstaFlow (SD1.4/1.5 UNets fine-tuned to predict velocity)."""
from __future__ import annotations

import torch

from .base import Conditioning, FlowDefaults
from .schedule import euler_timesteps
from .stable_diffusion import StableDiffusionComponents, StableDiffusionFlow

# single_person.py l.39 guidance_scale = 1.5 (2RFlow) and l.50 size = 512; the 2-RF notebooks use 1.5 too
_DEFAULTS = FlowDefaults(512, 512, 1.5, "single_person.py l.39 guidance_scale = 1.5 (2RFlow), l.50 size = 512")


class EulerVelocityFlow(StableDiffusionFlow):
    """N Euler steps z += v/N with the model called at t = (1 - i/N) * 1000; one window per step."""

    def __init__(self, components: StableDiffusionComponents, num_windows: int = 4,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 num_train_timesteps: int = 1000) -> None:
        super().__init__(components, num_windows, device, dtype)
        self.num_train_timesteps = int(num_train_timesteps)

    def with_steps(self, num_steps: int) -> "EulerVelocityFlow":
        """The same models with `num_steps` Euler steps (any number >= 1: the flow is an ODE)."""
        if num_steps == self.num_steps:
            return self
        return EulerVelocityFlow(self.components, num_steps, self.device, self.dtype, self.num_train_timesteps)

    def defaults(self) -> FlowDefaults:
        return _DEFAULTS

    def window_gammas(self) -> None:
        return None

    def timesteps(self) -> list[float]:
        """Model timestep of every step (for display and checks)."""
        return euler_timesteps(self.num_windows, self.num_train_timesteps)

    def step(self, z: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"step index {i} is out of range for {self.num_windows} steps")
        t = self.timesteps()[i]
        return z + self.predict(z, t, cond) / self.num_windows
