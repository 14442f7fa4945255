"""Time and memory of guidance iterations against the floor of unavoidable work.

One configuration is measured per fresh process (`measure_in_subprocess`) so
that peak memories of different configurations are comparable.

What is measured:
- seconds per iteration: median over the solver's own iterations (timestamps
  taken in its callback, after a device sync), the first (warm-up) left out;
- floor: median time of the bare work of one iteration, K classifier-free-
  guided window calls + VAE decode + recognizer, forward and backward to every
  window input, with no solver around it (same process, same models). One floor
  pass runs inside the callback after every solver iteration, so iterations and
  floor passes alternate and share the machine's load (CPU runs here share
  their cores with other jobs);
- overhead = median over i of iteration_i / floor_i (each iteration against the
  floor pass right after it, which cancels slow drifts of the machine's load);
- peak memory on CUDA: torch.cuda.max_memory_allocated during a 2-iteration
  solver run (measured before the timing run, whose floor passes would
  otherwise set the peak);
- peak memory on CPU (torch has no CPU allocator statistics): (a) the peak of
  live torch CPU allocations during one iteration, from the profiler's
  allocation events (exact, deterministic, excludes weights allocated before),
  (b) the activations each part keeps for its backward, and the peak of the
  decode recomputed per resnet (same accounting; the constants of
  `guidance.estimate_guidance_bytes` come from here), and
  (c) the process's peak RSS during the loop above its RSS before it
  (VmHWM after resetting it; includes allocator caching, so it is noisier).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..guidance import GuidanceConfig, guide, initial_noise, resolve_memory_mode
from .models import BenchModels, build_models
from .transformer_models import TRANSFORMER_FAMILIES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BenchSettings:
    family: str = "tiny"
    width_scale: float = 0.1
    size: int = 64  # image side in pixels
    batch: int = 1
    windows: int = 4  # K
    iterations: int = 6  # N timed solver iterations (the first is warm-up)
    floor_repeats: int = 5
    dtype: str = "float32"
    device: str = "cpu"
    memory: str = "store"  # GuidanceConfig.memory
    mode: str = "anchored"
    channels_last: bool = False
    cfg_scale: float = 4.5
    seed: int = 0
    threads: int = 1  # torch CPU threads (1: least sensitive to other jobs on the cores); 0 = torch default
    compile: str = "off"  # GuidanceConfig.compile
    faces: str = ""  # antelopev2 folder: the real face objective (SCRFD in the loop) instead of the recognizer alone
    reference: str = ""  # the reference photo for `faces`

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.iterations < 2:
            raise ValueError(f"need >= 2 timed iterations (the first is warm-up), got {self.iterations}")
        if self.floor_repeats < 1:
            raise ValueError(f"floor_repeats must be >= 1, got {self.floor_repeats}")
        if self.channels_last and self.family in TRANSFORMER_FAMILIES:
            raise ValueError("--channels-last converts UNet convolutions; the flux and sd35 transformers have none")
        if self.faces and self.channels_last:
            raise ValueError("--channels-last converts the benchmark's own recognizer; leave it out with --faces")
        if bool(self.faces) != bool(self.reference):
            raise ValueError("--faces and --reference go together: the face objective needs a reference photo")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} requested but torch sees no CUDA device")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def floor_pass(models: BenchModels, cond: Any, noise: torch.Tensor) -> None:
    """The unavoidable work of one iteration: the chain forward, then its backward to every step input."""
    flow = models.flow
    z = noise.detach().clone().requires_grad_(True)
    starts = []
    for k in range(flow.num_steps):
        starts.append(z)
        z = flow.step(z, k, cond)
    loss = models.objective(flow.decode(z)).loss.float().sum()
    torch.autograd.grad(loss, starts)


def _time(fn: Any, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def profiled_peak_bytes(fn: Any) -> int:
    """Peak of live torch CPU allocations made while `fn` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def retained_bytes(fn: Any) -> int:
    """Bytes of torch CPU allocations still live when `fn` returns (what a forward keeps for its backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()
    total = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
                if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    del kept
    return total


def decode_recompute_peak(flow: Any, latent: torch.Tensor) -> int:
    """Peak live bytes of the decode's forward and backward with the backend recomputing its decoder blocks."""
    flow.set_memory_saving(True)
    try:
        with torch.enable_grad():
            x = latent.detach().requires_grad_(True)
            return profiled_peak_bytes(lambda: torch.autograd.grad(flow.decode(x).sum(), x))
    finally:
        flow.set_memory_saving(False)


def activation_bytes(models: BenchModels, cond: Any, noise: torch.Tensor) -> dict[str, int]:
    """Activations one window call (CFG included), the VAE decode and the recognizer keep for the backward,
    and the peak of the decode recomputed per resnet (`decode_recompute_peak`)."""
    z = noise.detach().clone().requires_grad_(True)
    with torch.no_grad():
        latent = models.flow.step(z, 0, cond)
        image = models.flow.decode(latent)
    with torch.enable_grad():
        return {
            "window": retained_bytes(lambda: models.flow.step(z, 0, cond)),
            "decode": retained_bytes(lambda: models.flow.decode(latent.detach().requires_grad_(True))),
            "decode_recompute": decode_recompute_peak(models.flow, latent),
            "recognizer": retained_bytes(lambda: models.objective(image.detach().requires_grad_(True)).loss),
        }


