"""Euler velocity flows: 2-rectified flow and InstaFlow (SD1.4/1.5 UNets fine-tuned to predict velocity)."""
from __future__ import annotations

import torch

from .base import Conditioning
from .schedule import euler_timesteps
from .stable_diffusion import StableDiffusionComponents, StableDiffusionFlow


class EulerVelocityFlow(StableDiffusionFlow):
    """N Euler steps z += v/N with the model called at t = (1 - i/N) * 1000; one window per step."""

    def __init__(self, components: StableDiffusionComponents, num_windows: int = 4,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 num_train_timesteps: int = 1000) -> None:
        super().__init__(components, num_windows, device, dtype)
        self.num_train_timesteps = int(num_train_timesteps)

    @property
    def steps(self) -> int:
        """Model calls per sample; one per window for an Euler flow."""
        return self.num_windows

    def with_windows(self, num_windows: int) -> "EulerVelocityFlow":
        """The same models with `num_windows` Euler steps."""
        return EulerVelocityFlow(self.components, num_windows, self.device, self.dtype, self.num_train_timesteps)

    def window_gammas(self) -> None:
        return None

    def timesteps(self) -> list[float]:
        """Model timestep of every window (for display and checks)."""
        return euler_timesteps(self.num_windows, self.num_train_timesteps)

    def step(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        if not 0 <= k < self.num_windows:
            raise IndexError(f"window index {k} is out of range for {self.num_windows} windows")
        t = self.timesteps()[k]
        return z + self.predict(z, t, cond) / self.num_windows
