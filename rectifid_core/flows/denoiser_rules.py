"""PeRFlow, 2-rectified flow and InstaFlow as Euler steps in a flow-matching sigma space.

Why this mapping: each of these SD-family flows is an ODE in its own time t (1 = noise,
0 = data) whose UNet is called on the state z itself at timestep t*T and whose steps are
z + (t' - t) * v. With sigma = t that is ComfyUI's flow-matching ("CONST") parameterization
with multiplier T: the model input is x = z unscaled, the timestep is sigma*T, and an Euler
step x + (sigma' - sigma) (x - x0) / sigma is the flow's step exactly when the model returns
x0 = x - sigma * v. `CheckpointFlow.denoised` turns the UNet's raw output into that x0 (eps
windows through PeRFlow's window velocity, velocity outputs as they are, 2-RF/InstaFlow's
data-minus-noise velocity with its sign flipped), and `CheckpointFlow(sigmas)` is the step rule
over it: Euler steps at the flow's own sigmas t_j with the windows' anchor coefficients.

ComfyUI's EPS space (x = z * sqrt(1 + sigma^2)) cannot hold these flows: its timestep(sigma)
rounds to the integer timesteps 0..999, so PeRFlow's and the Euler flows' first timestep 1000
(and 2-RF's 666.67 at 3 steps) would reach the UNet changed, and an ordinary sampler's DDIM
step there is not PeRFlow's window step. Here no state mapping is needed (start and finish
are the identity), and ComfyUI's own euler sampler reproduces the flow's unguided sample.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .denoiser import EulerSigmas, check_sigmas
from .schedule import (PERFLOW_PREDICTIONS, euler_timesteps, perflow_substeps, perflow_velocity, perflow_window,
                       window_alphas, window_anchor_coefficient, window_bounds)

EULER_VELOCITY = "euler_velocity"
# sigma tolerance when matching a sampler's sigmas (float32 at most: 6e-8 below 1) to the flow's own
_SIGMA_ATOL = 1e-6
# timestep tolerance when snapping sigma*T onto a step's exact timestep (far below one timestep)
_TIMESTEP_ATOL = 1e-3


class CheckpointFlow:
    """The window rule of one SD-family flow in flow-matching sigma space (sigma = t = timestep / T).

    prediction_type: "diff_eps" / "ddim_eps" / "velocity" for PeRFlow, "euler_velocity" for
    2-RF / InstaFlow (UNets predicting data - noise, called at t = (1 - i/N) T). Calling it with
    a sampler's sigmas returns the step rule, and refuses sigmas that are not the flow's own.
    """

    def __init__(self, prediction_type: str, steps: int | None = None, num_windows: int = 4,
                 alphas_cumprod: torch.Tensor | Sequence[float] | None = None, num_train_timesteps: int = 1000) -> None:
        if prediction_type not in (*PERFLOW_PREDICTIONS, EULER_VELOCITY):
            raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of "
                             f"{', '.join((*PERFLOW_PREDICTIONS, EULER_VELOCITY))}")
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        steps = num_windows if steps is None else int(steps)
        if prediction_type == EULER_VELOCITY:  # one window per step
            self.num_windows = steps
            self.timesteps = euler_timesteps(steps, self.num_train_timesteps)
            self.coefficients = [1.0] * steps
            self._window_ends: list[tuple[float, float, float, float]] = []
        else:
            self.num_windows = int(num_windows)
            substeps = perflow_substeps(self.num_windows, steps, self.num_train_timesteps)  # refuses bad steps
            self.timesteps = [float(sub.timestep) for sub in substeps]
            self._window_ends = self._windows(alphas_cumprod)
            self.coefficients = [1.0 if prediction_type == "velocity" else
                                 window_anchor_coefficient(prediction_type, *self._window_ends[sub.window][2:])
                                 for sub in substeps]
        self.num_steps = len(self.timesteps)
        self.sigmas = [t / self.num_train_timesteps for t in self.timesteps] + [0.0]

    def _windows(self, alphas_cumprod: torch.Tensor | Sequence[float] | None
                 ) -> list[tuple[float, float, float, float]]:
        """(t_s, t_e, abar_s, abar_e) per window as floats; eps windows need the diffusion schedule."""
        if self.prediction_type == "velocity":
            return []
        if alphas_cumprod is None:
            raise ValueError(f"PeRFlow {self.prediction_type} windows need the diffusion schedule's alphas_cumprod")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.shape != (self.num_train_timesteps,):
            raise ValueError(f"alphas_cumprod has shape {tuple(abar.shape)}; expected ({self.num_train_timesteps},)")
        return [(*window_bounds(k, self.num_windows), *window_alphas(abar, k, self.num_windows))
                for k in range(self.num_windows)]

    def describe(self) -> str:
        kind = "2-RF / InstaFlow Euler velocity" if self.prediction_type == EULER_VELOCITY else \
            f"PeRFlow {self.prediction_type}, {self.num_windows} windows"
        return f"{kind}, {self.num_steps} steps at timesteps {[round(t, 3) for t in self.timesteps]}"

    def anchor_coefficients(self) -> list[float]:
        """c per step: the anchor coefficient of the window that holds the step (as our backends)."""
        return list(self.coefficients)

    def __call__(self, sigmas: Sequence[float]) -> EulerSigmas:
        """The step rule for a sampler's `sigmas`, which must be this flow's own (`self.sigmas`)."""
        got = check_sigmas([float(s) for s in sigmas])
        if len(got) != len(self.sigmas) or any(abs(a - b) > _SIGMA_ATOL for a, b in zip(got, self.sigmas)):
            raise ValueError(
                f"the sampler got {len(got) - 1} steps at sigmas {[round(s, 6) for s in got]}, but this MODEL runs "
                f"{self.describe()}, i.e. sigmas {[round(s, 6) for s in self.sigmas]}: connect the SIGMAS output of "
                "'RectifID Checkpoint Flow' to the sampler (or set its steps to match your scheduler)")
        return EulerSigmas(self.sigmas, self.coefficients)

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The UNet timestep for sigma: sigma*T, snapped onto a step's exact timestep when within 1e-3 of it.

        So float32 sigmas (0.7 -> 699.99998) reach the UNet as the timestep our backend passes.
        """
        t = sigma.double() * self.num_train_timesteps
        known = torch.tensor(self.timesteps, dtype=torch.float64, device=sigma.device)
        dist = (t.reshape(-1, 1) - known).abs()
        nearest = dist.argmin(dim=1)
        close = dist.gather(1, nearest[:, None])[:, 0] < _TIMESTEP_ATOL
        snapped = torch.where(close, known[nearest], t.reshape(-1))
        return snapped.reshape(sigma.shape).to(sigma.dtype)

    def velocity(self, output: torch.Tensor, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """dz/dt at sigma = t from the UNet's raw output (time runs from 1 to 0)."""
        if self.prediction_type == EULER_VELOCITY:
            return -output  # 2-RF / InstaFlow predict data - noise, the direction of decreasing t
        if self.prediction_type == "velocity":
            return output
        t = float(self.model_timestep(torch.tensor([sigma], dtype=torch.float64))[0]) / self.num_train_timesteps
        t_s, t_e, abar_s, abar_e = self._window_ends[perflow_window(t, self.num_windows)]
        return perflow_velocity(output, z, self.prediction_type, t, t_s, t_e, abar_s, abar_e)

    def denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 = x - sigma * v: what a k-diffusion sampler expects, so its Euler step is the flow's step.

        `sigma` is one value per batch row (ComfyUI batches CFG halves at one sigma); sigma 0 is data.
        """
        values = sigma.reshape(-1).tolist()
        if len(values) == 1 or all(v == values[0] for v in values):
            return x if values[0] == 0 else x - values[0] * self.velocity(output, x, values[0])
        if len(values) != x.shape[0]:
            raise ValueError(f"got {len(values)} sigmas for a batch of {x.shape[0]}")
        return torch.cat([self.denoised(output[i:i + 1], x[i:i + 1], sigma.reshape(-1)[i:i + 1])
                          for i in range(len(values))])

