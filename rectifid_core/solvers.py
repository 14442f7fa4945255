"""Offset update rules for the anchored fixed-point problem, kept apart from the rollout.

Every rule maps the current window offsets x = (Delta_1..Delta_K) and the anchored
step r(x) = (-c_k * s * ghat_k) to the next offsets. The plain anchored solver is
x <- x + r(x), a fixed-point iteration of G(x) = x + r(x); the accelerated rules
solve the same fixed-point problem with fewer evaluations of r (each evaluation
is a full rollout + backward, so iterations are what costs time):

  momentum  heavy ball on the offsets: v <- beta*v + r(x), x <- x + v. beta=0 is
            the anchored rule. The normalized step has a fixed length c*s, so
            the plain rule crawls while the gradient direction is stable; the
            velocity lengthens the step there (up to s/(1-beta)) and cancels
            where consecutive steps disagree.
  anderson  Anderson acceleration (type II, memory m): mixes the last m iterates
            so that the predicted residual is smallest (least squares per image,
            so images of one batch stay independent). m=0 is the anchored rule.

benchmark/results/convergence.md compares both with the anchored rule.
"""
from __future__ import annotations

from typing import Callable

import torch

Offsets = list[torch.Tensor]
UpdateRule = Callable[[Offsets, Offsets], Offsets]


def anchored_update(offsets: Offsets, step: Offsets) -> Offsets:
    """Accumulate the step on top of the previous anchor (Eqs. 15-16)."""
    return [o + r for o, r in zip(offsets, step)]


def unanchored_update(offsets: Offsets, step: Offsets) -> Offsets:
    """Plain fixed point of Eq. 8: only the current guidance step survives."""
    return [r.clone() for r in step]


class MomentumUpdate:
    """Heavy-ball acceleration of the anchored rule, one velocity per window offset."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"offset momentum must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.velocity: Offsets | None = None

    def __call__(self, offsets: Offsets, step: Offsets) -> Offsets:
        if self.velocity is None:
            self.velocity = [r.clone() for r in step]
        else:
            self.velocity = [self.beta * v + r for v, r in zip(self.velocity, step)]
        return [o + v for o, v in zip(offsets, self.velocity)]


def _flat(parts: Offsets) -> torch.Tensor:
    """[B, sum of per-window sizes]: one row per image, all windows side by side."""
    return torch.cat([p.flatten(1) for p in parts], dim=1)


def _unflat(flat: torch.Tensor, like: Offsets) -> Offsets:
    out, i = [], 0
    for p in like:
        n = p[0].numel()
        out.append(flat[:, i:i + n].reshape(p.shape))
        i += n
    return out


class AndersonUpdate:
    """Anderson acceleration of x <- x + r(x) with memory m, regularized and safeguarded.

    With residual differences dR and iterate differences dX of the last m steps,
    gamma = argmin ||r - dR gamma||^2 + ridge*||r||^2*||gamma||^2 (per image) and
    x <- x + r - (dX + dR) gamma. The ridge is relative to ||r||^2 because the
    normalized guidance steps keep ||r|| near c*s even far from the solution, where
    consecutive residuals are nearly equal (dR ~ 0) and the unregularized mix would
    extrapolate wildly; the mix then falls back to the plain step. A mixed step
    longer than `max_growth` plain steps restarts the history with a plain step.
    """

    def __init__(self, memory: int, ridge: float = 0.1, max_growth: float = 100.0) -> None:
        if not isinstance(memory, int) or memory < 0:
            raise ValueError(f"Anderson memory must be an integer >= 0, got {memory!r}")
        self.memory = memory
        self.ridge = float(ridge)
        self.max_growth = float(max_growth)
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dx: list[torch.Tensor] = []
        self.dr: list[torch.Tensor] = []

    def __call__(self, offsets: Offsets, step: Offsets) -> Offsets:
        x, r = _flat(offsets), _flat(step)
        if self.prev is not None and self.memory > 0:
            self.dx.append(x - self.prev[0])
            self.dr.append(r - self.prev[1])
            del self.dx[:-self.memory], self.dr[:-self.memory]
        self.prev = (x, r)
        if not self.dr:
            return _unflat(x + r, offsets)
        dx, dr = torch.stack(self.dx, dim=2), torch.stack(self.dr, dim=2)  # [B, D, m]
        r_sq = r.square().sum(dim=1)  # [B]
        eye = torch.eye(dr.shape[-1], dtype=dr.dtype, device=dr.device)
        gram = dr.transpose(1, 2) @ dr
        # the eps term keeps the system solvable at an exact fixed point (r = 0, dR = 0)
        floor = torch.finfo(dr.dtype).eps * (gram.diagonal(dim1=1, dim2=2).sum(1) + r_sq) + torch.finfo(dr.dtype).tiny
        gram = gram + (self.ridge * r_sq + floor).view(-1, 1, 1) * eye  # [B, m, m]
        gamma = torch.linalg.solve(gram, dr.transpose(1, 2) @ r.unsqueeze(2))  # [B, m, 1]
        move = r - ((dx + dr) @ gamma).squeeze(2)
        wild = move.square().sum(dim=1) > self.max_growth**2 * r_sq  # [B]
        if bool(wild.any()):
            move = torch.where(wild.view(-1, 1), r, move)
            keep = (~wild).to(dx.dtype).view(-1, 1)
            self.dx = [d * keep for d in self.dx]
            self.dr = [d * keep for d in self.dr]
        return _unflat(x + move, offsets)
