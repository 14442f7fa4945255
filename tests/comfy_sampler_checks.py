"""Checks of the RectifID SAMPLER against ComfyUI's real code, run in a fresh interpreter (see test_comfy_sampler.py).

`python comfy_sampler_checks.py <comfyui> <models dir> <group>` prints one JSON line of measurements. Everything
runs under torch.inference_mode() as ComfyUI executes nodes; models come from ComfyUI's own loader functions.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

COND_TOKENS, COND_DIM, POOLED_DIM = 5, 32, 24


def setup(comfyui: str) -> None:
    sys.path.insert(0, comfyui)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True


def conditioning(seed: int, dtype: torch.dtype = torch.float32) -> tuple[list, torch.Tensor, torch.Tensor]:
    """A CONDITIONING list as CLIPTextEncode gives it, and its tensors for our backend."""
    gen = torch.Generator().manual_seed(seed)
    cross = torch.randn(1, COND_TOKENS, COND_DIM, generator=gen, dtype=dtype)
    pooled = torch.randn(1, POOLED_DIM, generator=gen, dtype=dtype)
    return [[cross, {"pooled_output": pooled}]], cross, pooled


def probe(seed: int) -> tuple:
    """float64 conditioning, starting noise [1,16,4,4], per-step weights and a 32x32 target image for a loss."""
    cond, cross, pooled = conditioning(seed, torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    noise, weights = (torch.randn(1, 16, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    return cond, cross, pooled, noise, weights, torch.rand(1, 3, 32, 32, generator=gen, dtype=torch.float64), gen


def diffusers_vae(models: Path, scaling_factor: float, shift_factor: float):
    """diffusers' AutoencoderKL in float64 with the weights ComfyUI's VAE loads and the model's latent format."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    import tiny_comfy_models as tcm
    vae = AutoencoderKL(**tcm.VAE_CONFIG, scaling_factor=scaling_factor, shift_factor=shift_factor).to(torch.float64)
    vae.load_state_dict(load_file(str(models / "vae.safetensors")))
    return vae


def backend(flow_class, transformer, vae, scheduler_config: dict, cross: torch.Tensor, pooled: torch.Tensor):
    """Our diffusers backend (SD3Flow / FluxFlow) over already loaded float64 modules, fed the CONDITIONING's tensors
    directly (no text encoders), cfg 1: the flow and its conditioning."""
    from rectifid_core.flows.base import Conditioning
    from rectifid_core.flows.flow_matching import FlowMatchingComponents

    components = FlowMatchingComponents(transformer, vae, scheduler_config, text_encoder=None, tokenizer=None)
    flow = flow_class(components, 4, "cpu", torch.float64)
    return flow, Conditioning(batch=1, guidance_scale=1.0, tensors={"embeds": cross, "pooled": pooled})


def capture_flow(pack, guider, sigmas, noise, vae, work):
    """Run ComfyUI's sampling with a sampler function that hands the RectifID flow to `work(flow, rule, x)`."""
    import comfy.samplers
    comfy_run = pack.nodes.comfy_run
    out = {}

    def function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        with comfy_run.comfy_flow(model, x, sigmas, dict(extra_args or {}), vae) as (flow, rule):
            out["value"] = work(flow, rule, x)
        return x

    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(function), sigmas, seed=0)
    return out["value"]


def gradients(flow, cond, x, weights, target):
    """d(sum w * (step_k(x) - x))/dx (the model's part of each step) from the same x, the latent after each step, and
    d(image loss)/dx through the whole chain: the same code for the ComfyUI adapter and our backend."""
    x = x.detach().clone()
    per_step = []
    for k in range(flow.num_steps):
        z = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(((flow.step(z, k, cond) - z) * weights).sum(), z)
        per_step.append(g)
    z = x.clone().requires_grad_(True)
    end, states = z, []
    for k in range(flow.num_steps):
        end = flow.step(end, k, cond)
        states.append(end.detach())
    image = flow.decode(end)
    (g,) = torch.autograd.grad(((image - target) ** 2).sum(), z)
    return per_step, g, image.detach(), states


