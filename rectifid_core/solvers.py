"""Offset update rules of the guidance solver, kept apart from the rollout.

Every rule maps the current offsets x and a step r(x) to the next offsets. For the
window offsets (Delta_1..Delta_K) the step is -c_k * s * ghat_k; the plain anchored
solver is x <- x + r(x), a fixed-point iteration of G(x) = x + r(x); the accelerated
rule solves the same fixed-point problem with fewer evaluations of r (each one is a
full rollout + backward, so iterations are what costs time):

  momentum  heavy ball on the offsets: v <- beta*v + r(x), x <- x + v. beta=0 is
            the anchored rule. The normalized step has a fixed length c*s, so
            the plain rule crawls while the gradient direction is stable; the
            velocity lengthens the step there (up to s/(1-beta)) and cancels
            where consecutive steps disagree. The same rule with the raw
            gradient is noise_gd's SGD with momentum (torch.optim.SGD, dampening 0).

The toy benchmark (rectifid_core/toy/results/RESULTS.md) measures momentum against
the anchored rule over several test subsets and noise seeds. Anderson acceleration
(memory 2-5, regularized and safeguarded) was measured earlier and dropped: it lagged
the anchored rule for the first ~20 iterations.
"""
from __future__ import annotations

from typing import Callable

import torch

Offsets = list[torch.Tensor]
UpdateRule = Callable[[Offsets, Offsets], Offsets]

NOISE_GD_BASE_LR = 0.4  # the paper's base learning rate for gradient descent on the noise (Fig. 6)
L2_TARGETS = ("sampled_noise", "zero")


def anchored_update(offsets: Offsets, step: Offsets) -> Offsets:
    """Accumulate the step on top of the previous offsets (Eqs. 15-16; no_anchor accumulates the same way)."""
    return [o + r for o, r in zip(offsets, step)]


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


def noise_gd_step(noise_offset: torch.Tensor, noise: torch.Tensor, grad: torch.Tensor, scale: float,
                  l2: float, l2_target: str = "sampled_noise") -> torch.Tensor:
    """One SGD step on the initial noise z = noise + offset, before momentum: -lr * (dL/dz + l2 * pull).

    lr = 0.4 * s (the paper's base learning rate, so s scales it like the guidance scale).
    The gradient is the raw one: the paper normalizes gradients only for its own method.
    The paper says "l2 regularizer 1.0" and released no code, so the reading is a choice:
    "sampled_noise" (default) adds l2/2 * ||z - noise||^2, which keeps the sample near its
    starting layout; "zero" adds l2/2 * ||z||^2, weight decay as torch.optim.SGD applies it
    (with l2 = 1 the standard normal prior's negative log-density).
    """
    if l2_target not in L2_TARGETS:
        raise ValueError(f"unknown l2 target {l2_target!r}; choose one of {', '.join(L2_TARGETS)}")
    pull = noise_offset if l2_target == "sampled_noise" else noise + noise_offset
    return -NOISE_GD_BASE_LR * scale * (grad + l2 * pull)
