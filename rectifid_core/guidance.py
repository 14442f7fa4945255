"""Anchored classifier guidance (RectifID, Algorithm 1) and the paper's ablations.

The solver keeps one offset per step end, Delta_1..Delta_S, and rolls the flow
out as  zhat_0 = z_0,  zhat_{k+1} = Phi_k(zhat_k) + Delta_{k+1}, Phi_k being one
step (one model call; a window, or a sub-step of one when the flow runs more
steps than its K trained windows, with c_k of that window, as the reference's
per-scheduler-step callback does).  One backward
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
  anchored_momentum  the same anchored fixed-point problem with heavy-ball
             momentum on the offsets (solvers.py; offset_momentum=0 is the
             anchored rule). On the toy benchmark it reaches the anchored N=50
             identity at N=21 (benchmark/results/convergence.md).

Memory: memory="checkpoint" stores only each window's input and recomputes the
window's model call and the VAE decode during the backward pass (about one
extra forward per iteration for a fraction of the activation memory), and the
backend recomputes its VAE decoder per block (flow.set_memory_saving);
memory="lowest" also runs the CFG halves one at a time, each recomputed (one
more UNet forward per window, for half the UNet activations at the peak);
`choose_memory_mode` picks it from the free memory (memory="auto" does that
with CUDA's free memory; callers with their own view of free memory, such as
ComfyUI's model management, call it themselves).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .compiled import COMPILE_MODES, compiled_run
from .flows.base import Conditioning, RectifiedFlow
from .objectives.base import Objective, as_output
from .solvers import MomentumUpdate, UpdateRule, anchored_update, unanchored_update

LEGACY_CK = 0.95796674  # the released SD1.5 code's constant for every window
SOLVER_MODES = ("anchored", "no_anchor", "noise_gd", "anchored_momentum")
CK_MODES = ("per_window", "legacy", "one")
MEMORY_MODES = ("store", "checkpoint", "lowest", "auto")


@dataclass
class GuidanceConfig:
    scale: float | None = None  # None: auto_guidance_scale(objective)
    iterations: int = 20
    mode: str = "anchored"
    ck_mode: str = "per_window"
    momentum: float = 0.9  # noise_gd only
    l2: float = 1.0  # noise_gd only
    memory: str = "store"  # one of MEMORY_MODES; see the module docstring
    offset_momentum: float = 0.5  # anchored_momentum only
    compile: str = "off"  # one of COMPILE_MODES: "on" runs the iteration through torch.compile (compiled.py)

    def validate(self) -> None:
        if self.mode not in SOLVER_MODES:
            raise ValueError(f"unknown solver mode {self.mode!r}; choose one of {', '.join(SOLVER_MODES)}")
        if self.ck_mode not in CK_MODES:
            raise ValueError(f"unknown c_k mode {self.ck_mode!r}; choose one of {', '.join(CK_MODES)}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {self.memory!r}; choose one of {', '.join(MEMORY_MODES)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile option {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations N must be an integer >= 0, got {self.iterations!r}")
        for name in ("momentum", "offset_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.scale is not None and (not math.isfinite(self.scale) or self.scale < 0):
            raise ValueError(f"guidance scale s must be a finite number >= 0, got {self.scale!r}")


def auto_guidance_scale(objective: Objective) -> float:
    """s the reference scripts use: 2.0 when a subject is an object, else 1.0 (faces).

    single_object.py l.194 `--guidance` default 2. (multi_object_perflow.ipynb: SGD lr 2);
    single_person.py l.211 and single_person_sdxl.py l.209 default 1. (multi_person_perflow.ipynb: lr 1).
    Objectives say what they steer in `kind` ("face", "subject"); several subjects in `subjects`.
    """
    subjects = getattr(objective, "subjects", None) or [objective]
    return 2.0 if any(getattr(s, "kind", None) == "subject" for s in subjects) else 1.0


# Activations kept for the backward at 4 bytes per value (fp32; fp16/bf16 keep half):
# "window" = one classifier-free-guided window call, "decode" = the VAE decode, in
# bytes per latent element (C*h*w) plus bytes per image ("*_fixed": text features,
# the recognizer). Fitted on the real architectures at two image sizes by
# `python -m rectifid_core.benchmark.calibrate` (torch allocation accounting, SDPA attention);
# see benchmark/results/README.md.
ACTIVATION_BYTES = {
    "sd15": {"window": 187_941, "window_fixed": 15_407_064, "decode": 364_425, "fixed": 111_653_540},
    "sdxl": {"window": 323_687, "window_fixed": 102_527_248, "decode": 364_425, "fixed": 111_653_540},
}
FP32_DECODE = ("sdxl",)  # its VAE config asks for fp32 decoding (force_upcast), whatever the model dtype


def estimate_guidance_bytes(latent_shape: tuple[int, ...], num_steps: int, family: str = "sd15",
                            dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Activation memory of one guidance iteration (weights excluded) for each memory mode."""
    if family not in ACTIVATION_BYTES:
        raise ValueError(f"no activation estimate for model family {family!r}; "
                         f"choose one of {', '.join(ACTIVATION_BYTES)}")
    per = ACTIVATION_BYTES[family]
    batch, n = latent_shape[0], math.prod(latent_shape)
    width = torch.finfo(dtype).bits / 32
    window = (per["window"] * n + per["window_fixed"] * batch) * width
    dec = per["decode"] * n * (1.0 if family in FP32_DECODE else width)
    fixed = per["fixed"] * batch * width
    inputs = 4 * n * (num_steps + 1)  # the step inputs a checkpointed rollout keeps
    return {"store": int(num_steps * window + dec + fixed), "checkpoint": int(max(window, dec) + fixed + inputs)}