def comfy_gradients(flow, rule, x, weights, target):
    """`gradients` through the adapter, from ComfyUI's noise-scaled start."""
    return gradients(flow, flow.conditioning(x.shape[0]), rule.start(x), weights, target)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def comparison(ours, theirs) -> dict:
    return {"steps": [rel_error(a, b) for a, b in zip(ours[0], theirs[0], strict=True)],
            "chain": rel_error(ours[1], theirs[1]), "image": rel_error(ours[2], theirs[2]),
            "states": [rel_error(a, b) for a, b in zip(ours[3], theirs[3], strict=True)],
            "chain_norm": float(theirs[1].norm()), "step_norms": [float(g.norm()) for g in theirs[0]]}


def sd3_gradients(pack, models: Path) -> dict:
    """(i) and (ii): gradients through the adapter vs our SD3Flow over the same float64 diffusers transformer and VAE,
    without and with a LoRA (merged into the diffusers weights for the backend)."""
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    import tiny_comfy_models as tcm
    from rectifid_core.flows.sd3 import SD3Flow
    from tiny_transformer_flows import SD35_SCHEDULER

    f64 = torch.float64
    cond, cross, pooled, noise, weights, target, gen = probe(1)
    rank = 2
    lora = {}
    for name, (out_dim, in_dim) in {"transformer_blocks.0.attn.to_q": (128, 128),
                                    "transformer_blocks.1.ff.net.2": (128, 512)}.items():
        lora[f"transformer.{name}.lora_A.weight"] = 0.3 * torch.randn(rank, in_dim, generator=gen, dtype=f64)
        lora[f"transformer.{name}.lora_B.weight"] = 0.3 * torch.randn(out_dim, rank, generator=gen, dtype=f64)
    strength = 0.8

    transformer = SD3Transformer2DModel(**tcm.SD3_CONFIG).to(f64)
    transformer.load_state_dict(load_file(str(models / "sd3.safetensors")))
    flow, flow_cond = backend(SD3Flow, transformer, diffusers_vae(models, 1.5305, 0.0609), SD35_SCHEDULER, cross,
                              pooled)

    out = {}
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model(str(models / "sd3.safetensors"), model_options={"dtype": f64})
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae.safetensors")), dtype=f64)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", 4)
        out["sigmas"] = sigmas.tolist()

        def run(model):
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(cond, cond)
            guider.set_cfg(1.0)
            return capture_flow(pack, guider, sigmas, noise, vae,
                                lambda flow, rule, x: comfy_gradients(flow, rule, x, weights, target))

        ours = run(patcher)
        lora_patcher, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), strength, 0)
        ours_lora = run(lora_patcher)
    out["backend_sigmas"] = flow.sigmas(32, 32)
    theirs = gradients(flow, flow_cond, noise, weights, target)
    out["plain"] = comparison(ours, theirs)
    with torch.no_grad():
        for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2"):
            module = transformer.get_submodule(name)
            module.weight += strength * lora[f"transformer.{name}.lora_B.weight"] @ lora[f"transformer.{name}.lora_A.weight"]
    theirs_lora = gradients(flow, flow_cond, noise, weights, target)
    out["lora"] = comparison(ours_lora, theirs_lora)
    out["lora_changes_chain"] = rel_error(ours_lora[1], ours[1])
    return out


