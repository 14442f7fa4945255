"""Offset update rules for the anchored fixed-point problem, kept apart from the rollout.

Every rule maps the current window offsets x = (Delta_1..Delta_K) and the anchored
step r(x) = (-c_k * s * ghat_k) to the next offsets. The plain anchored solver is
x <- x + r(x), a fixed-point iteration of G(x) = x + r(x); the accelerated rule
solves the same fixed-point problem with fewer evaluations of r (each evaluation
is a full rollout + backward, so iterations are what costs time):

  momentum  heavy ball on the offsets: v <- beta*v + r(x), x <- x + v. beta=0 is
            the anchored rule. The normalized step has a fixed length c*s, so
            the plain rule crawls while the gradient direction is stable; the
            velocity lengthens the step there (up to s/(1-beta)) and cancels
            where consecutive steps disagree.

benchmark/results/convergence.md compares it with the anchored rule. Anderson
acceleration (memory 2-5, regularized and safeguarded) was measured too and
dropped: on the toy benchmark it lagged the anchored rule for the first ~20
iterations and reached the anchored N=50 identity only after N=25
(benchmark/results/README.md has the numbers).
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
    """Heavy-ball momentum, one velocity per offset: anchored_momentum's rule, and noise_gd's on the noise."""

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.velocity: Offsets | None = None

    def __call__(self, offsets: Offsets, step: Offsets) -> Offsets:
        if self.velocity is None:
            self.velocity = [r.clone() for r in step]
        else:
            self.velocity = [self.beta * v + r for v, r in zip(self.velocity, step)]
        return [o + v for o, v in zip(offsets, self.velocity)]