def choose_memory_mode(free_bytes: int, latent_shape: tuple[int, ...], num_steps: int, family: str = "sd15",
                       dtype: torch.dtype = torch.float16, headroom: float = 0.85) -> str:
    """Pick "store" when its activations fit in `headroom` of the free memory, else "checkpoint"."""
    if free_bytes < 0:
        raise ValueError(f"free memory must be >= 0 bytes, got {free_bytes}")
    need = estimate_guidance_bytes(latent_shape, num_steps, family, dtype)
    return "store" if need["store"] <= headroom * free_bytes else "checkpoint"


def memory_family(flow: RectifiedFlow) -> str:
    """Which fitted activation model (ACTIVATION_BYTES) describes this flow's architecture."""
    return "sdxl" if getattr(flow, "is_sdxl", False) else "sd15"


def resolve_memory_mode(memory: str, flow: RectifiedFlow, latent_shape: tuple[int, ...],
                        free_bytes: int | None = None, num_steps: int | None = None) -> str:
    """Resolve "auto" from the free memory given (e.g. ComfyUI's count) or CUDA's; off CUDA it means store.

    `num_steps` is the number of guided steps the run will take (default: the flow's own).
    """
    if memory != "auto":
        return memory
    device = torch.device(flow.device)
    if free_bytes is None:
        if device.type != "cuda":
            return "store"
        free_bytes, _ = torch.cuda.mem_get_info(device)
    steps = flow.num_steps if num_steps is None else num_steps
    return choose_memory_mode(free_bytes, latent_shape, steps, memory_family(flow), flow.dtype)


@dataclass
class IterationInfo:
    """What a caller sees after each iteration (for progress, previews, cancel)."""

    iteration: int
    iterations: int
    loss: float
    diagnostics: dict[str, Any]
    latent: torch.Tensor  # final latent the loss was computed on, before this update (detached)
    image: torch.Tensor  # its decoded image [B,3,H,W] in 0..1 (detached): previews cost no extra decode


@dataclass
class GuidanceResult:
    latent: torch.Tensor  # z_K, detached
    image: torch.Tensor  # [B,3,H,W] in 0..1
    losses: list[float] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: str | None = None  # why the loop ended before N, if it did
    warnings: list[str] = field(default_factory=list)  # what else the caller must be told (final-pass fallback)


