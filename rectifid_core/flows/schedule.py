"""Window math of piecewise rectified flow and Euler velocity flows, as pure functions.

Kept apart from the models (diffusers-scheduler style) so that every number the
backends use can be checked against an independent computation.

Time runs from 1 (noise) to 0 (data). PeRFlow splits it into K windows,
window k spanning t_s = (K-k)/K -> t_e = (K-k-1)/K, and predicts each window as
a straight line whose end point is parameterized by the diffusion schedule's
cumulative alphas at the two window ends. Sampling with more steps than
windows follows PeRFlow's released scheduler exactly: the steps are spread over
the windows (earlier windows take the remainder), sub-step timesteps are
`linspace(t_s, t_e, n, endpoint=False) * T` truncated to integers, and every
sub-step moves along the velocity implied by its prediction of the window end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PERFLOW_PREDICTIONS = ("diff_eps", "ddim_eps", "velocity")


def betas_from_config(config: dict[str, Any]) -> torch.Tensor:
    """The diffusion betas a scheduler config describes (float64, length num_train_timesteps)."""
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    schedule = config.get("beta_schedule", "scaled_linear")
    start = float(config.get("beta_start", 0.00085))
    end = float(config.get("beta_end", 0.012))
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if schedule == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
                            dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {schedule!r} in the scheduler config; "
                     "expected scaled_linear, linear or squaredcos_cap_v2")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{i<=t} (1 - beta_i)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def window_bounds(k: int, num_windows: int) -> tuple[float, float]:
    """(t_s, t_e) of window k; time 1 is pure noise, 0 is data."""
    if not 0 <= k < num_windows:
        raise IndexError(f"window index {k} is out of range for {num_windows} windows")
    return (num_windows - k) / num_windows, (num_windows - k - 1) / num_windows


def _train_index(t: float, num_train_timesteps: int) -> int:
    # The small guard keeps e.g. t=0.7 (700.0000000001 or 699.9999999) on index 699.
    return max(int(math.floor(t * num_train_timesteps - 1 + 1e-6)), 0)


def window_alphas(abar: torch.Tensor, k: int, num_windows: int) -> tuple[float, float]:
    """(abar_s, abar_e) at the two ends of window k: abar[t_s*T - 1], abar[max(t_e*T - 1, 0)]."""
    t_s, t_e = window_bounds(k, num_windows)
    n = abar.shape[0]
    return float(abar[_train_index(t_s, n)]), float(abar[_train_index(t_e, n)])


def window_gamma(abar: torch.Tensor, k: int, num_windows: int) -> float:
    """gamma_k = sqrt(abar_s / abar_e): how much signal window k adds."""
    abar_s, abar_e = window_alphas(abar, k, num_windows)
    return math.sqrt(abar_s / abar_e)


def _spread_timesteps(num_windows: int, steps: int, num_train_timesteps: int) -> list[list[int]]:
    per_window = []
    for k in range(num_windows):
        n = steps // num_windows + (1 if k < steps % num_windows else 0)
        t_s, t_e = window_bounds(k, num_windows)
        ts = np.linspace(t_s, t_e, num=n, endpoint=False) * num_train_timesteps
        per_window.append([int(t) for t in ts.astype(np.int64)])
    return per_window


def _distinct(per_window: list[list[int]]) -> bool:
    flat = [t for ts in per_window for t in ts]
    return all(a > b for a, b in zip(flat, flat[1:]))


def perflow_timesteps(num_windows: int, steps: int, num_train_timesteps: int = 1000) -> list[list[int]]:
    """Integer model timesteps per window; the first window(s) take the remainder of steps/K.

    Refuses what PeRFlow's scheduler cannot run: fewer steps than trained windows (it
    would silently run K steps instead) and so many steps that two of them truncate to
    the same integer timestep (its step lookup by timestep then breaks).
    """
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    if steps < num_windows:
        raise ValueError(f"steps ({steps}) must be >= num_windows ({num_windows}): this PeRFlow was trained with "
                         f"{num_windows} windows and every window needs at least one model call; use {num_windows} "
                         f"steps (or more, which split the windows into sub-steps)")
    per_window = _spread_timesteps(num_windows, steps, num_train_timesteps)
    if not _distinct(per_window):
        most = next(n for n in range(steps - 1, num_windows - 1, -1)
                    if _distinct(_spread_timesteps(num_windows, n, num_train_timesteps)))
        raise ValueError(f"{steps} steps put two sub-steps on the same integer model timestep, which PeRFlow's "
                         f"scheduler cannot run; use at most {most} steps")
    return per_window


@dataclass(frozen=True)
class SubStep:
    """One model call of a PeRFlow pass: its window, the model timestep and the time increment dt (< 0)."""

    window: int
    timestep: int
    dt: float


def perflow_substeps(num_windows: int, steps: int, num_train_timesteps: int = 1000) -> list[SubStep]:
    """Every model call of a `steps`-step pass in order; each moves to the next timestep (0 after the last).

    The window of a sub-step is the one whose linspace produced it, which is the window
    PeRFlow's `get_window_alpha` looks up from that timestep.
    """
    per_window = perflow_timesteps(num_windows, steps, num_train_timesteps)
    flat = [(k, t) for k, ts in enumerate(per_window) for t in ts]
    nexts = [t for _, t in flat[1:]] + [0]
    return [SubStep(window=k, timestep=t, dt=(nxt - t) / num_train_timesteps) for (k, t), nxt in zip(flat, nexts)]


def perflow_window(t: float, num_windows: int) -> int:
    """The window (0-based) holding time t in (0, 1]: window k spans (t_e, t_s], so a window's start is its own.

    This is the window `perflow_substeps` assigns to a sub-step at timestep t*T (the window
    whose linspace produced it); the small guard keeps e.g. 0.7*4 = 2.8000000000000003 exact.
    """
    if not 0.0 < t <= 1.0 + 1e-9:
        raise ValueError(f"time {t} is outside PeRFlow's (0, 1]: the model is evaluated before the data end")
    return min(max(num_windows - math.ceil(t * num_windows - 1e-9), 0), num_windows - 1)


def window_anchor_coefficient(prediction_type: str, abar_s: float, abar_e: float) -> float:
    """The c_k of the anchored update for one window, as the released code derives it.

    diff_eps: |eta|/lambda = sqrt(1 - gamma^2) (the SD1.5 script's documented fix);
    ddim_eps: (sqrt(1-abar_e) + sqrt(abar_e/abar_s*(1-abar_s))) / lambda (the SDXL script);
    velocity: 1, the window is an Euler step in velocity like a plain rectified flow.
    """
    if prediction_type == "diff_eps":
        return math.sqrt(max(0.0, 1.0 - abar_s / abar_e))
    if prediction_type == "ddim_eps":
        lam = math.sqrt(abar_e / abar_s)
        return (math.sqrt(1.0 - abar_e) + math.sqrt(abar_e / abar_s * (1.0 - abar_s))) / lam
    if prediction_type == "velocity":
        return 1.0
    raise ValueError(f"unknown PeRFlow prediction type {prediction_type!r}; "
                     f"expected one of {', '.join(PERFLOW_PREDICTIONS)}")


def window_end_coefficients(prediction_type: str, abar_s: float, abar_e: float) -> tuple[float, float]:
    """(lambda, eta) with z_e = lambda * z_s + eta * eps for an eps-parameterized window.

    diff_eps: z_e = z_s/gamma - sqrt(1-gamma^2)/gamma * eps (gamma = sqrt(abar_s/abar_e));
    ddim_eps: the deterministic DDIM jump from abar_s to abar_e.
    """
    lam = math.sqrt(abar_e / abar_s)
    if prediction_type == "diff_eps":
        gamma = 1.0 / lam
        return lam, -math.sqrt(1.0 - gamma**2) / gamma
    if prediction_type == "ddim_eps":
        return lam, math.sqrt(1.0 - abar_e) - math.sqrt(abar_e / abar_s * (1.0 - abar_s))
    raise ValueError(f"no window-end coefficients for prediction type {prediction_type!r}; "
                     "expected diff_eps or ddim_eps")


def perflow_velocity(model_output: torch.Tensor, z: torch.Tensor, prediction_type: str,
                     t_c: float, t_s: float, t_e: float, abar_s: float, abar_e: float) -> torch.Tensor:
    """Velocity dz/dt at time t_c inside window (t_s, t_e) from the model's prediction.

    For eps predictions the point z at t_c lies on the window's straight line, so
    the window end follows from z and eps with coefficients interpolated between
    the window start (t_c = t_s) and its end; the velocity is the chord to it.
    """
    if prediction_type == "velocity":
        return model_output
    lam_s, eta_s = window_end_coefficients(prediction_type, abar_s, abar_e)
    denom = lam_s * (t_c - t_s) + (t_e - t_c)
    lam_t = lam_s * (t_e - t_s) / denom
    eta_t = eta_s * (t_e - t_c) / denom
    z_end = lam_t * z + eta_t * model_output
    return (z_end - z) / (t_e - t_c)


def euler_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[float]:
    """Model timesteps of an N-step Euler velocity flow (2-rectified flow / InstaFlow): (1 - i/N) * T."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [(1.0 - i / steps) * num_train_timesteps for i in range(steps)]


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond)."""
    return uncond + guidance_scale * (cond - uncond)