def face_objective(s: BenchSettings, dtype: torch.dtype) -> Any:
    """The real face objective: SCRFD (onnxruntime) in the loop, the pack's ArcFace on the benchmark's device."""
    from ..images import load_image
    from ..objectives import FaceIdentityObjective, load_face_models

    models = load_face_models(s.faces, provider="auto", device=s.device)
    models.recognizer.to(dtype)
    return FaceIdentityObjective(models, load_image(s.reference))


def user_wait_seconds(flow: Any, cond: Any, objective: Any, noise: torch.Tensor, config: GuidanceConfig,
                      device: torch.device) -> dict[str, float]:
    """What a user waits for, in a fresh process: the first image (compilation included when compile is on),
    the next image of the same size, and plain sampling (no guidance) with the same settings, warm."""
    first = _time(lambda: guide(flow, cond, objective, noise, config), device)
    second = _time(lambda: guide(flow, cond, objective, noise, config), device)
    plain = _time(lambda: guide(flow, cond, objective, noise, replace(config, iterations=0)), device)
    return {"first_image_seconds": first, "next_image_seconds": second, "plain_sampling_seconds": plain}


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device_name": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}


def run_settings(s: BenchSettings) -> dict[str, Any]:
    """Measure one configuration in this process (call it in a fresh process for comparable memory)."""
    s.validate()
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    dtype = DTYPES[s.dtype]
    # FLUX / SD3.5 text encoders sit on the CPU after encoding, so their depth changes nothing measured here
    text_layers = 1 if s.family in TRANSFORMER_FAMILIES else None
    models = build_models(s.family, s.width_scale, s.windows, s.device, dtype, s.seed, text_layers)
    flow = models.flow
    if s.faces:
        models.objective = face_objective(s, dtype)
    if s.channels_last:
        for module in (flow.components.unet, flow.components.vae, models.objective.net):
            module.to(memory_format=torch.channels_last)
    cond = flow.encode(["a photo of a person"] * s.batch, [""], s.cfg_scale)
    noise = initial_noise(flow.latent_shape(s.batch, s.size, s.size), s.seed, device, dtype)
    config = GuidanceConfig(scale=1.0, iterations=s.iterations, mode=s.mode, memory=s.memory, compile=s.compile)
    waits = user_wait_seconds(flow, cond, models.objective, noise, config, device)  # first: the process is cold

    iteration_times: list[float] = []
    floor_times: list[float] = []
    resumed = [0.0]

    def timed_floor() -> float:
        # The floor is the work without any recomputation, so the backend's own checkpoints go off for it.
        saving, split = flow.memory_saving, flow.split_cfg
        flow.set_memory_saving(False)
        try:
            return _time(lambda: floor_pass(models, cond, noise), device)
        finally:
            flow.set_memory_saving(saving, split)

    def interleave(_: Any) -> None:
        # Alternate solver iterations with floor passes so that both see the same machine load.
        _sync(device)
        iteration_times.append(time.perf_counter() - resumed[0])
        floor_times.append(timed_floor())
        resumed[0] = time.perf_counter()

    # Memory first, without floor passes in between (they would set the peak themselves).
    _sync(device)
    rss_before = _proc_status_kib("VmRSS")
    rss_reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    guide(flow, cond, models.objective, noise, replace(config, iterations=2))
    _sync(device)
    rss_peak = _proc_status_kib("VmHWM")
    peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    resumed[0] = time.perf_counter()
    guide(flow, cond, models.objective, noise, config, callback=interleave)
    del iteration_times[0], floor_times[0]  # warm-up
    extra = max(0, s.floor_repeats - len(floor_times))
    floor_times += [timed_floor() for _ in range(extra)]
    profiled = parts = None
    if device.type == "cpu":
        profiled = profiled_peak_bytes(lambda: guide(flow, cond, models.objective, noise,
                                                     replace(config, iterations=1)))
        parts = activation_bytes(models, cond, noise)
    sec_it = statistics.median(iteration_times)
    floor = statistics.median(floor_times)
    return {
        "settings": asdict(s),
        "environment": environment(device),
        "latent_shape": list(noise.shape),
        "memory_resolved": resolve_memory_mode(s.memory, flow, tuple(noise.shape)),
        "seconds_per_iteration": sec_it,
        "iteration_times": iteration_times,
        "floor_seconds": floor,
        "floor_times": floor_times,
        "overhead": statistics.median(i / f for i, f in zip(iteration_times, floor_times)),
        **waits,
        "cuda_peak_allocated_bytes": peak_alloc,
        "cuda_peak_above_start_bytes": None if peak_alloc is None else peak_alloc - base_alloc,
        "cpu_profiled_peak_bytes": profiled,
        "cpu_activation_bytes": parts,
        "rss_before_bytes": None if rss_before is None else rss_before * 1024,
        "rss_peak_above_start_bytes": (rss_peak - rss_before) * 1024 if rss_reset and rss_peak and rss_before
        else None,
    }


def measure_in_subprocess(s: BenchSettings, timeout: float | None = None) -> dict[str, Any]:
    """Run `run_settings` in a fresh Python process; its peak memory is then its own."""
    cmd = [sys.executable, "-m", "rectifid_core.benchmark", "_one", json.dumps(asdict(s))]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}) for {asdict(s)}:\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"benchmark subprocess printed no result for {asdict(s)}:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])
