"""PeRFlow (piecewise rectified flow) over a Stable Diffusion UNet: SD1.5, SD2.1 and SDXL."""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import Conditioning
from .schedule import (PERFLOW_PREDICTIONS, alphas_cumprod, betas_from_config, perflow_velocity, window_alphas,
                       window_bounds, window_gamma, window_substeps)
from .stable_diffusion import StableDiffusionComponents, StableDiffusionFlow


class PeRFlow(StableDiffusionFlow):
    """K straight windows; `steps` > K splits each window into sub-steps as PeRFlow's scheduler does.

    prediction_type: "diff_eps" (SD1.5 checkpoints), "ddim_eps" (SDXL), "velocity" (SD2.1).
    """

    def __init__(self, components: StableDiffusionComponents, scheduler_config: dict[str, Any],
                 prediction_type: str, num_windows: int = 4, steps: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if prediction_type not in PERFLOW_PREDICTIONS:
            raise ValueError(f"unknown PeRFlow prediction type {prediction_type!r}; "
                             f"expected one of {', '.join(PERFLOW_PREDICTIONS)}")
        steps = num_windows if steps is None else int(steps)
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        # raises for steps < num_windows before the models are moved anywhere
        self._substeps = [window_substeps(k, num_windows, steps, self.num_train_timesteps)
                          for k in range(num_windows)]
        self.alphas_cumprod = alphas_cumprod(betas_from_config(scheduler_config))
        self.scheduler_config = dict(scheduler_config)
        super().__init__(components, num_windows, device, dtype)
        self.prediction_type = prediction_type
        self.steps = steps

    def window_gammas(self) -> list[float]:
        return [window_gamma(self.alphas_cumprod, k, self.num_windows) for k in range(self.num_windows)]

    def with_windows(self, num_windows: int) -> "PeRFlow":
        """The same models in `num_windows` windows, keeping the model calls per window."""
        per_window = max(1, self.steps // self.num_windows)
        return PeRFlow(self.components, self.scheduler_config, self.prediction_type, num_windows,
                       num_windows * per_window, self.device, self.dtype)

    def anchor_coefficients(self) -> list[float]:
        """c_k per prediction type, as the released code derives it from the window coefficients.

        diff_eps: |eta|/lambda = sqrt(1 - gamma^2) (the SD1.5 script's documented fix);
        ddim_eps: (sqrt(1-abar_e) + sqrt(abar_e/abar_s*(1-abar_s))) / lambda (the SDXL script);
        velocity: 1, the window is an Euler step in velocity like a plain rectified flow.
        """
        if self.prediction_type == "diff_eps":
            return super().anchor_coefficients()
        if self.prediction_type == "velocity":
            return [1.0] * self.num_windows
        coefficients = []
        for k in range(self.num_windows):
            abar_s, abar_e = window_alphas(self.alphas_cumprod, k, self.num_windows)
            lam = math.sqrt(abar_e / abar_s)
            coefficients.append((math.sqrt(1.0 - abar_e) + math.sqrt(abar_e / abar_s * (1.0 - abar_s))) / lam)
        return coefficients

    def timesteps(self) -> list[list[int]]:
        """Model timesteps of every window (for display and checks)."""
        return [[s.timestep for s in subs] for subs in self._substeps]

    def step(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        t_s, t_e = window_bounds(k, self.num_windows)
        abar_s, abar_e = window_alphas(self.alphas_cumprod, k, self.num_windows)
        for sub in self._substeps[k]:
            out = self.predict(z, sub.timestep, cond)
            t_c = sub.timestep / self.num_train_timesteps
            v = perflow_velocity(out, z, self.prediction_type, t_c, t_s, t_e, abar_s, abar_e)
            z = z + sub.dt * v
        return z
