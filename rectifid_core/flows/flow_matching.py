"""Shared machinery of the flow-matching transformer flows (FLUX.1, SD3.x): Euler steps in sigma space.

These models are trained as x_sigma = (1 - sigma) x_0 + sigma * noise with a velocity
target, and their diffusers pipelines sample them with FlowMatchEulerDiscreteScheduler:
    z_{i+1} = z_i + (sigma_{i+1} - sigma_i) * v(z_i, sigma_i).
Each step is one window of a plain Euler flow (no gammas, c_k = 1), as for 2-RF /
InstaFlow. The sigmas come from the scheduler class itself, called with the arguments
the pipeline passes, so shift, dynamic shifting and terminal stretching follow the
folder's own scheduler config. Family specifics (text encoders, the transformer call,
latent packing) live in flux.py and sd3.py.
"""
from __future__ import annotations

import logging
import math
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .base import Conditioning, RectifiedFlow
from .schedule import cfg_combine
from .stable_diffusion import _prompt_lists, recompute_decoder

logger = logging.getLogger(__name__)


@dataclass
class FlowMatchingComponents:
    """The frozen models of one FluxPipeline / StableDiffusion3Pipeline folder.

    FLUX: text_encoder = CLIP-L (pooled), text_encoder_2 = T5. SD3: CLIP-L, CLIP-G (both
    with projection), text_encoder_3 = T5 (None when the folder ships without it, as the
    pipeline allows).
    """

    transformer: Any
    vae: Any
    scheduler_config: dict[str, Any]
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    def text_encoders(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """mu of the resolution-dependent shift: linear in the image token count (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def check_scheduler_config(config: dict[str, Any]) -> None:
    """Refuse scheduler settings under which a step is not the deterministic Euler step above."""
    if config.get("stochastic_sampling"):
        raise ValueError("the scheduler config sets stochastic_sampling, which re-noises every step; RectifID needs "
                         "the deterministic Euler steps (set stochastic_sampling to false in scheduler_config.json)")
    if config.get("invert_sigmas"):
        raise ValueError("the scheduler config sets invert_sigmas (sigma running 0 -> 1), which no text-to-image "
                         "FLUX / SD3 pipeline samples with; set it to false in scheduler_config.json")


def scheduler_sigmas(config: dict[str, Any], num_steps: int, sigmas: list[float] | None = None,
                     mu: float | None = None) -> tuple[list[float], list[float]]:
    """(sigmas incl. the final 0, timesteps) of FlowMatchEulerDiscreteScheduler.set_timesteps, as float32 values.

    `sigmas` and `mu` are what the pipeline passes to `retrieve_timesteps`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs: dict[str, Any] = {} if mu is None else {"mu": mu}
    if sigmas is None:
        scheduler.set_timesteps(num_steps, **kwargs)
    else:
        scheduler.set_timesteps(sigmas=sigmas, **kwargs)
    return scheduler.sigmas.tolist(), scheduler.timesteps.tolist()


def _cfg_half(cond: Conditioning, half: int) -> Conditioning:
    """The negative (0) or prompt (1) half of a true-CFG conditioning ([negative, prompt] batches), without CFG."""
    b = cond.batch
    return Conditioning(batch=b, guidance_scale=1.0,
                        tensors={n: t[half * b:(half + 1) * b] for n, t in cond.tensors.items()})


class FlowMatchingFlow(RectifiedFlow):
    """A flow-matching transformer + AutoencoderKL sampled by Euler steps in sigma space.

    The latent is the VAE latent as the pipeline keeps it (scaled, shifted), [B, C, h, w]
    unpacked. Parameters are frozen in eval mode; gradients flow only to the latent. The
    text encoders live on the CPU and visit the device only while `encode` runs.
    Subclasses provide the transformer call, prompt encoding and the sigma schedule's inputs.
    """

    patch_size: int  # latent cells per transformer token side: an image side must be a multiple of f * patch_size
    activation_family: str  # key of guidance.ACTIVATION_BYTES

    def __init__(self, components: FlowMatchingComponents, num_steps: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if int(num_steps) < 1:
            raise ValueError(f"steps must be >= 1, got {num_steps}")
        check_scheduler_config(components.scheduler_config)
        self.components = components
        self.num_windows = int(num_steps)
        self.device = torch.device(device)
        self.dtype = dtype
        for module in (components.transformer, components.vae, *components.text_encoders()):
            module.requires_grad_(False)
            module.eval()
            if module.dtype != dtype:
                module.to(dtype=dtype)
        components.transformer.to(device=self.device)
        components.vae.to(device=self.device)
        for encoder in components.text_encoders():
            encoder.to(device="cpu")
        self.memory_saving = False
        self.split_cfg = False
        self._encoder_device = torch.device("cpu")
        self.latent_channels = int(components.vae.config.latent_channels)
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self._schedules: dict[tuple[int, int], tuple[list[float], list[float], list[float]]] = {}

    # --- schedule -------------------------------------------------------------------------------------------
    @abstractmethod
    def _schedule_arguments(self, latent_height: int, latent_width: int) -> tuple[list[float] | None, float | None]:
        """(sigmas, mu) the pipeline passes to the scheduler for this latent size and self.num_steps."""

    def schedule(self, latent_height: int, latent_width: int) -> tuple[list[float], list[float], list[float]]:
        """(sigmas with the final 0, model timesteps, Euler dt per step) for a latent size, cached.

        dt is sigma_{i+1} - sigma_i taken in float32, as the scheduler's step takes it.
        """
        key = (int(latent_height), int(latent_width))
        if key not in self._schedules:
            sigmas, mu = self._schedule_arguments(*key)
            values, timesteps = scheduler_sigmas(self.components.scheduler_config, self.num_steps, sigmas, mu)
            s32 = torch.tensor(values, dtype=torch.float32)
            self._schedules[key] = (values, timesteps, (s32[1:] - s32[:-1]).tolist())
        return self._schedules[key]

    def sigmas(self, height: int, width: int) -> list[float]:
        """The num_steps + 1 sigmas (last 0) an image of height x width pixels is sampled on."""
        _, _, h, w = self.latent_shape(1, height, width)
        return list(self.schedule(h, w)[0])

    def window_gammas(self) -> None:
        return None

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """As the base class, and sides a multiple of VAE factor x patch size (the transformer's tokens)."""
        m = self.vae_scale_factor * self.patch_size
        for name, value in (("width", width), ("height", height)):
            if value > 0 and value % m:
                raise ValueError(f"{name} {value} is not a multiple of {m} (the VAE's {self.vae_scale_factor}x "
                                 f"downscale times the transformer's {self.patch_size}x{self.patch_size} patches); "
                                 f"try {max(m, round(value / m) * m)}")
        return super().latent_shape(batch, height, width)

    # --- memory ---------------------------------------------------------------------------------------------
    def set_memory_saving(self, enabled: bool, split_cfg: bool = False) -> None:
        """Recompute each transformer block and each VAE decoder layer group (recompute_decoder) in the backward;
        `split_cfg` also runs the CFG halves one at a time.

        Block-level recomputation keeps one block input per block and step instead of every
        activation, and each activation is recomputed once, so the solver wraps neither the
        step nor the decode again (recomputes_step, recomputes_decode). diffusers' block
        checkpointing is non-reentrant and works in eval mode with frozen weights.
        """
        self.memory_saving = bool(enabled)
        self.split_cfg = bool(enabled and split_cfg)
        if enabled:
            self.components.transformer.enable_gradient_checkpointing()
        else:
            self.components.transformer.disable_gradient_checkpointing()
        recompute_decoder(self.components.vae, enabled)

    @property
    def recomputes_decode(self) -> bool:
        return self.memory_saving

    @property
    def recomputes_step(self) -> bool:
        return self.memory_saving

    # --- prompts --------------------------------------------------------------------------------------------
    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether this scale runs true classifier-free guidance (a negative half); > 1 as the pipelines do."""
        return guidance_scale > 1.0

    @abstractmethod
    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Batch-first prompt tensors for the transformer call, in self.dtype (tokens go to the encoders' device)."""

    @contextmanager
    def _encoders_on(self, device: torch.device) -> Iterator[None]:
        """The text encoders on `device` while prompts are encoded, back on the CPU (and the cache freed) after."""
        encoders = self.components.text_encoders()
        self._encoder_device = device
        try:
            for encoder in encoders:
                encoder.to(device)
            yield
        finally:
            for encoder in encoders:
                encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _tokens(self, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self._encoder_device)

    def encode(self, prompts: list[str], negative_prompts: list[str], guidance_scale: float) -> Conditioning:
        """Encode once under no_grad; the negative half only when the scale runs true CFG ([negative, prompt])."""
        prompts, negatives = _prompt_lists(prompts, negative_prompts)
        scale = float(guidance_scale)
        if not math.isfinite(scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        try:
            tensors = self._encode_on(self.device, prompts, negatives, scale)
        except torch.OutOfMemoryError:
            # T5-XXL (~9 GiB in bf16) beside the transformer does not fit every card: slower on the CPU, but it runs
            logger.warning("the text encoders do not fit on %s beside the transformer; encoding on the CPU",
                           self.device)
            tensors = self._encode_on(torch.device("cpu"), prompts, negatives, scale)
        return Conditioning(batch=len(prompts), guidance_scale=scale, tensors=tensors)

    def _encode_on(self, device: torch.device, prompts: list[str], negatives: list[str],
                   scale: float) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self._encoders_on(device):
            tensors = self._encode_texts(prompts)
            if self.uses_cfg(scale):
                negative = self._encode_texts(negatives)
                tensors = {name: torch.cat([negative[name], t]) for name, t in tensors.items()}
        return {name: t.to(self.device) for name, t in tensors.items()}

    # --- model calls ----------------------------------------------------------------------------------------
    @abstractmethod
    def _transformer(self, z: torch.Tensor, timestep: float, tensors: dict[str, torch.Tensor],
                     guidance_scale: float) -> torch.Tensor:
        """The velocity at model timestep `timestep` for latent z [B,C,h,w], in z's layout and dtype."""

    def velocity(self, z: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        """The (true-CFG-combined) velocity of step i: one batched call, or the two halves one at a time."""
        if z.shape[0] != cond.batch:
            raise ValueError(f"latent batch {z.shape[0]} does not match the conditioning batch {cond.batch}")
        timestep = self.schedule(z.shape[-2], z.shape[-1])[1][i]
        scale = cond.guidance_scale
        if not self.uses_cfg(scale):
            return self._transformer(z, timestep, cond.tensors, scale)
        if self.split_cfg and torch.is_grad_enabled():
            uncond, positive = (self._transformer(z, timestep, _cfg_half(cond, h).tensors, scale) for h in (0, 1))
        else:
            uncond, positive = self._transformer(torch.cat([z, z]), timestep, cond.tensors, scale).chunk(2)
        return cfg_combine(uncond, positive, scale)

    def step(self, z: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        """z + (sigma_{i+1} - sigma_i) * v(z, sigma_i): the scheduler's Euler step."""
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step index {i} is out of range for {self.num_steps} steps")
        dt = self.schedule(z.shape[-2], z.shape[-1])[2][i]
        return z + dt * self.velocity(z, i, cond)

    def prompt_direction(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        """step(z | prompt) - step(z | negative), each half without CFG (the tensors hold [negative, prompt])."""
        if not self.uses_cfg(cond.guidance_scale):
            raise ValueError("parallel rescaling needs the prompt direction v_cond - v_uncond, which is only "
                             "encoded with classifier-free guidance: set cfg above 1")
        return self.step(z, k, _cfg_half(cond, 1)) - self.step(z, k, _cfg_half(cond, 0))

    # --- decoding -------------------------------------------------------------------------------------------
    def vae_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z / scaling_factor + shift_factor: the VAE decoder's input, as the pipelines compute it."""
        config = self.components.vae.config
        shift = getattr(config, "shift_factor", None)
        latent = z / config.scaling_factor
        return latent if shift is None else latent + shift

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """VAE decode to [B,3,H,W] float32 in 0..1, clamped like the diffusers image postprocessing."""
        vae = self.components.vae
        image = vae.decode(self.vae_latent(z).to(vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)
