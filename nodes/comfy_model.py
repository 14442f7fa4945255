"""ComfyUI's own MODEL and VAE as a differentiable RectifiedFlow, for the RectifID SAMPLER.

Inside a ComfyUI sampler function the model is `model(x, sigma, **extra_args)`: the
guided x0 estimate with the user's prompts, CFG, LoRA patches and parameterization
already applied. `rectifid_core.flows.denoiser.DenoiserFlow` walks Euler steps over
exactly that callable, so this module only makes the call differentiable:

- loader nodes run under torch.inference_mode(), so weights are inference tensors that
  can never be saved for a backward pass: `make_trainable` swaps them, in place, for normal
  tensors over the same memory (no copy; ordinary sampling afterwards is bit-identical; a
  tensor already normal is skipped, so a second run costs nothing);
- ComfyUI's default rope op (comfy_kitchen) has no backward and FLUX-family blocks add
  residuals in place onto tensors their LayerNorms saved; sage/flash attention kernels
  have no backward. `differentiable_calls` fixes all three for the duration of a run only.

The VAE is differentiated through `vae.first_stage_model.decode` (VAE.decode detaches
into a preallocated buffer and may fall back to tiled decoding) with the latent format's
`process_latent_out` and ComfyUI's own output mapping `vae.process_output`.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rectifid_core.flows.denoiser import EulerSigmas, StepRule

STEP_RULE_KEY = "rectifid_step_rule"  # model_options entry: a StepRule, or a callable SIGMAS -> StepRule


def make_trainable(module: torch.nn.Module) -> int:
    """Make every inference-tensor parameter and buffer of `module` a normal tensor over the same memory.

    The new tensor views the old one's storage: nothing is copied, so no extra memory. It does not
    require grad: RectifID differentiates with respect to the latents only, and an inference weight
    behaves as one that does not (torch's linear takes another kernel path for non-contiguous
    inputs when the weight requires grad), so ordinary sampling afterwards stays bit-identical.
    Returns how many tensors were converted (0 once a model has been converted).
    """
    converted = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    normal = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                    normal.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
                    if isinstance(tensor, torch.nn.Parameter):
                        normal = torch.nn.Parameter(normal, requires_grad=False)
                    store[name] = normal
                    converted += 1
    return converted


def normal_conds(conds: dict[str, list[dict[str, Any]]]) -> int:
    """Clone the inference tensors in a guider's per-run conds (CONDRegular.cond), so no op can fail to save one.

    These are the conds ComfyUI built for this run (process_conds), not the user's CONDITIONING.
    Returns how many were cloned.
    """
    cloned = 0
    with torch.inference_mode(False):
        for entries in conds.values():
            for entry in entries:
                for cond in (entry.get("model_conds") or {}).values():
                    tensor = getattr(cond, "cond", None)
                    if isinstance(tensor, torch.Tensor) and tensor.is_inference():
                        cond.cond = tensor.clone()
                        cloned += 1
    return cloned


class _RopeWithBackward(torch.autograd.Function):
    """ComfyUI's rope op in the forward (same numbers as ordinary sampling) with its exact backward.

    Rope rotates every pair of channels by a 2x2 matrix F from `freqs_cis` [..., 2, 2];
    the gradient of F x is F^T g, i.e. the same op with the matrices transposed.
    """

    @staticmethod
    def forward(ctx: Any, op: Callable, xq: torch.Tensor, xk: torch.Tensor,
                freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.op = op
        ctx.save_for_backward(freqs_cis)
        ctx.dtypes = (xq.dtype, xk.dtype)
        return op(xq, xk, freqs_cis)

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor) -> tuple:
        (freqs_cis,) = ctx.saved_tensors
        transposed = freqs_cis.transpose(-1, -2).contiguous()
        gq, gk = ctx.op(gq.contiguous(), gk.contiguous(), transposed)
        return None, gq.to(ctx.dtypes[0]), gk.to(ctx.dtypes[1]), None


def _rope_with_backward(op: Callable) -> Callable:
    def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _RopeWithBackward.apply(op, xq, xk, freqs_cis)
    return apply_rope


def _clone_norm_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    """LayerNorm saves its input for the backward; FLUX/MMDiT blocks then add residuals onto it in place."""
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(), *args[1:])
    return None


def _attention_with_backward(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """transformer_options override: PyTorch's SDPA (which has a backward) whatever kernel ComfyUI chose."""
    from comfy.ldm.modules.attention import attention_pytorch
    return attention_pytorch(*args, **kwargs)


