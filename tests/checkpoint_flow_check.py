"""Runs inside an interpreter with ComfyUI importable (test_checkpoint_flows.py starts it): the Checkpoint Flow
node over a tiny SD1.5 UNet that ComfyUI's own loader read, against our diffusers backends on the same weights.

`run(cases)` returns plain numbers (relative errors, timesteps, messages) for the test to judge.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import comfy.sd
import comfy.samplers
import comfy.utils
import torch
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3
from safetensors.torch import save_file

from rectifid_core.flows.base import Conditioning
from rectifid_core.flows.denoiser import DenoiserFlow
from rectifid_core.flows.euler import EulerVelocityFlow
from rectifid_core.flows.perflow import PeRFlow
from rectifid_core.flows.stable_diffusion import StableDiffusionComponents
from tiny_diffusers import COMFY_SD15_LAYOUT, SD_SCHEDULER, tiny_comfy_sd15_unet, tiny_vae

SHAPE = (1, 4, 2, 2)
# float32 as ComfyUI samples (and ~5x faster than float64, whose CPU convolutions have no oneDNN kernel)
DTYPE = torch.float32
CFG = {"perflow": 3.0, "2-rf": 1.5}  # the reference scripts' scales (single_person.py)


def load_with_comfyui(unet: torch.nn.Module, folder: Path) -> Any:
    """Save the UNet as an LDM-layout single file and read it with ComfyUI's loader, under inference mode as its
    nodes run."""
    mapping = comfy.utils.unet_to_diffusers(COMFY_SD15_LAYOUT)
    weights = unet.state_dict()
    assert set(weights) <= set(mapping), "the tiny UNet's keys do not all map to ComfyUI's layout"
    path = folder / "tiny_perflow_unet.safetensors"
    save_file({"model.diffusion_model." + mapping[k]: v.contiguous() for k, v in weights.items()}, str(path))
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": DTYPE})


def backend(unet: torch.nn.Module, vae: torch.nn.Module, prediction: str, steps: int) -> Any:
    components = StableDiffusionComponents(unet=unet, vae=vae, text_encoder=None, tokenizer=None)
    if prediction == "euler_velocity":
        return EulerVelocityFlow(components, num_windows=steps, dtype=DTYPE)
    return PeRFlow(components, SD_SCHEDULER, prediction, num_windows=4, steps=steps, dtype=DTYPE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def _timestep_recorder(module: torch.nn.Module, seen: list[float]) -> Any:
    return module.register_forward_pre_hook(lambda _m, args: seen.extend(float(t) for t in args[1].reshape(-1)[:1]))


class Case:
    """One flow type and step count: the node run as ComfyUI runs it, then a sampler that compares."""

    def __init__(self, model: Any, unet: torch.nn.Module, vae: torch.nn.Module, node: Any, flow_type: str,
                 prediction: str, steps: int, seen_comfy: list[float], seen_ours: list[float], step_rule: Any) -> None:
        self.flow_type, self.prediction, self.steps, self.step_rule = flow_type, prediction, steps, step_rule
        with torch.inference_mode():
            self.model, self.sigmas = node.patch(model, flow_type, prediction, steps)
        self.ref = backend(unet, vae, "euler_velocity" if flow_type != "perflow" else prediction,
                           steps or 4)
        self.cfg = CFG["perflow" if flow_type == "perflow" else "2-rf"]
        g = torch.Generator().manual_seed(7)
        self.positive, self.negative = (torch.randn(1, 8, 768, generator=g, dtype=DTYPE) for _ in range(2))
        self.noise = torch.randn(SHAPE, generator=g, dtype=DTYPE)
        self.weights = torch.randn(SHAPE, generator=g, dtype=DTYPE)
        self.cond = Conditioning(batch=1, guidance_scale=self.cfg,
                                 tensors={"embeds": torch.cat([self.negative, self.positive])})
        self.seen_comfy, self.seen_ours = seen_comfy, seen_ours
        self.out: dict[str, Any] = {}

    def guider(self) -> Any:
        guider = comfy.samplers.CFGGuider(self.model)
        guider.set_conds([[self.positive, {}]], [[self.negative, {}]])
        guider.set_cfg(self.cfg)
        return guider

    def compare(self, model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict, callback: Any = None,
                disable: Any = None) -> torch.Tensor:
        """A sampler function: our DenoiserFlow over the denoiser ComfyUI hands a sampler, beside the backend."""
        with torch.inference_mode(False), torch.enable_grad():
            rule = self.step_rule(extra_args["model_options"], sigmas)  # the SAMPLER's hook
            ours = DenoiserFlow(lambda xx, s: model(xx, s, **extra_args), lambda z: z, rule, latent_channels=4,
                                vae_scale_factor=2, device="cpu", dtype=DTYPE)
            self.out["start_error"] = _rel(rule.start(x.detach().clone()), self.noise)
            noise = self.noise.clone().requires_grad_(True)
            z_ours, z_ref = rule.start(noise), noise
            states_ours, states_ref = [], [z_ref]
            self.seen_ours.clear()
            for i in range(ours.num_steps):
                z_ours = ours.step(z_ours, i, ours.conditioning(1))
                z_ref = self.ref.step(z_ref, i, self.cond)
                states_ours.append(z_ours)
                states_ref.append(z_ref)
            self.out["timesteps_backend"] = list(self.seen_ours)
            self.out["rollout_errors"] = [_rel(a, b) for a, b in zip(states_ours, states_ref[1:])]
            (grad_ours,) = torch.autograd.grad((rule.finish(z_ours) * self.weights).sum(), noise)
            (grad_ref,) = torch.autograd.grad((z_ref * self.weights).sum(), noise)
            self.out["grad_error"] = _rel(grad_ours, grad_ref)
            self.out["grad_norm"] = float(grad_ref.norm())
            self.seen_comfy.clear()
            with torch.no_grad():  # every step from the backend's own state
                self.out["step_errors"] = [_rel(ours.step(states_ref[i].detach(), i, ours.conditioning(1)),
                                                states_ref[i + 1]) for i in range(ours.num_steps)]
            self.out["timesteps_comfy"] = list(self.seen_comfy)
            with torch.no_grad():  # what the nearest wrong timestep (EPS sampling's 999 for 1000) would change
                self.out["timestep_999_change"] = _rel(self.ref.predict(self.noise, 999, self.cond),
                                                       self.ref.predict(self.noise, 1000, self.cond))
            self.out["anchor_ours"] = ours.anchor_coefficients()
            self.out["anchor_backend"] = self.ref.anchor_coefficients()
            self.final = states_ref[-1].detach()
            return rule.finish(z_ours).detach()

    def run(self) -> dict[str, Any]:
        self.out.update(flow_type=self.flow_type, prediction=self.prediction, steps=self.steps,
                        sigmas=self.sigmas.tolist(), sigmas_dtype=str(self.sigmas.dtype),
                        backend_timesteps=[float(t) for t in _flat(self.ref.timesteps())])
        latent = torch.zeros(SHAPE, dtype=DTYPE)
        self.guider().sample(self.noise, latent, comfy.samplers.KSAMPLER(self.compare), self.sigmas, seed=0)
        # ComfyUI's own euler sampler on the same MODEL and SIGMAS: the flow's unguided sample
        euler = self.guider().sample(self.noise, latent, comfy.samplers.sampler_object("euler"), self.sigmas, seed=0)
        self.out["euler_error"] = _rel(self.model.model.process_latent_in(euler), self.final)
        return self.out


def _flat(timesteps: list) -> list:
    return [t for ts in timesteps for t in (ts if isinstance(ts, list) else [ts])]


def _message(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:  # the test reads the message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def run(pack: Any, cases: list[tuple[str, str, int]], refusals: bool = False) -> dict[str, Any]:
    """`pack` is the loaded node pack (ComfyUI's own top-level `nodes` module shadows ours by name);
    `refusals` adds the messages for bad inputs."""
    node = pack.NODE_CLASS_MAPPINGS["RectifIDCheckpointFlow"]()
    unet, vae = tiny_comfy_sd15_unet(seed=3), tiny_vae()
    with tempfile.TemporaryDirectory() as tmp:
        model = load_with_comfyui(unet, Path(tmp))
    comfy_model = sys.modules[pack.__name__ + ".nodes.comfy_model"]
    comfy_model.make_trainable(model.model)  # as the RectifID SAMPLER does, once per model
    step_rule = comfy_model.step_rule
    seen_comfy: list[float] = []
    seen_ours: list[float] = []
    hooks = [_timestep_recorder(model.model.diffusion_model, seen_comfy), _timestep_recorder(unet, seen_ours)]
    eps_sampling = model.get_model_object("model_sampling")
    result: dict[str, Any] = {
        "model_sampling": type(eps_sampling).__mro__[1].__name__,
        # what ComfyUI's own EPS sampling would pass the UNet for PeRFlow's first sigma (t = 1000)
        "eps_timestep_at_sigma_max": float(eps_sampling.timestep(eps_sampling.sigma_max.reshape(1) * 1.01)),
        "cases": [Case(model, unet, vae, node, *case, seen_comfy, seen_ours, step_rule).run() for case in cases]}
    for hook in hooks:
        hook.remove()
    if not refusals:
        return result
    with torch.inference_mode():
        flow_model, _ = node.patch(model, "perflow", "auto", 0)
        rule_factory = flow_model.model_options["rectifid_step_rule"]
        flow_sampling = flow_model.get_model_object("model_sampling")
        simple = comfy.samplers.calculate_sigmas(flow_sampling, "simple", 4)
        karras = comfy.samplers.calculate_sigmas(flow_sampling, "karras", 4)
        result["errors"] = {
            "steps_below_windows": _message(lambda: node.patch(model, "perflow", "diff_eps", 3)),
            "unknown_flow_type": _message(lambda: node.patch(model, "perflow-xl", "auto", 0)),
            "eps_for_2rf": _message(lambda: node.patch(model, "2-rf", "ddim_eps", 0)),
            "flow_matching_model": _message(lambda: node.patch(ModelSamplingSD3().patch(model, 3.0)[0], "perflow",
                                                               "auto", 0)),
            "patched_twice": _message(lambda: node.patch(flow_model, "perflow", "auto", 0)),
            "foreign_sigmas": _message(lambda: rule_factory(karras)),
            "too_few_sigmas": _message(lambda: rule_factory(torch.tensor([1.0, 0.5, 0.0]))),
        }
        result["simple_sigmas"] = simple.tolist()
        v_model = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]  # how an SD2.1 v checkpoint loads
        result["auto_predictions"] = {
            name: node.patch(m, flow_type, "auto", 0)[0].model_options["rectifid_step_rule"].prediction_type
            for name, m, flow_type in (("eps", model, "perflow"), ("v_prediction", v_model, "perflow"),
                                       ("2-rf", model, "2-rf"))}
    return result
