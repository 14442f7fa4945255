"""Compiled fast path of the guidance iteration: torch.compile over the step calls, the decode and the recognizer.

Why: eager PyTorch spends most of an SD1.5 iteration launching small kernels (issue 9). Inductor fuses
them; on CUDA, mode "reduce-overhead" also records CUDA graphs (cudagraph trees) and replays each
call as one launch, forward and backward. Off CUDA it is plain inductor (C++/OpenMP kernels).

Shapes are static (dynamic=False): one graph per step index, latent shape and dtype, i.e. per
(image size, batch, steps). Dynamo keeps what it compiled on the code it compiled, guarded by these
shapes and the models' identity, for the life of the process, so a second run of a ComfyUI session
with the same shape compiles nothing; `ensure_compiled` remembers which (models, shape) were seen
to tell the user once that the first run compiles. Inductor's FX graph cache lives in a stable
folder under the user's cache (`cache_dir`), so after a restart the kernels are loaded, not built.

The crop/warp of the face objective (keypoints come from the detector on the host each iteration)
stays eager: one grid_sample, negligible next to the recognizer it feeds. So do the encoders of the
object (DINOv2) and CLIP objectives: only face recognizers are found (`recognizers`).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .flows.base import Conditioning, RectifiedFlow

logger = logging.getLogger(__name__)

COMPILE_MODES = ("off", "on")
CACHE_ENV = "RECTIFID_COMPILE_CACHE"
# Each step index is a graph of its own, and a session may see several sizes; dynamo's default
# limit of 8 graphs per compiled function would silently fall back to eager after that.
RECOMPILE_LIMIT = 256


def cache_dir() -> Path:
    """Where inductor's kernels persist across restarts: $RECTIFID_COMPILE_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rectifid" / "torch_compile"


