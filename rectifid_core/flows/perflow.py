"""PeRFlow (piecewise rectified flow) over a Stable Diffusion UNet: SD1.5, SD2.1 and SDXL."""
from __future__ import annotations

from typing import Any

import torch

from .base import Conditioning, FlowDefaults
from .schedule import (PERFLOW_PREDICTIONS, alphas_cumprod, betas_from_config, perflow_substeps, perflow_velocity,
                       window_alphas, window_anchor_coefficient, window_bounds, window_gamma)
from .stable_diffusion import StableDiffusionComponents, StableDiffusionFlow

# What the authors' scripts sample each PeRFlow checkpoint with (feifeiobama/RectifID):
_SD15 = FlowDefaults(512, 512, 3.0, "single_person.py l.46 guidance_scale = 3.0, l.50 size = 512 (PeRFlow SD1.5)")
_SD21 = FlowDefaults(768, 768, 4.5, "single_person.py l.47 # guidance_scale = 4.5, l.51 # size = 768, "
                                    "next to the commented perflow-sd21 velocity checkpoint (l.44-45)")
_SDXL = FlowDefaults(1024, 1024, 1.0, "single_person_sdxl.py l.42 guidance_scale = 1.0, l.45 size = 1024")


class PeRFlow(StableDiffusionFlow):
    """K trained straight windows; `steps` > K runs sub-steps inside them, as PeRFlow's scheduler does.

    Every sub-step is a guided step of its own (its own offset, the c of its window),
    as in the reference, whose callback fires after every scheduler step.
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
        # raises for steps the scheduler cannot run before the models are moved anywhere
        self._substeps = perflow_substeps(num_windows, steps, self.num_train_timesteps)
        self.alphas_cumprod = alphas_cumprod(betas_from_config(scheduler_config))
        # (t_s, t_e, abar_s, abar_e) per window as Python floats: read in every step, where a tensor read
        # would be a host sync (and a graph break under torch.compile)
        self._window_ends = [(*window_bounds(k, num_windows), *window_alphas(self.alphas_cumprod, k, num_windows))
                             for k in range(num_windows)]
        self.scheduler_config = dict(scheduler_config)
        super().__init__(components, num_windows, device, dtype)
        self.prediction_type = prediction_type

    @property
    def num_steps(self) -> int:
        return len(self._substeps)

    def step_windows(self) -> list[int]:
        return [sub.window for sub in self._substeps]

    def window_gammas(self) -> list[float]:
        return [window_gamma(self.alphas_cumprod, k, self.num_windows) for k in range(self.num_windows)]

    def with_steps(self, num_steps: int) -> "PeRFlow":
        """The same models and trained windows, run in `num_steps` steps (sub-steps inside the windows)."""
        if num_steps == self.num_steps:
            return self
        return PeRFlow(self.components, self.scheduler_config, self.prediction_type, self.num_windows,
                       num_steps, self.device, self.dtype)

    def defaults(self) -> FlowDefaults:
        if self.is_sdxl:
            return _SDXL
        return _SD21 if self.prediction_type == "velocity" else _SD15

    def window_anchor_coefficients(self) -> list[float]:
        """c_k per prediction type (schedule.window_anchor_coefficient: diff_eps, ddim_eps, velocity)."""
        return [window_anchor_coefficient(self.prediction_type, abar_s, abar_e)
                for _, _, abar_s, abar_e in self._window_ends]

    def timesteps(self) -> list[list[int]]:
        """Model timesteps of every window (for display and checks)."""
        return [[s.timestep for s in self._substeps if s.window == k] for k in range(self.num_windows)]

    def step(self, z: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step index {i} is out of range for {self.num_steps} steps")
        sub = self._substeps[i]
        t_s, t_e, abar_s, abar_e = self._window_ends[sub.window]
        out = self.predict(z, sub.timestep, cond)
        t_c = sub.timestep / self.num_train_timesteps
        v = perflow_velocity(out, z, self.prediction_type, t_c, t_s, t_e, abar_s, abar_e)
        return z + sub.dt * v