def flux_gradients(pack, models: Path) -> dict:
    """(i) for a FLUX.1-schnell-shaped model: ComfyUI's rope op and in-place residual blocks, differentiated through
    the adapter, against our FluxFlow (packed tokens, image ids) over diffusers' FluxTransformer2DModel on the same
    weights in float64."""
    import comfy.ldm.flux.math as flux_math
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    import tiny_comfy_models as tcm
    from rectifid_core.flows.flux import FluxFlow
    from tiny_transformer_flows import FLUX_SCHNELL_SCHEDULER

    f64 = torch.float64
    cond, cross, pooled, noise, weights, target, _ = probe(3)
    transformer = FluxTransformer2DModel(**tcm.FLUX_CONFIG).to(f64)
    transformer.load_state_dict(load_file(str(models / "flux.safetensors")))
    flow, flow_cond = backend(FluxFlow, transformer, diffusers_vae(models, 0.3611, 0.1159), FLUX_SCHNELL_SCHEDULER,
                              cross, pooled)

    kitchen_rope = flux_math.apply_rope
    f32 = torch.float32  # ComfyUI's rope kernel (comfy_kitchen) takes fp16, bf16 and fp32 only
    with torch.inference_mode():
        patcher = tcm.load_tiny_flux(models / "flux.safetensors", f32)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae.safetensors")), dtype=f32)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 4)
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds([[cross.float(), {"pooled_output": pooled.float()}]], cond)
        guider.set_cfg(1.0)
        ours = capture_flow(pack, guider, sigmas, noise.float(), vae,
                            lambda flow, rule, x: comfy_gradients(flow, rule, x, weights.float(), target.float()))
    theirs = gradients(flow, flow_cond, noise, weights, target)
    return {"model": type(patcher.model).__name__, "sigmas": sigmas.tolist(), "backend_sigmas": flow.sigmas(32, 32),
            "comparison": comparison(ours, theirs), "rope_module": getattr(kitchen_rope, "__module__", ""),
            "rope_restored": flux_math.apply_rope is kitchen_rope,
            "without_fixes": flux_backward_without_fixes(pack, patcher.model.diffusion_model)}


def flux_backward_without_fixes(pack, diffusion_model) -> dict:
    """Why the adapter patches anything: ComfyUI's Flux blocks backpropagated with ComfyUI's rope op, and with a rope
    that has a backward but without the LayerNorm input copies."""
    import comfy.ldm.flux.math as flux_math
    comfy_model = pack.nodes.comfy_model
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    inputs = (torch.tensor([0.5]), torch.randn(1, COND_TOKENS, COND_DIM))
    kitchen_rope, errors = flux_math.apply_rope, {}
    for name, rope in (("kitchen_rope", kitchen_rope), ("no_norm_copies", comfy_model._rope_with_backward(kitchen_rope))):
        flux_math.apply_rope = rope
        try:
            diffusion_model(x, *inputs, y=torch.randn(1, POOLED_DIM)).sum().backward()
            errors[name] = None
        except RuntimeError as exc:
            errors[name] = str(exc)
        finally:
            flux_math.apply_rope = kitchen_rope
    return errors


