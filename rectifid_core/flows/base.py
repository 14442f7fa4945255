"""The one interface the guidance solver needs from a rectified flow.

A backend owns its models and its window math; the solver only walks steps.
A flow is trained with K windows (`num_windows`); a pass runs `num_steps` >= K
steps, one model call each (PeRFlow splits its windows into sub-steps; an Euler
flow has one window per step). The solver keeps one offset per step, as the
reference code does with its per-scheduler-step callback. Keeping this surface
small is what lets the same solver drive PeRFlow, 2-rectified flow / InstaFlow
and the toy digits flow.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class FlowDefaults:
    """Image size and CFG scale the authors' scripts sample this kind of flow with, and where that is written."""

    width: int
    height: int
    cfg_scale: float
    source: str


@dataclass
class Conditioning:
    """Encoded prompts for one batch, computed once and reused by every window step.

    `tensors` is backend specific (text embeddings, class labels, SDXL added ids);
    `batch` is the number of images the conditioning produces.
    """

    batch: int
    guidance_scale: float
    tensors: dict[str, Any] = field(default_factory=dict)


class RectifiedFlow(ABC):
    """A frozen few-step flow: noise z_0 -> latent z_S in `num_steps` differentiable steps over K trained windows."""

    num_windows: int
    latent_channels: int
    vae_scale_factor: int
    device: torch.device
    dtype: torch.dtype

    @property
    def num_steps(self) -> int:
        """Steps (model calls) per pass; one per window unless the backend splits its windows."""
        return self.num_windows

    @abstractmethod
    def encode(self, prompts: list[str], negative_prompts: list[str], guidance_scale: float) -> Conditioning:
        """Encode positive/negative prompts once (classifier-free guidance scale included)."""

    @abstractmethod
    def step(self, z: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        """Advance step i (0-based, noise side first): one model call with CFG; differentiable w.r.t. z."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Final latent -> image [B,3,H,W] in 0..1; differentiable."""

    def vae_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The final latent as the decoder's own input (what ComfyUI's LATENT holds); flows whose
        latent is already that return it as it is."""
        return z

    @abstractmethod
    def window_gammas(self) -> list[float] | None:
        """Per-window gamma_k = sqrt(abar_start/abar_end), or None for a plain Euler flow."""

    def step_windows(self) -> list[int]:
        """The window (0-based) each step belongs to."""
        return list(range(self.num_windows))

    def window_anchor_coefficients(self) -> list[float]:
        """The intended c_k of the anchored update, one per window.

        It rescales a guidance step taken at a window's start into an offset at its
        end, so it depends on how the window is parameterized; the default covers
        eps windows with gammas (sqrt(1 - gamma_k^2)) and plain Euler flows (1).
        """
        gammas = self.window_gammas()
        if gammas is None:
            return [1.0] * self.num_windows
        return [math.sqrt(max(0.0, 1.0 - g * g)) for g in gammas]

    def anchor_coefficients(self) -> list[float]:
        """c per step: the coefficient of the window the step belongs to.

        The reference computes it in its per-step callback from `get_window_alpha(t)`
        of the step's timestep, i.e. from the window that holds the step.
        """
        per_window = self.window_anchor_coefficients()
        return [per_window[k] for k in self.step_windows()]

    def with_steps(self, num_steps: int) -> "RectifiedFlow":
        """The same frozen models run in `num_steps` steps, as a new flow (a cached flow is never changed).

        A backend that cannot change its step count after loading refuses anything else.
        """
        if num_steps != self.num_steps:
            raise ValueError(f"this {type(self).__name__} runs {self.num_steps} steps and cannot change that after "
                             f"loading; set steps to {self.num_steps} (or auto)")
        return self

    def defaults(self) -> FlowDefaults | None:
        """Image size and CFG the reference scripts use for this flow; None when they name none."""
        return None

    def prompt_direction(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        """Displacement the prompt adds over step k from z: step with the prompt minus step with the negative.

        Both without CFG, so it is dt * (v_cond - v_uncond) for an Euler step; parallel
        rescaling needs it. Backends that can run the two halves separately implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot split a step into its prompt and negative "
                                  "halves, so parallel rescaling is not available for it")

    def set_memory_saving(self, enabled: bool, split_cfg: bool = False) -> None:
        """Let the backend recompute activations inside its own modules; a no-op by default.

        `split_cfg` asks for the two CFG halves one at a time, each recomputed in the backward.
        """

    @property
    def recomputes_decode(self) -> bool:
        """True while the backend recomputes its decoder itself, so the solver must not checkpoint it again."""
        return False

    @property
    def recomputes_step(self) -> bool:
        """True while the backend recomputes its step's model calls itself, so the solver must not checkpoint the step."""
        return False

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent shape for an image size; rejects sizes the VAE cannot produce."""
        f = self.vae_scale_factor
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % f:
                raise ValueError(
                    f"{name} {value} is not a positive multiple of {f} (the VAE downscale factor); "
                    f"try {max(f, round(value / f) * f)}"
                )
        if batch < 1:
            raise ValueError(f"batch size must be >= 1, got {batch}")
        return (batch, self.latent_channels, height // f, width // f)