Callback = Callable[[IterationInfo], None]
Interrupt = Callable[[], None]  # raises to cancel; called before every step's model call


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded Gaussian noise drawn on the CPU so a seed gives the same image on every device."""
    gen = torch.Generator("cpu").manual_seed(int(seed) % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def anchor_coefficients(flow: RectifiedFlow, ck_mode: str) -> list[float]:
    """c per step: the flow's intended value (from the step's window), the released SD1.5 constant, or 1."""
    k = flow.num_steps
    if ck_mode == "legacy":
        return [LEGACY_CK] * k
    if ck_mode == "one":
        return [1.0] * k
    if ck_mode != "per_window":
        raise ValueError(f"unknown c_k mode {ck_mode!r}; choose one of {', '.join(CK_MODES)}")
    return list(flow.anchor_coefficients())


def normalize_window_grad(g: torch.Tensor) -> torch.Tensor:
    """g / max(||g||_2, 1), the norm taken per image over C*H*W (Karunratanakul et al.)."""
    norm = g.flatten(1).norm(dim=1).clamp(min=1.0)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def rollout(flow: RectifiedFlow, cond: Conditioning, z0: torch.Tensor, offsets: list[torch.Tensor],
            checkpoint: bool = False, interrupt: Interrupt | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Walk all steps applying the offsets; returns the final latent and every step's input state.

    With `checkpoint` (and grad enabled) each step's model call keeps only its input and
    is recomputed during the backward pass. `interrupt` is called before every step.
    """
    z = z0
    starts = []
    recompute = checkpoint and torch.is_grad_enabled()
    for k in range(flow.num_steps):
        if interrupt is not None:
            interrupt()
        starts.append(z)
        out = _checkpoint(flow.step, z, k, cond, use_reentrant=False) if recompute else flow.step(z, k, cond)
        z = out + offsets[k].to(z.dtype)
    return z, starts


