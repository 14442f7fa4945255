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

Modes (paper Sec. 4.3; the authors released no code for the two ablations, so
each states the reading implemented):
  anchored   the method above.
  no_anchor  Eq. 8 as written: the velocity is the guided trajectory's own
             (each window is rolled out from its current guided start; Eq. 8's
             v(z_1, 1) at the end point is the same for a straight window), and
             the gradient is the one taken where the offset is applied,
             g_{k+1} = dL/dzhat_{k+1}
             (g_K = dL/dz_K for the last window), with no pull-back through the
             window's Jacobian and no c_k (c_k converts a window-start step into
             a window-end offset, which this step already is). The offsets
             accumulate as in `anchored`:
                 Delta_{k+1} <- Delta_{k+1} - s * g_{k+1} / max(||g_{k+1}||, 1).
  noise_gd   DOODL / D-Flow style gradient descent on the initial noise with the
             raw gradient: SGD, lr = 0.4 * s, momentum 0.9, l2 1.0 (the l2
             reading is `l2_target`, see solvers.noise_gd_step).
  anchored_momentum  the same anchored fixed-point problem with heavy-ball
             momentum on the offsets (solvers.py; offset_momentum=0 is the
             anchored rule); the toy benchmark reports its gain and its realism
             cost over several subsets and seeds.

Parallel rescaling (parallel_rescaling.py): `parallel_rescale` != 1 rescales the part
of each window's step that is parallel to the prompt's direction at that window
(anchored, no_anchor and anchored_momentum); 1 is plain RectifID.

