"""The compiled fast path (rectifid_core.compiled): same iterates as eager, compiled once per shape per session.

The flow is a closed-form elementwise double (no mutable state, which dynamo would guard on) whose
decode is the image itself, so the real face objective (tiny SCRFD in onnxruntime, tiny ArcFace in
torch) sees a face in every iterate. Everything runs in float64: inductor's reordered reductions
change results by ~1e-16 relative there, so a tolerance of 1e-9 cannot hide a wrong graph (a
stale step index, a missing offset or a recognizer that is not the reference's moves the loss
by > 1e-3).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch

import tiny_faces
from rectifid_core import compiled
from rectifid_core.flows.base import Conditioning, RectifiedFlow
from rectifid_core.guidance import GuidanceConfig, guide
from rectifid_core.objectives import FaceIdentityObjective, load_face_models

SIZE = 64  # the tiny detector's grid scales with the image; one face cell of 4 px at (8, 8)


class PixelFlow(RectifiedFlow):
    """Window k: z -> z + h_k * tanh(a_k * z + b_k) on a logit image; decode = sigmoid."""

    num_windows = 3
    latent_channels = 3
    vae_scale_factor = 1
    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.a = [0.5 + torch.rand(1, 3, SIZE, SIZE, generator=gen, dtype=self.dtype) for _ in range(3)]
        self.b = [0.1 * torch.randn(1, 3, SIZE, SIZE, generator=gen, dtype=self.dtype) for _ in range(3)]
        self.h = [0.05, -0.04, 0.03]

    def encode(self, prompts, negative_prompts, guidance_scale):
        return Conditioning(len(prompts), guidance_scale)

    def step(self, z, k, cond):
        return z + self.h[k] * torch.tanh(self.a[k] * z + self.b[k])

    def decode(self, z):
        return torch.sigmoid(z)

    def window_gammas(self):
        return None


@pytest.fixture(scope="module")
def face_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    tiny_faces.build_antelopev2(root)
    models = load_face_models(root, provider="cpu")
    models.recognizer.to(torch.float64)
    reference = tiny_faces.face_image((SIZE, SIZE), ((8, 8, 1.0, 0.3),), cell=4)
    objective = FaceIdentityObjective(models, reference)
    flow = PixelFlow()
    image = tiny_faces.face_image((SIZE, SIZE), ((8, 8, 0.9, 0.35),), cell=4).double()
    noise = torch.logit(image.clamp(0.02, 0.98)).expand(2, -1, -1, -1).contiguous()
    noise[1] += 0.05 * torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return flow, flow.encode(["x", "x"], [], 1.0), objective, noise


def test_compiled_run_matches_eager_and_a_second_run_compiles_nothing(face_setup, caplog):
    caplog.set_level(logging.INFO, logger=compiled.__name__)
    flow, cond, objective, noise = face_setup
    recognizer = objective.models.recognizer
    config = GuidanceConfig(iterations=3, scale=1.0)
    eager_latents, compiled_latents = [], []
    eager = guide(flow, cond, objective, noise, config, callback=lambda i: eager_latents.append(i.latent))
    assert all(s is not None for d in eager.diagnostics for s in d["similarity"])  # the face is found and steered
    assert eager.losses[-1] < eager.losses[0] - 1e-3

    before = compiled.compile_counters()
    fast = guide(flow, cond, objective, noise, dataclasses.replace(config, compile="on"),
                 callback=lambda i: compiled_latents.append(i.latent))
    first = compiled.compile_counters()
    assert first["unique_graphs"] > before["unique_graphs"]  # it did compile
    assert objective.models.recognizer is recognizer and "forward" not in vars(recognizer)  # eager again after
    notices = [r.getMessage() for r in caplog.records]
    assert any(f"compiling for {SIZE}x{SIZE}, batch 2, 3 steps (first run only" in m for m in notices)
    assert any(m.startswith("RectifID: first compiled run took") for m in notices)
    caplog.clear()

    torch.testing.assert_close(torch.tensor(fast.losses, dtype=torch.float64),
                               torch.tensor(eager.losses, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    for mine, theirs in zip(compiled_latents, eager_latents, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.latent, eager.latent, rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.image, eager.image, rtol=0, atol=1e-9)

    again = guide(flow, cond, objective, noise, dataclasses.replace(config, compile="on"))
    assert compiled.compile_counters() == first  # same shape, same models: nothing compiled again
    assert not caplog.records  # and no compile notice
    assert again.losses == fast.losses


def test_compiled_steps_inside_checkpoints_give_the_stored_result(face_setup):
    """memory 'checkpoint' and 'partial:1' recompute (some of) the compiled step calls in the backward: same
    iterates as eager store."""
    flow, cond, objective, noise = face_setup
    config = GuidanceConfig(iterations=2, scale=1.0)
    eager = guide(flow, cond, objective, noise, config)
    for memory in ("checkpoint", "partial:1"):
        fast = guide(flow, cond, objective, noise, dataclasses.replace(config, compile="on", memory=memory))
        torch.testing.assert_close(torch.tensor(fast.losses, dtype=torch.float64),
                                   torch.tensor(eager.losses, dtype=torch.float64), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(fast.image, eager.image, rtol=0, atol=1e-9)


def test_compile_off_runs_no_compiler_and_equals_the_default_path(face_setup):
    flow, cond, objective, noise = face_setup
    config = GuidanceConfig(iterations=2, scale=1.0)
    before = compiled.compile_counters()
    off = guide(flow, cond, objective, noise, dataclasses.replace(config, compile="off"))
    assert compiled.compile_counters() == before
    default = guide(flow, cond, objective, noise, config)
    assert off.losses == default.losses
    assert torch.equal(off.latent, default.latent) and torch.equal(off.image, default.image)


def test_first_run_notice_names_the_shape_once():
    flow = PixelFlow()
    shape = (2, 3, SIZE, SIZE)
    message = compiled.first_run_message(flow, shape, 3)
    assert message.startswith(f"compiling for {SIZE}x{SIZE}, batch 2, 3 steps (first run only")
    assert compiled.first_run_message(flow, shape, 3) is None
    assert compiled.first_run_message(flow, (1, 3, SIZE, SIZE), 3) is not None  # another batch compiles anew


def test_cache_dir_is_stable_and_outside_the_pack(monkeypatch, tmp_path):
    monkeypatch.delenv(compiled.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compiled.use_cache_dir() == tmp_path / "xdg" / "rectifid" / "torch_compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "rectifid" / "torch_compile")
    pack = Path(compiled.__file__).resolve().parents[1]
    assert pack not in compiled.cache_dir().resolve().parents
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice wins
    assert compiled.use_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "ours"))
    assert compiled.cache_dir() == tmp_path / "ours"


def test_unusable_compile_setups_are_named(monkeypatch):
    with pytest.raises(ValueError, match="unknown compile option 'yes'; choose one of off, on"):
        GuidanceConfig(compile="yes").validate()
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*turn compile off"):
        compiled.check_compile_support("cpu")
    with pytest.raises(RuntimeError, match="supports CUDA and CPU devices, not 'mps'"):
        compiled.check_compile_support("mps")


def test_cli_and_node_pass_compile_on(monkeypatch, tmp_path, capsys):
    """--compile and the sampler's last input reach the solver: with no C++ compiler both stop with its name;
    with one, the node (under inference mode, as in ComfyUI) gives the eager images."""
    import comfy_executor as ce
    from rectifid_core.cli import main

    from PIL import Image

    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    root = ce.tiny_models_dir("diffusers", "insightface")
    status = main(["--flow", str(root / "diffusers" / ce.MODEL_NAMES["diffusers"]), "--faces",
                   str(root / "insightface"), "--device", "cpu", "--subject", f"face={tmp_path / 'a.png'}",
                   "--prompt", "a photo", "--compile", "--output", str(tmp_path / "out.png")])
    assert status == 2 and "needs a C++ compiler" in capsys.readouterr().err

    pack = ce.load_pack()
    sampler = pack.NODE_CLASS_MAPPINGS["RectifIDSampler"]
    required = sampler.INPUT_TYPES()["required"]
    assert list(required)[-1] == "compile" and required["compile"] == (["off", "on"], required["compile"][1])
    assert required["compile"][1]["default"] == "off"
    flow = PixelFlow()
    flow.latent_shape = lambda b, h, w: (b, 3, h, w)
    bundle = pack.nodes.common.ObjectiveBundle(lambda image: image.mean(dim=(1, 2, 3)), ["x"])
    args = ("a photo", "", SIZE, SIZE, 0, 0, 2, 1.0, 1.0, "per_window", "anchored", "store", 1)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        sampler().sample(flow, bundle, *args, "on")
    monkeypatch.undo()
    with torch.inference_mode():  # as ComfyUI runs nodes
        eager, *_ = sampler().sample(flow, bundle, *args, "off")
        fast, *_ = sampler().sample(flow, bundle, *args, "on")
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-6)  # ComfyUI images are float32


def test_cuda_graphs_only_on_cuda_and_not_under_outer_recomputation(monkeypatch):
    assert compiled._compile_options(torch.device("cuda"), True)["mode"] == "reduce-overhead"
    assert compiled._compile_options(torch.device("cuda"), False)["mode"] is None
    assert compiled._compile_options(torch.device("cpu"), True)["mode"] is None
    import rectifid_core.guidance as guidance

    asked = []

    def record(flow, objective, shape, cuda_graphs=True):
        asked.append(cuda_graphs)
        return contextlib.nullcontext(flow)

    monkeypatch.setattr(guidance, "compiled_run", record)
    flow = PixelFlow()
    cond = flow.encode(["x"], [""], 1.0)
    noise = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float64)
    for memory in ("store", "recompute_vae", "checkpoint", "partial:1"):
        guidance.guide(flow, cond, lambda image: image.sum(dim=(1, 2, 3)), noise,
                       guidance.GuidanceConfig(iterations=1, memory=memory, compile="on"))
    assert asked == [True, True, False, False]