def decode(flow: RectifiedFlow, z: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """flow.decode, optionally recomputed in the backward pass instead of storing the VAE activations."""
    if checkpoint and torch.is_grad_enabled():
        return _checkpoint(flow.decode, z, use_reentrant=False)
    return flow.decode(z)


def _offset_rule(config: GuidanceConfig) -> UpdateRule:
    if config.mode == "no_anchor":
        return unanchored_update
    if config.mode == "anchored_momentum":
        return MomentumUpdate(config.offset_momentum)
    if config.mode == "noise_gd":
        return MomentumUpdate(config.momentum)
    return anchored_update


def _check_inputs(flow: RectifiedFlow, noise: torch.Tensor, cond: Conditioning) -> None:
    if flow.num_steps < 1:
        raise ValueError(f"the flow must run >= 1 steps, got {flow.num_steps}")
    if noise.dim() != 4 or noise.shape[0] != cond.batch:
        raise ValueError(
            f"noise shape {tuple(noise.shape)} does not match the prompt batch of {cond.batch} "
            f"(expected [{cond.batch}, C, H, W])"
        )


def guide(flow: RectifiedFlow, cond: Conditioning, objective: Objective, noise: torch.Tensor,
          config: GuidanceConfig, callback: Callback | None = None,
          interrupt: Interrupt | None = None) -> GuidanceResult:
    """Run N guidance iterations, then one gradient-free pass that produces the output.

    An exception raised by `callback` (after every iteration) or `interrupt` (before
    every step's model call) propagates (nothing is returned), which is how callers
    cancel. A non-finite loss at the first iteration raises; later it ends the loop
    and the result keeps the last finite iterate. A non-finite final pass (the last
    update is never scored) falls back to the last scored iterate, with a warning.
    scale None is `auto_guidance_scale(objective)`.
    """
    config.validate()
    if config.scale is None:
        config = dataclasses.replace(config, scale=auto_guidance_scale(objective))
    _check_inputs(flow, noise, cond)
    memory = resolve_memory_mode(config.memory, flow, tuple(noise.shape))
    recompute = memory != "store"
    flow.set_memory_saving(recompute, split_cfg=memory == "lowest")
    try:
        with compiled_run(flow, objective, tuple(noise.shape)) if config.compile == "on" else nullcontext(flow) as run:
            return _solve(run, cond, objective, noise, config, recompute, callback, interrupt)
    finally:
        flow.set_memory_saving(False)


def _solve(flow: RectifiedFlow, cond: Conditioning, objective: Objective, noise: torch.Tensor,
           config: GuidanceConfig, recompute: bool, callback: Callback | None,
           interrupt: Interrupt | None) -> GuidanceResult:
    ck = anchor_coefficients(flow, config.ck_mode)
    update = _offset_rule(config)
    z0 = noise.detach()
    work = torch.float32
    offsets = [torch.zeros_like(z0, dtype=work) for _ in range(flow.num_steps)]
    noise_offset = torch.zeros_like(z0, dtype=work)
    result = GuidanceResult(latent=z0, image=z0)

    last_good = (offsets, noise_offset)  # update rules return new tensors, so no copies are needed
    scored_at, current, current_image = 0, z0, z0  # the last iterate the objective scored (1-based iteration)
    for it in range(config.iterations):
        scored = (offsets, noise_offset)
        with torch.enable_grad():
            start = (z0.to(work) + noise_offset).to(z0.dtype).requires_grad_(True)
            z_final, starts = rollout(flow, cond, start, offsets, checkpoint=recompute, interrupt=interrupt)
            image = decode(flow, z_final, checkpoint=recompute)
            out = as_output(objective(image))
            loss = out.loss.float().sum()
            grads = torch.autograd.grad(loss, starts)
            # one host sync per iteration, after the backward has been queued
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                if it == 0:
                    raise RuntimeError(
                        f"the objective returned a non-finite loss ({loss_value}) at the first iteration; "
                        "check the reference embedding and the model dtype (fp16 overflow?)"
                    )
                result.stopped_early = (f"non-finite loss ({loss_value}) at iteration {it + 1}; "
                                        f"kept the iterate scored at iteration {it}")
                offsets, noise_offset = last_good
                break
            last_good = scored
        current, current_image, scored_at = z_final.detach(), image.detach(), it + 1
        del z_final, starts, loss, image
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            if it == 0:
                raise RuntimeError("non-finite gradient at the first iteration; try fp32 or a smaller guidance scale")
            result.stopped_early = f"non-finite gradient at iteration {it + 1}; kept the iterate scored there"
            break
        ghat = [normalize_window_grad(g.float()) for g in grads]
        del grads

        if config.mode == "noise_gd":  # SGD with momentum on the noise, l2 pull toward the sampled noise
            (noise_offset,) = update([noise_offset], [-config.scale * (ghat[0] + config.l2 * noise_offset)])
        else:
            offsets = update(offsets, [-ck[k] * config.scale * g for k, g in enumerate(ghat)])

        result.losses.append(loss_value)
        result.diagnostics.append(out.diagnostics)
        if callback is not None:
            callback(IterationInfo(it, config.iterations, loss_value, out.diagnostics, current, current_image))

    with torch.no_grad():
        start = (z0.to(work) + noise_offset).to(z0.dtype)
        z_final, _ = rollout(flow, cond, start, offsets, interrupt=interrupt)
        image = flow.decode(z_final)
    if bool(torch.isfinite(z_final).all() and torch.isfinite(image).all()):
        result.latent, result.image = z_final.detach(), image.detach().float().clamp(0, 1)
        return result
    if scored_at == 0:
        raise RuntimeError("the flow produced a non-finite latent or image without guidance (fp16 overflow?); "
                           "load the flow in fp32 or bf16")
    result.latent, result.image = current, current_image.float().clamp(0, 1)
    result.warnings.append(
        f"the last guidance update gave a non-finite image (overflow; try a smaller guidance scale, or fp32/bf16); "
        f"returned the image scored at iteration {scored_at} instead")
    return result
