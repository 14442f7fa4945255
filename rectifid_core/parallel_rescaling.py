"""Parallel rescaling of the identity guidance (after Parallel Rescaling, arXiv 2025), applied to RectifID.

Per window k and image, d_k is the displacement the prompt adds over the window from
its current start: Phi_k(z | prompt) - Phi_k(z | negative), i.e. dt * (v_cond - v_uncond)
(flow.prompt_direction). It lives where the window's offset lives, at the window end,
and points where the prompt moves the latent (time runs 1 -> 0 here, so the raw
velocity difference would point the other way). A guidance step r is split into
r_par = (<r, d> / <d, d>) d and r_orth = r - r_par, and becomes r_orth + factor * r_par.

Sign convention: "opposing" (default) rescales r_par only where <r, d> < 0, i.e. where
the identity step would undo the prompt, and leaves a step that agrees with the prompt
alone; "both" rescales the parallel part whatever its sign, as the Parallel Rescaling
paper does with its consistency guidance. factor 1 is plain RectifID (the solver then
skips this module entirely); factor 0 keeps only the orthogonal part.
"""
from __future__ import annotations

import torch

from .flows.base import Conditioning, RectifiedFlow

SIGN_CONVENTIONS = ("opposing", "both")


def split_parallel(step: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of `step` w.r.t. `direction`, per image; a zero direction has no parallel part."""
    r, d = step.flatten(1), direction.to(step.dtype).flatten(1)
    dd = (d * d).sum(1)
    coef = torch.where(dd > 0, (r * d).sum(1) / dd.clamp(min=torch.finfo(dd.dtype).tiny), torch.zeros_like(dd))
    parallel = (coef.view(-1, 1) * d).view_as(step)
    return parallel, step - parallel


def rescale_parallel(step: torch.Tensor, direction: torch.Tensor, factor: float,
                     sign: str = "opposing") -> torch.Tensor:
    """step with its part parallel to `direction` multiplied by `factor` (only the opposing part with "opposing")."""
    if sign not in SIGN_CONVENTIONS:
        raise ValueError(f"unknown sign convention {sign!r}; choose one of {', '.join(SIGN_CONVENTIONS)}")
    parallel, orthogonal = split_parallel(step, direction)
    rescaled = orthogonal + factor * parallel
    if sign == "both":
        return rescaled
    opposing = (step.flatten(1) * direction.to(step.dtype).flatten(1)).sum(1) < 0
    return torch.where(opposing.view(-1, *([1] * (step.dim() - 1))), rescaled, step)


@torch.no_grad()
def prompt_directions(flow: RectifiedFlow, cond: Conditioning, window_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d_k for every window, from the window inputs of the current rollout (two extra model calls per window)."""
    return [flow.prompt_direction(z, k, cond).float() for k, z in enumerate(window_inputs)]
