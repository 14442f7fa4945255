"""Anchored classifier guidance (RectifID, Algorithm 1) and the paper's ablations.

The solver keeps one offset per window end, Delta_1..Delta_K, and rolls the flow
out as  zhat_0 = z_0,  zhat_{k+1} = Phi_k(zhat_k) + Delta_{k+1}.  One backward
pass gives g_k = dL/dzhat_k for every window start; the anchored update

    Delta_{k+1} <- Delta_{k+1} - c_k * s * g_k / max(||g_k||, 1)

applies the gradient taken at a window's start as an offset at that window's
end, accumulated on top of the (re-rolled) reference trajectory (Eqs. 15-16).
This is the update the released code performs; the paper's K=1 analysis is the
same rule with Phi the whole flow.

Modes (paper Sec. 4.3):
  anchored   the method above.
  no_anchor  plain fixed point of Eq. 8: the offset is only the current
             guidance step, nothing ties the solution to the previous anchor.
  noise_gd   DOODL / D-Flow style gradient descent on the initial noise
             (SGD, momentum, l2 pull toward the sampled noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .flows.base import Conditioning, RectifiedFlow
from .objectives.base import Objective, as_output

LEGACY_CK = 0.95796674  # the released SD1.5 code's constant for every window
SOLVER_MODES = ("anchored", "no_anchor", "noise_gd")
CK_MODES = ("per_window", "legacy", "one")


@dataclass
class GuidanceConfig:
    scale: float = 1.0
    iterations: int = 20
    mode: str = "anchored"
    ck_mode: str = "per_window"
    momentum: float = 0.9  # noise_gd only
    l2: float = 1.0  # noise_gd only

    def validate(self) -> None:
        if self.mode not in SOLVER_MODES:
            raise ValueError(f"unknown solver mode {self.mode!r}; choose one of {', '.join(SOLVER_MODES)}")
        if self.ck_mode not in CK_MODES:
            raise ValueError(f"unknown c_k mode {self.ck_mode!r}; choose one of {', '.join(CK_MODES)}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations N must be an integer >= 0, got {self.iterations!r}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"guidance scale s must be a finite number >= 0, got {self.scale!r}")


@dataclass
class IterationInfo:
    """What a caller sees after each iteration (for progress, previews, cancel)."""

    iteration: int
    iterations: int
    loss: float
    diagnostics: dict[str, Any]
    latent: torch.Tensor  # final latent the loss was computed on, before this update (detached)


@dataclass
class GuidanceResult:
    latent: torch.Tensor  # z_K, detached
    image: torch.Tensor  # [B,3,H,W] in 0..1
    losses: list[float] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: str | None = None  # why the loop ended before N, if it did


Callback = Callable[[IterationInfo], None]


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded Gaussian noise drawn on the CPU so a seed gives the same image on every device."""
    gen = torch.Generator("cpu").manual_seed(int(seed) % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def anchor_coefficients(flow: RectifiedFlow, ck_mode: str) -> list[float]:
    """c_k per window: sqrt(1-gamma_k^2) (intended), the released constant, or 1 (Euler flows)."""
    k = flow.num_windows
    if ck_mode == "legacy":
        return [LEGACY_CK] * k
    if ck_mode == "one":
        return [1.0] * k
    if ck_mode != "per_window":
        raise ValueError(f"unknown c_k mode {ck_mode!r}; choose one of {', '.join(CK_MODES)}")
    gammas = flow.window_gammas()
    if gammas is None:
        return [1.0] * k
    return [math.sqrt(max(0.0, 1.0 - g * g)) for g in gammas]


def normalize_window_grad(g: torch.Tensor) -> torch.Tensor:
    """g / max(||g||_2, 1), the norm taken per image over C*H*W (Karunratanakul et al.)."""
    norm = g.flatten(1).norm(dim=1).clamp(min=1.0)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def rollout(flow: RectifiedFlow, cond: Conditioning, z0: torch.Tensor,
            offsets: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Walk all windows applying the offsets; returns z_K and every window's input state."""
    z = z0
    starts = []
    for k in range(flow.num_windows):
        starts.append(z)
        z = flow.step(z, k, cond) + offsets[k].to(z.dtype)
    return z, starts


def _check_inputs(flow: RectifiedFlow, noise: torch.Tensor, cond: Conditioning) -> None:
    if flow.num_windows < 1:
        raise ValueError(f"the flow must have K >= 1 windows, got K={flow.num_windows}")
    if noise.dim() != 4 or noise.shape[0] != cond.batch:
        raise ValueError(
            f"noise shape {tuple(noise.shape)} does not match the prompt batch of {cond.batch} "
            f"(expected [{cond.batch}, C, H, W])"
        )


def guide(flow: RectifiedFlow, cond: Conditioning, objective: Objective, noise: torch.Tensor,
          config: GuidanceConfig, callback: Callback | None = None) -> GuidanceResult:
    """Run N guidance iterations, then one gradient-free pass that produces the output.

    An exception raised by `callback` propagates (nothing is returned), which is how
    callers cancel. A non-finite loss at the first iteration raises; later it ends
    the loop and the result keeps the last finite iterate.
    """
    config.validate()
    _check_inputs(flow, noise, cond)
    ck = anchor_coefficients(flow, config.ck_mode)
    z0 = noise.detach()
    work = torch.float32
    offsets = [torch.zeros_like(z0, dtype=work) for _ in range(flow.num_windows)]
    noise_offset = torch.zeros_like(z0, dtype=work)
    velocity = torch.zeros_like(z0, dtype=work)
    result = GuidanceResult(latent=z0, image=z0)

    for it in range(config.iterations):
        with torch.enable_grad():
            start = (z0.to(work) + noise_offset).to(z0.dtype).requires_grad_(True)
            z_final, starts = rollout(flow, cond, start, offsets)
            out = as_output(objective(flow.decode(z_final)))
            loss = out.loss.float().sum()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                if it == 0:
                    raise RuntimeError(
                        f"the objective returned a non-finite loss ({loss_value}) at the first iteration; "
                        "check the reference embedding and the model dtype (fp16 overflow?)"
                    )
                result.stopped_early = f"non-finite loss ({loss_value}) at iteration {it}; kept iteration {it - 1}"
                break
            grads = torch.autograd.grad(loss, starts)
        current = z_final.detach()
        del z_final, starts, loss
        if not all(torch.isfinite(g).all() for g in grads):
            if it == 0:
                raise RuntimeError("non-finite gradient at the first iteration; try fp32 or a smaller guidance scale")
            result.stopped_early = f"non-finite gradient at iteration {it}; kept iteration {it - 1}"
            break
        ghat = [normalize_window_grad(g.float()) for g in grads]
        del grads

        if config.mode == "anchored":
            for k in range(flow.num_windows):
                offsets[k] -= ck[k] * config.scale * ghat[k]
        elif config.mode == "no_anchor":
            for k in range(flow.num_windows):
                offsets[k] = -ck[k] * config.scale * ghat[k]
        else:  # noise_gd: SGD with momentum and l2 toward the sampled noise
            d = ghat[0] + config.l2 * noise_offset
            velocity = config.momentum * velocity + d
            noise_offset = noise_offset - config.scale * velocity

        result.losses.append(loss_value)
        result.diagnostics.append(out.diagnostics)
        if callback is not None:
            callback(IterationInfo(it, config.iterations, loss_value, out.diagnostics, current))

    with torch.no_grad():
        start = (z0.to(work) + noise_offset).to(z0.dtype)
        z_final, _ = rollout(flow, cond, start, offsets)
        result.latent = z_final.detach()
        result.image = flow.decode(z_final).detach().float().clamp(0, 1)
    return result