Memory: memory="recompute_vae" stores the window activations and recomputes
only the VAE decode in the backward pass (one extra decoder forward per
iteration; the decoder's activations are the largest part at 512 px);
memory="partial:n" also keeps only the input of the first n steps and
recomputes their model calls (one extra forward of each), storing the others';
memory="partial" picks n from the free memory (the fewest that fit);
memory="checkpoint" does that for every step (about one extra forward of
everything); memory="lowest" also runs the CFG halves one at a time, each
recomputed (half the UNet activations at the peak). A backend that can recompute inside its own modules does so
(flow.set_memory_saving: the SD VAE decoder per resnet) and the solver then
leaves that part unwrapped, so no activation is recomputed twice.
The recomputed steps are the first ones: their backward comes last, after the
stored steps' activations are freed, so the peak holds either the stored
steps' activations or one recomputed step's, never both.
`choose_memory_mode` picks the fastest mode whose estimate fits the free memory
(memory="auto" does that with CUDA's free memory; callers with their own view
of free memory, such as ComfyUI's model management, call it themselves).
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
from .parallel_rescaling import SIGN_CONVENTIONS, prompt_directions, rescale_parallel
from .solvers import L2_TARGETS, MomentumUpdate, UpdateRule, anchored_update, noise_gd_step

LEGACY_CK = 0.95796674  # the released SD1.5 code's constant for every window
SOLVER_MODES = ("anchored", "no_anchor", "noise_gd", "anchored_momentum")
CK_MODES = ("per_window", "legacy", "one")
MEMORY_MODES = ("store", "recompute_vae", "partial", "checkpoint", "lowest", "auto")
PARTIAL = "partial"  # "partial:n" recomputes the first n steps; plain "partial" chooses n from the free memory
AUTO_HEADROOM = 0.85  # share of the free memory auto lets a mode's estimated activations take


@dataclass
class GuidanceConfig:
    scale: float | None = None  # None: auto_guidance_scale(objective)
    iterations: int = 20
    mode: str = "anchored"
    ck_mode: str = "per_window"
    momentum: float = 0.9  # noise_gd only
    l2: float = 1.0  # noise_gd only
    l2_target: str = "sampled_noise"  # noise_gd only: what the l2 term pulls toward (solvers.noise_gd_step)
    memory: str = "store"  # one of MEMORY_MODES or "partial:n" (n steps recomputed); see the module docstring
    offset_momentum: float = 0.5  # anchored_momentum only
    parallel_rescale: float = 1.0  # factor on the step's part parallel to the prompt direction; 1 = RectifID
    parallel_sign: str = "opposing"  # which parallel parts are rescaled (parallel_rescaling.py)
    compile: str = "off"  # one of COMPILE_MODES: "on" runs the iteration through torch.compile (compiled.py)

    def validate(self) -> None:
        if self.mode not in SOLVER_MODES:
            raise ValueError(f"unknown solver mode {self.mode!r}; choose one of {', '.join(SOLVER_MODES)}")
        if self.ck_mode not in CK_MODES:
            raise ValueError(f"unknown c_k mode {self.ck_mode!r}; choose one of {', '.join(CK_MODES)}")
        check_memory_mode(self.memory)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile option {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations N must be an integer >= 0, got {self.iterations!r}")
        for name in ("momentum", "offset_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.scale is not None and (not math.isfinite(self.scale) or self.scale < 0):
            raise ValueError(f"guidance scale s must be a finite number >= 0, got {self.scale!r}")
        if self.l2_target not in L2_TARGETS:
            raise ValueError(f"unknown l2 target {self.l2_target!r}; choose one of {', '.join(L2_TARGETS)}")
        if not math.isfinite(self.l2) or self.l2 < 0:
            raise ValueError(f"l2 must be a finite number >= 0, got {self.l2!r}")
        if self.parallel_sign not in SIGN_CONVENTIONS:
            raise ValueError(f"unknown parallel_sign {self.parallel_sign!r}; "
                             f"choose one of {', '.join(SIGN_CONVENTIONS)}")
        if not math.isfinite(self.parallel_rescale):
            raise ValueError(f"parallel_rescale must be finite, got {self.parallel_rescale!r}")
        if self.parallel_rescale != 1.0 and self.mode == "noise_gd":
            raise ValueError("parallel_rescale applies to the window offsets; noise_gd has none (use 1)")


def auto_guidance_scale(objective: Objective) -> float:
    """s the reference scripts use: 2.0 when a subject is an object, else 1.0 (faces).

    single_object.py l.194 `--guidance` default 2. (multi_object_perflow.ipynb: SGD lr 2);
    single_person.py l.211 and single_person_sdxl.py l.209 default 1. (multi_person_perflow.ipynb: lr 1).
    Objectives say what they steer in `kind` ("face", "subject"); several subjects in `subjects`.
    """
    subjects = getattr(objective, "subjects", None) or [objective]
    return 2.0 if any(getattr(s, "kind", None) == "subject" for s in subjects) else 1.0


# Activations kept for the backward at 4 bytes per value (fp32; fp16/bf16 keep half):
# "window" = one classifier-free-guided window call, "decode" = the VAE decode,
# "decode_recompute" = the peak of the decode's forward+backward with its resnets
# recomputed, in bytes per latent element (C*h*w) plus bytes per image ("*_fixed":
# text features, the recognizer). Fitted on the real architectures at two image sizes by
# `python -m rectifid_core.benchmark.calibrate` (torch allocation accounting, SDPA attention);
# see benchmark/results/README.md.
ACTIVATION_BYTES = {
    "sd15": {"window": 187_941, "window_fixed": 15_407_064, "decode": 364_425, "decode_recompute": 146_952,
             "fixed": 112_317_068},
    # SDXL's VAE has SD1.5's decoder topology: its decode entries are the SD1.5 fit (calibration_sd15.json)
    "sdxl": {"window": 323_687, "window_fixed": 102_527_248, "decode": 364_425, "decode_recompute": 146_952,
             "fixed": 112_317_068},
    # FLUX.1-schnell / SD3.5 Large Turbo at CFG 1, extrapolated from two widths (16-channel latents); their
    # decode_recompute was measured with per-block decoder checkpoints, an upper bound for the per-resnet ones
    "flux": {"window": 124_510, "window_fixed": 2_036_021_256, "decode": 91_108, "decode_recompute": 51_972,
             "fixed": 112_267_548},
    "sd35": {"window": 69_748, "window_fixed": 1_462_974_616, "decode": 91_108, "decode_recompute": 51_972,
             "fixed": 112_267_548},
}
FP32_DECODE = ("sdxl",)  # its VAE config asks for fp32 decoding (force_upcast), whatever the model dtype


def partial_mode(recomputed: int) -> str:
    """The memory mode that recomputes the model calls of the first `recomputed` steps: "partial:n"."""
    return f"{PARTIAL}:{recomputed}"


def check_memory_mode(memory: str) -> None:
    """Raise for anything but one of MEMORY_MODES or "partial:n" with n >= 1."""
    if memory in MEMORY_MODES:
        return
    name, _, count = str(memory).partition(":")
    if name != PARTIAL or not count.isdigit() or int(count) < 1:
        raise ValueError(f"unknown memory mode {memory!r}; choose one of {', '.join(MEMORY_MODES)}, "
                         f"or partial:n to recompute the first n steps (n >= 1)")


def recomputed_steps(memory: str, num_steps: int) -> int:
    """How many of the first steps a resolved memory mode recomputes in the backward pass (0 for store, recompute_vae)."""
    check_memory_mode(memory)
    if memory in ("auto", PARTIAL):
        raise ValueError(f"memory {memory!r} is resolved into a mode first (resolve_memory_mode)")
    if memory in ("checkpoint", "lowest"):
        return num_steps
    if not memory.startswith(PARTIAL):
        return 0
    n = int(memory.partition(":")[2])
    if n >= num_steps:
        raise ValueError(f"memory {memory} recomputes {n} steps but the run has {num_steps}; "
                         + (f"use partial:1 to partial:{num_steps - 1}, or " if num_steps > 1 else "use ")
                         + "checkpoint to recompute every step")
    return n


def memory_order(num_steps: int) -> tuple[str, ...]:
    """The modes `auto` chooses from, fastest first: each recomputes more (lowest is never chosen)."""
    return ("store", "recompute_vae", *(partial_mode(n) for n in range(1, num_steps)), "checkpoint")


def estimate_guidance_bytes(latent_shape: tuple[int, ...], num_steps: int, family: str = "sd15",
                            dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Activation memory of one guidance iteration (weights excluded) for each memory mode.

    "decode_recompute" is the peak of the decoder's forward+backward with its resnets
    recomputed; "lowest" is bounded by "checkpoint" (splitting CFG never measured lower).
    "partial:n" (n = 1..num_steps-1) keeps the other steps' activations and the first n
    steps' inputs: its peak is at the start of the backward, or one recomputed step's
    activations when the stored steps are fewer than that.
    """
    if family not in ACTIVATION_BYTES:
        raise ValueError(f"no activation estimate for model family {family!r}; "
                         f"choose one of {', '.join(ACTIVATION_BYTES)}")
    per = ACTIVATION_BYTES[family]
    batch, n = latent_shape[0], math.prod(latent_shape)
    width = torch.finfo(dtype).bits / 32
    window = (per["window"] * n + per["window_fixed"] * batch) * width
    dec = per["decode"] * n * (1.0 if family in FP32_DECODE else width)
    fixed = per["fixed"] * batch * width
    dec_recompute = per["decode_recompute"] * n * (1.0 if family in FP32_DECODE else width)
    inputs = 4 * n * (num_steps + 1)  # the step inputs a checkpointed rollout keeps
    checkpointed = int(max(window, dec_recompute) + fixed + inputs)
    partial = {partial_mode(r): int(max((num_steps - r) * window + dec_recompute, window) + fixed + 4 * n * (r + 1))
               for r in range(1, num_steps)}
    return {"store": int(num_steps * window + dec + fixed),
            "recompute_vae": int(num_steps * window + dec_recompute + fixed),
            **partial, "checkpoint": checkpointed, "lowest": checkpointed}


def choose_memory_mode(free_bytes: int, latent_shape: tuple[int, ...], num_steps: int, family: str = "sd15",
                       dtype: torch.dtype = torch.float16, headroom: float = AUTO_HEADROOM,
                       memory: str = "auto") -> str:
    """The fastest mode whose activations fit in `headroom` of the free memory.

    memory "auto" chooses among `memory_order` (store, recompute_vae, partial:1.., checkpoint),
    "partial" among partial:1..partial:{num_steps-1}. When none fits, the leanest of them;
    callers that refuse a run check the estimate themselves.
    """
    if free_bytes < 0:
        raise ValueError(f"free memory must be >= 0 bytes, got {free_bytes}")
    order = memory_order(num_steps)
    if memory == PARTIAL:
        order = tuple(m for m in order if m.startswith(PARTIAL))
        if not order:
            raise ValueError(f"memory partial recomputes some of the steps, but the run has {num_steps}; "
                             "use recompute_vae or checkpoint")
    elif memory != "auto":
        raise ValueError(f"only auto and partial are chosen from the free memory, not {memory!r}")
    return fastest_fitting(estimate_guidance_bytes(latent_shape, num_steps, family, dtype), order,
                           headroom * free_bytes)


def fastest_fitting(need: dict[str, int], order: tuple[str, ...], budget: float) -> str:
    """The first mode of `order` (fastest first) whose estimate `need[mode]` fits `budget` bytes, else the last."""
    return next((mode for mode in order if need[mode] <= budget), order[-1])


def memory_family(flow: RectifiedFlow) -> str:
    """Which fitted activation model (ACTIVATION_BYTES) describes this flow's architecture.

    A backend names its own family in `activation_family` (the FLUX / SD3 flows do); UNet flows are sd15 or sdxl.
    """
    family = getattr(flow, "activation_family", None)
    if family is not None:
        return family
    return "sdxl" if getattr(flow, "is_sdxl", False) else "sd15"


def resolve_memory_mode(memory: str, flow: RectifiedFlow, latent_shape: tuple[int, ...],
                        free_bytes: int | None = None, num_steps: int | None = None) -> str:
    """Resolve "auto" and "partial" from the free memory given (e.g. ComfyUI's count) or CUDA's.

    Off CUDA with no count given, auto means store and partial recomputes one step.
    `num_steps` is the number of guided steps the run will take (default: the flow's own).
    """
    if memory not in ("auto", PARTIAL):
        return memory
    steps = flow.num_steps if num_steps is None else num_steps
    device = torch.device(flow.device)
    if free_bytes is None:
        if device.type != "cuda":
            free_bytes = 1 << 62  # no limit known: the fastest choice
        else:
            free_bytes, _ = torch.cuda.mem_get_info(device)
    return choose_memory_mode(free_bytes, latent_shape, steps, memory_family(flow), flow.dtype, memory=memory)


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


def solver_recomputes(flow: RectifiedFlow, recompute_steps: int) -> bool:
    """True when a rollout with grad checkpoints steps itself (re-running them from outside a compiled graph)."""
    return recompute_steps > 0 and not flow.recomputes_step


def rollout(flow: RectifiedFlow, cond: Conditioning, z0: torch.Tensor, offsets: list[torch.Tensor],
            recompute_steps: int = 0, interrupt: Interrupt | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Walk all steps applying the offsets; returns the final latent and every step's input state.

    With grad enabled the model calls of the first `recompute_steps` steps keep only their
    input and are recomputed during the backward pass, unless the backend recomputes them
    itself (flow.recomputes_step). `interrupt` is called before every step.
    """
    z = z0
    starts = []
    recompute = torch.is_grad_enabled() and solver_recomputes(flow, recompute_steps)
    for k in range(flow.num_steps):
        if interrupt is not None:
            interrupt()
        starts.append(z)
        if recompute and k < recompute_steps:
            out = _checkpoint(flow.step, z, k, cond, use_reentrant=False)
        else:
            out = flow.step(z, k, cond)
        z = out + offsets[k].to(z.dtype)
    return z, starts


def decode(flow: RectifiedFlow, z: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """flow.decode, optionally recomputed in the backward pass instead of storing the VAE activations.

    A backend that recomputes its decoder itself (flow.recomputes_decode) is not wrapped again.
    """
    if checkpoint and torch.is_grad_enabled() and not flow.recomputes_decode:
        return _checkpoint(flow.decode, z, use_reentrant=False)
    return flow.decode(z)


def _offset_rule(config: GuidanceConfig) -> UpdateRule:
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
    recompute_steps = recomputed_steps(memory, flow.num_steps)
    flow.set_memory_saving(memory != "store", split_cfg=memory == "lowest")
    try:
        # memory "checkpoint" and "partial:n" re-run compiled steps from outside them in the backward pass,
        # where replaying CUDA graphs is not safe: plain inductor kernels then (lowest recomputes inside the graph)
        graphs = not solver_recomputes(flow, recompute_steps)
        with (compiled_run(flow, objective, tuple(noise.shape), graphs) if config.compile == "on"
              else nullcontext(flow)) as run:
            return _solve(run, cond, objective, noise, config, memory, recompute_steps, callback, interrupt)
    finally:
        flow.set_memory_saving(False)


def _solve(flow: RectifiedFlow, cond: Conditioning, objective: Objective, noise: torch.Tensor,
           config: GuidanceConfig, memory: str, recompute_steps: int, callback: Callback | None,
           interrupt: Interrupt | None) -> GuidanceResult:
    recompute_decode = memory != "store"
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
            z_final, starts = rollout(flow, cond, start, offsets, recompute_steps, interrupt=interrupt)
            image = decode(flow, z_final, checkpoint=recompute_decode)
            out = as_output(objective(image))
            loss = out.loss.float().sum()
            # the window inputs zhat_0..zhat_{K-1} and z_K: anchored uses the first K, no_anchor the last K
            grads = torch.autograd.grad(loss, starts + [z_final])
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
        window_inputs = [z.detach() for z in starts]
        del z_final, starts, loss, image
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            if it == 0:
                raise RuntimeError("non-finite gradient at the first iteration; try fp32 or a smaller guidance scale")
            result.stopped_early = f"non-finite gradient at iteration {it + 1}; kept the iterate scored there"
            break
        if config.mode == "noise_gd":  # SGD with momentum on the noise, raw gradient
            step = noise_gd_step(noise_offset, z0.to(work), grads[0].float(), config.scale, config.l2,
                                 config.l2_target)
            (noise_offset,) = update([noise_offset], [step])
        else:
            if config.mode == "no_anchor":  # Eq. 8: the gradient where each offset is applied, no c_k
                points, coefficients = grads[1:], [1.0] * flow.num_steps
            else:
                points, coefficients = grads[:-1], ck
            steps = [-c * config.scale * normalize_window_grad(g.float()) for c, g in zip(coefficients, points)]
            if config.parallel_rescale != 1.0:
                directions = prompt_directions(flow, cond, window_inputs)
                steps = [rescale_parallel(r, d, config.parallel_rescale, config.parallel_sign)
                         for r, d in zip(steps, directions)]
            offsets = update(offsets, steps)
        del grads, window_inputs

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