def sd3_sampling(pack, models: Path) -> dict:
    """(iii)-(vi): SamplerCustomAdvanced with the SAMPLER on a float32 model under inference mode, a face objective,
    ordinary sampling before and after, cancel and progress, bad inputs."""
    import comfy.model_management as mm
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced, Noise_RandomNoise

    import tiny_faces
    from rectifid_core.objectives import FaceIdentityObjective, load_face_models

    build = pack.nodes.comfy_sampler.RectifIDComfySampler().get_sampler
    out: dict = {}
    faces_root = models / "insightface"
    if not faces_root.exists():
        tiny_faces.build_antelopev2(faces_root)
    with torch.inference_mode(False):
        objective = FaceIdentityObjective(load_face_models(faces_root, provider="cpu"),
                                          tiny_faces.face_image((64, 64), ((8, 8, 1.0, 0.3),), cell=4))
    bundle = pack.nodes.common.ObjectiveBundle(objective, ["person"])
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append([value, total]))

    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model(str(models / "sd3.safetensors"))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / "vae.safetensors")))
        cond, _, _ = conditioning(1)
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(cond, conditioning(2)[0])
        guider.set_cfg(2.0)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", 4)
        latent = {"samples": torch.zeros(1, 16, 8, 8)}
        euler = comfy.samplers.sampler_object("euler")

        def sample(sampler, sigmas=sigmas):
            return SamplerCustomAdvanced.execute(Noise_RandomNoise(7), guider, sampler, sigmas, latent)[0]["samples"]

        def loss(samples):
            image = vae.decode(samples).movedim(-1, 1)
            with torch.inference_mode(False):
                return float(objective(image.clone()).loss.sum())

        before = sample(euler)
        out["inference_weights_before"] = next(patcher.model.parameters()).is_inference()
        plain_sampler = build(bundle, vae, 0.0, 0, "auto", "anchored", "per_window")[0]
        plain = sample(plain_sampler)
        guided_sampler = build(bundle, vae, 0.0, 3, "auto", "anchored", "per_window")[0]
        updates.clear()
        guided = sample(guided_sampler)
        out["progress"] = updates[:]
        out["report"] = guided_sampler.extra_options["rectifid"].report
        out["inference_weights_after"] = next(patcher.model.parameters()).is_inference()
        after = sample(euler)
        out["bit_identical"] = torch.equal(before, after)
        out["plain_vs_euler"] = float((plain - before).abs().max() / before.abs().max())
        out["loss"] = {"euler": loss(before), "plain": loss(plain), "guided": loss(guided)}
        out["guided_changed"] = float((guided - plain).abs().max())
        checkpoint_sampler = build(bundle, vae, 0.0, 1, "checkpoint", "anchored", "per_window")[0]
        store_sampler = build(bundle, vae, 0.0, 1, "store", "anchored", "per_window")[0]
        stored = sample(store_sampler)
        out["checkpoint_vs_store"] = float((sample(checkpoint_sampler) - stored).abs().max())
        images, one_box, report = pack.nodes.comfy_sampler.RectifIDComfySample().sample(
            patcher, cond, conditioning(2)[0], vae, bundle, latent, 7, 4, 2.0, "normal", 0.0, 1, "auto", "anchored",
            "per_window")
        out["one_box_vs_custom_advanced"] = float((one_box["samples"] - stored).abs().max())
        out["one_box_image_shape"] = list(images.shape)
        out["one_box_report"] = report

        calls = []

        def cancel_after_first(value, total, preview, node_id=None):
            calls.append(value)
            mm.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(cancel_after_first)
        try:
            sample(build(bundle, vae, 0.0, 50, "store", "anchored", "per_window")[0])
            out["cancelled"] = False
        except mm.InterruptProcessingException:
            out["cancelled"] = True
        out["cancel_progress"] = calls
        out["flag_left"] = mm.processing_interrupted()
        comfy.utils.set_progress_bar_global_hook(None)

        errors = {}

        def error(name, call):
            try:
                call()
                errors[name] = None
            except Exception as exc:  # the message is what the test checks
                errors[name] = f"{type(exc).__name__}: {exc}"

        error("no_vae", lambda: build(bundle, None, 0.0, 2, "auto", "anchored", "per_window"))
        error("no_objective", lambda: build(None, vae, 0.0, 2, "auto", "anchored", "per_window"))
        small_vae = comfy.sd.VAE(sd=taesd_state_dict(4))
        error("wrong_channels", lambda: sample(build(bundle, small_vae, 0.0, 2, "auto", "anchored", "per_window")[0]))
        error("rising_sigmas", lambda: sample(plain_sampler, torch.tensor([1.0, 0.5, 0.7, 0.0])))
    out["errors"] = errors
    return out


def taesd_state_dict(latent_channels: int) -> dict:
    """A TAESD state dict (what ComfyUI's VAELoader reads from vae_approx files), random weights."""
    from comfy.taesd.taesd import TAESD
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TAESD(latent_channels=latent_channels).state_dict().items()}


def main() -> None:
    comfyui, models, group = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    setup(comfyui)
    import comfy_executor as ce
    pack = ce.load_pack()
    checks = {"sd3_gradients": sd3_gradients, "sd3_sampling": sd3_sampling, "flux_gradients": flux_gradients}
    print(json.dumps(checks[group](pack, models)))


if __name__ == "__main__":
    main()