def use_cache_dir() -> Path:
    """Point inductor at `cache_dir()` unless the user chose one (TORCHINDUCTOR_CACHE_DIR); returns the folder used."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_compile_support(device: torch.device | str) -> None:
    """Raise with what to install when torch.compile cannot build kernels for `device`."""
    device = torch.device(device)
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("compile 'on' needs torch.compile, which this Python/torch build does not support; "
                           "turn compile off")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise RuntimeError("compile 'on' on a CUDA device needs Triton (pip install triton; on Windows "
                               "pip install triton-windows); turn compile off to run without it")
    elif device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if not any(shutil.which(c) for c in (compiler, "c++", "clang++")):
            raise RuntimeError(f"compile 'on' on the CPU needs a C++ compiler ({compiler}, c++ or clang++ on PATH) "
                               "for inductor's kernels; install one (e.g. apt install g++) or turn compile off")
    else:
        raise RuntimeError(f"compile 'on' supports CUDA and CPU devices, not {device.type!r}; turn compile off")


def _compile_options(device: torch.device, cuda_graphs: bool) -> dict[str, Any]:
    # CUDA graphs only on CUDA (and where asked); elsewhere plain inductor
    mode = "reduce-overhead" if device.type == "cuda" and cuda_graphs else None
    return {"mode": mode, "dynamic": False, "fullgraph": False}


def _step(flow: RectifiedFlow, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
    return flow.step(z, k, cond)


def _decode(flow: RectifiedFlow, z: torch.Tensor) -> torch.Tensor:
    return flow.decode(z)


_session: dict[tuple[str, str], Any] = {}


def _compiled(fn: Any, device: torch.device, cuda_graphs: bool = True) -> Any:
    """The session's one torch.compile wrapper of `fn` for a device type.

    Made once: dynamo ties what it compiled to the torch.compile call that made it, so a new wrapper
    per run would compile again. Models are arguments, not a bound `self`, so a flow re-created over
    the same models (`with_steps`) passes the same guards and reuses the graphs.
    """
    key = (fn.__name__, device.type, cuda_graphs)
    if key not in _session:
        _session[key] = torch.compile(fn, **_compile_options(device, cuda_graphs))
    return _session[key]


class CompiledFlow:
    """A flow whose `step` and `decode` run compiled; everything else is the flow's own.

    On CUDA the outputs are cloned out of the CUDA-graph pool (a latent and an image: small next to
    a UNet call), so tensors the solver keeps across iterations are not overwritten by the next replay.
    """

    def __init__(self, flow: RectifiedFlow, cuda_graphs: bool = True) -> None:
        self._flow = flow
        self._device = torch.device(flow.device)
        self._graphs = cuda_graphs and self._device.type == "cuda"
        self._step = _compiled(_step, self._device, cuda_graphs)
        self._decode = _compiled(_decode, self._device, cuda_graphs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._flow, name)

    def _own(self, out: torch.Tensor) -> torch.Tensor:
        return out.clone() if self._graphs else out

    def step(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        if k == 0 and self._graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new rollout: earlier replays' outputs may be reused
        return self._own(self._step(self._flow, z, k, cond))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._own(self._decode(self._flow, z))


def _forward(module: torch.nn.Module, *args: Any) -> Any:
    return type(module).forward(module, *args)


def recognizers(objective: Any) -> list[torch.nn.Module]:
    """Every recognizer the objective runs on generated images.

    Face objectives hold FaceModels (`models.recognizer`), also inside a multi-subject objective
    (`subjects`); the benchmark's recognizer objective holds `net`.
    """
    found: dict[int, torch.nn.Module] = {}
    for part in [objective, *getattr(objective, "subjects", [])]:
        for module in (getattr(getattr(part, "models", None), "recognizer", None), getattr(part, "net", None)):
            if isinstance(module, torch.nn.Module):
                found.setdefault(id(module), module)
    return list(found.values())


@contextmanager
def compiled_recognizers(objective: Any, device: torch.device | str) -> Iterator[int]:
    """Run the objective's recognizers' forward compiled for the duration (the modules stay the same objects)."""
    modules = recognizers(objective)
    forward = _compiled(_forward, torch.device(device))
    try:
        for module in modules:
            module.forward = functools.partial(forward, module)
        yield len(modules)
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


_seen_shapes: set[tuple[Any, ...]] = set()


def _models_key(flow: RectifiedFlow) -> tuple[int, ...]:
    """Identity of the models a flow runs (a flow re-created with other steps shares them)."""
    components = getattr(flow, "components", None)
    return (id(components),) if components is not None else (id(flow),)


def first_run_message(flow: RectifiedFlow, shape: tuple[int, ...], num_steps: int) -> str | None:
    """'compiling for WxH, batch B, S steps (first run only)...' the first time these models meet this shape."""
    key = (*_models_key(flow), tuple(shape), num_steps, str(flow.dtype), str(flow.device))
    if key in _seen_shapes:
        return None
    _seen_shapes.add(key)
    f = flow.vae_scale_factor
    return (f"compiling for {shape[-1] * f}x{shape[-2] * f}, batch {shape[0]}, {num_steps} steps "
            f"(first run only; kernels are cached in {use_cache_dir()})...")


def show_compile_progress() -> None:
    """Print the compile notices on stderr (the CLI; ComfyUI's console shows INFO logs already)."""
    if not any(getattr(h, "rectifid_compile", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.rectifid_compile = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def compile_counters() -> dict[str, int]:
    """Dynamo's session counters: frames it compiled and graphs it produced (the tests read them)."""
    from torch._dynamo.utils import counters

    return {"frames_ok": int(counters["frames"]["ok"]), "unique_graphs": int(counters["stats"]["unique_graphs"])}


@contextmanager
def compiled_run(flow: RectifiedFlow, objective: Any, shape: tuple[int, ...],
                 cuda_graphs: bool = True) -> Iterator[RectifiedFlow]:
    """The flow to run compiled, with the objective's recognizers compiled, for one guidance run.

    Logs the first-run compile notice; the caller's callback sees the first iteration's time, which
    includes the compilation. `cuda_graphs=False` keeps plain inductor kernels on CUDA too.
    """
    check_compile_support(flow.device)
    use_cache_dir()
    message = first_run_message(flow, shape, flow.num_steps)
    if message:
        logger.info("RectifID: %s", message)
    started = time.perf_counter()
    limits = {"recompile_limit": max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit),
              "accumulated_recompile_limit": max(RECOMPILE_LIMIT * 4,
                                                 torch._dynamo.config.accumulated_recompile_limit)}
    with torch._dynamo.config.patch(**limits), compiled_recognizers(objective, flow.device):
        yield CompiledFlow(flow, cuda_graphs)
    if message:
        logger.info("RectifID: first compiled run took %.1f s (compilation included)", time.perf_counter() - started)