@contextlib.contextmanager
def differentiable_calls(diffusion_model: torch.nn.Module) -> Iterator[None]:
    """For the duration of the block: rope with a backward in ComfyUI's model modules, and LayerNorm inputs
    copied while gradients are on. Everything is restored afterwards, so later sampling is untouched."""
    import comfy.ldm.flux.math as flux_math

    kitchen_rope = getattr(flux_math, "apply_rope", None)
    patched = []
    if kitchen_rope is not None and getattr(kitchen_rope, "__module__", "").startswith("comfy_kitchen"):
        replacement = _rope_with_backward(kitchen_rope)
        for name, module in list(sys.modules.items()):
            if name.startswith("comfy.ldm.") and getattr(module, "apply_rope", None) is kitchen_rope:
                patched.append(module)
                module.apply_rope = replacement
    norms = (torch.nn.LayerNorm,)
    hooks = [m.register_forward_pre_hook(_clone_norm_input) for m in diffusion_model.modules() if isinstance(m, norms)]
    try:
        yield
    finally:
        for handle in hooks:
            handle.remove()
        for module in patched:
            module.apply_rope = kitchen_rope


def with_attention_override(extra_args: dict[str, Any]) -> dict[str, Any]:
    """A copy of the sampler's extra_args whose transformer_options route attention through SDPA."""
    model_options = dict(extra_args.get("model_options") or {})
    transformer_options = dict(model_options.get("transformer_options") or {})
    transformer_options["optimized_attention_override"] = _attention_with_backward
    model_options["transformer_options"] = transformer_options
    return {**extra_args, "model_options": model_options}


def step_rule(model_options: dict[str, Any], sigmas: torch.Tensor) -> StepRule:
    """The step rule a patched MODEL asks for (model_options["rectifid_step_rule"]), else Euler steps in sigma space.

    The entry is a StepRule, or a callable taking the run's SIGMAS (a 1-D float tensor on the CPU) and returning one.
    """
    rule = model_options.get(STEP_RULE_KEY)
    if rule is None:
        return EulerSigmas(sigmas.tolist())
    if isinstance(rule, type) or (callable(rule) and not hasattr(rule, "step")):
        rule = rule(sigmas)
    for name in ("num_steps", "step", "anchor_coefficients", "start", "finish"):
        if not hasattr(rule, name):
            raise TypeError(f"model_options[{STEP_RULE_KEY!r}] gave a {type(rule).__name__} without {name!r}; it must "
                            "be a StepRule (rectifid_core/flows/denoiser.py) or a callable returning one")
    if rule.num_steps != len(sigmas) - 1:
        raise ValueError(f"the model's step rule runs {rule.num_steps} steps but the sigmas give {len(sigmas) - 1}; "
                         "connect the sigmas of the node that patched the model")
    return rule


def vae_decoder(vae: Any, base_model: Any, last_sigma: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Differentiable sampler-space latent -> image [B,3,H,W] in 0..1, as the sampler's output then VAE Decode give.

    The steps are inverse_noise_scaling at the last sigma (what KSAMPLER applies to the samples), the
    latent format's process_latent_out (what the guider applies), the VAE's first stage decoder and
    ComfyUI's own output mapping.
    """
    model_sampling = base_model.model_sampling
    first_stage, vae_dtype, device = vae.first_stage_model, vae.vae_dtype, vae.device

    def decode(x: torch.Tensor) -> torch.Tensor:
        latent = base_model.process_latent_out(model_sampling.inverse_noise_scaling(last_sigma, x))
        image = first_stage.decode(latent.to(device=device, dtype=vae_dtype))
        return vae.process_output(image.float())

    return decode
