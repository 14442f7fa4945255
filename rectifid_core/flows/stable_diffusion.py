"""Shared machinery of the Stable-Diffusion-family flows (SD1.x, SD2.x, SDXL UNets).

PeRFlow and the Euler velocity flows differ only in their window math; prompt
encoding, the classifier-free-guided UNet call and VAE decoding live here so
both backends use one implementation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .base import Conditioning, RectifiedFlow
from .schedule import cfg_combine


@dataclass
class StableDiffusionComponents:
    """The frozen models of one diffusers folder; `text_encoder_2`/`tokenizer_2` only for SDXL."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def _prompt_lists(prompts: list[str], negative_prompts: list[str]) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if isinstance(negative_prompts, str) or not all(isinstance(p, str) for p in negative_prompts):
        raise ValueError(f"negative_prompts must be a list of strings, got {negative_prompts!r}")
    negatives = list(negative_prompts)
    if len(negatives) == 0:
        negatives = [""] * len(prompts)
    elif len(negatives) == 1:
        negatives = negatives * len(prompts)
    elif len(negatives) != len(prompts):
        raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                         "give none, one, or one per prompt")
    return list(prompts), negatives


def vae_dtype(is_sdxl: bool, force_upcast: bool, dtype: torch.dtype) -> torch.dtype:
    """fp16 overflows the SDXL VAE (config force_upcast); the reference decodes bf16 SDXL in fp32 too."""
    return torch.float32 if is_sdxl and force_upcast and dtype != torch.float32 else dtype


def decoder_parts(vae: Any) -> list[torch.nn.Module]:
    """The resnets, attentions and upsamplers of the VAE decoder's mid and up blocks (diffusers' Decoder)."""
    decoder = vae.decoder
    parts = []
    for block in (decoder.mid_block, *decoder.up_blocks):
        for name in ("resnets", "attentions", "upsamplers"):
            parts += [m for m in getattr(block, name, None) or [] if m is not None]
    return parts


def _recomputed(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module's forward keeping only its inputs for the backward pass, which recomputes it."""
    forward = type(module).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
    return forward(module, *args, **kwargs)


def recompute_decoder(vae: Any, enabled: bool) -> None:
    """Let each resnet, attention and upsampler of the VAE decoder keep only its input for the backward pass.

    The decoder's backward then holds one of them at a time: at 128 px 144 MiB against 204 MiB
    with diffusers' per-block checkpoints (an up block holds three full-resolution resnets),
    for the same one extra decoder forward.
    """
    for part in decoder_parts(vae):
        if enabled:
            part.forward = functools.partial(_recomputed, part)
        else:
            part.__dict__.pop("forward", None)


class StableDiffusionFlow(RectifiedFlow):
    """A flow over a diffusers UNet2DConditionModel + AutoencoderKL + CLIP text encoder(s).

    All parameters are frozen and in eval mode; gradients flow only to the latent.
    Subclasses implement `step` and `window_gammas` with `predict` as their model.
    """

    def __init__(self, components: StableDiffusionComponents, num_windows: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        self.components = components
        self.num_windows = int(num_windows)
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype(components.is_sdxl, getattr(components.vae.config, "force_upcast", False), dtype)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(components, name)
            if module is None:
                continue
            module.requires_grad_(False)
            module.eval()
            module.to(device=self.device)
            target = self.vae_dtype if name == "vae" else dtype
            if module.dtype != target:
                module.to(dtype=target)
        self.memory_saving = False
        self.split_cfg = False
        self.latent_channels = int(components.unet.config.in_channels)
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.components.is_sdxl

    def set_memory_saving(self, enabled: bool, split_cfg: bool = False) -> None:
        """Recompute the VAE decoder per layer group (recompute_decoder); with `split_cfg` also run the CFG halves
        one at a time. The solver leaves the decode (and, with `split_cfg`, the step) unwrapped so that no
        activation is recomputed twice (recomputes_decode, recomputes_step).
        """
        self.memory_saving = bool(enabled)
        self.split_cfg = bool(enabled and split_cfg)
        recompute_decoder(self.components.vae, enabled)

    @property
    def recomputes_decode(self) -> bool:
        return self.memory_saving

    @property
    def recomputes_step(self) -> bool:
        return self.split_cfg

    def _tokens(self, tokenizer: Any, texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings (and SDXL's pooled embedding) for a list of prompts."""
        c = self.components
        if not c.is_sdxl:
            return c.text_encoder(self._tokens(c.tokenizer, texts))[0], None
        hidden, pooled = [], None
        for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = encoder(self._tokens(tokenizer, texts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, prompts: list[str], negative_prompts: list[str], guidance_scale: float) -> Conditioning:
        """Encode once under no_grad; the unconditional half is skipped when the scale is exactly 1."""
        prompts, negatives = _prompt_lists(prompts, negative_prompts)
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        with torch.no_grad():
            embeds, pooled = self._encode_texts(prompts)
            tensors: dict[str, Any] = {}
            if float(guidance_scale) != 1.0:
                neg_embeds, neg_pooled = self._encode_texts(negatives)
                if self.is_sdxl and self.components.force_zeros_for_empty_prompt:
                    empty = torch.tensor([n == "" for n in negatives], device=self.device).view(-1, 1, 1)
                    neg_embeds = neg_embeds.masked_fill(empty, 0.0)
                    neg_pooled = neg_pooled.masked_fill(empty.view(-1, 1), 0.0)
                embeds = torch.cat([neg_embeds, embeds])
                if pooled is not None:
                    pooled = torch.cat([neg_pooled, pooled])
            tensors["embeds"] = embeds.to(self.dtype)
            if pooled is not None:
                tensors["pooled"] = pooled.to(self.dtype)
        return Conditioning(batch=len(prompts), guidance_scale=float(guidance_scale), tensors=tensors)

    def predict(self, z: torch.Tensor, timestep: float, cond: Conditioning) -> torch.Tensor:
        """The UNet's output at `timestep`, classifier-free guided: one batched call, or two recomputed halves with split_cfg."""
        if z.shape[0] != cond.batch:
            raise ValueError(f"latent batch {z.shape[0]} does not match the conditioning batch {cond.batch}")
        embeds, pooled = cond.tensors["embeds"], cond.tensors.get("pooled")
        recompute = self.split_cfg and torch.is_grad_enabled()  # the solver then leaves this step unwrapped
        if cond.guidance_scale == 1.0:  # no CFG halves: the one call is what gets recomputed
            if recompute:
                return checkpoint(self._unet, z, timestep, embeds, pooled, use_reentrant=False)
            return self._unet(z, timestep, embeds, pooled)
        if not recompute:
            uncond, positive = self._unet(torch.cat([z, z]), timestep, embeds, pooled).chunk(2)
        else:
            b = cond.batch
            halves = [(embeds[:b], None if pooled is None else pooled[:b]),
                      (embeds[b:], None if pooled is None else pooled[b:])]
            uncond, positive = (checkpoint(self._unet, z, timestep, e, p, use_reentrant=False) for e, p in halves)
        return cfg_combine(uncond, positive, cond.guidance_scale)

    def prompt_direction(self, z: torch.Tensor, k: int, cond: Conditioning) -> torch.Tensor:
        """step(z | prompt) - step(z | negative), each half run without CFG (the embeds hold [negative, prompt])."""
        if cond.guidance_scale == 1.0:
            raise ValueError("parallel rescaling needs the prompt direction v_cond - v_uncond, which is only "
                             "encoded with classifier-free guidance: set cfg above 1")
        b = cond.batch

        def half(i: int) -> Conditioning:
            tensors = {name: t[i * b:(i + 1) * b] for name, t in cond.tensors.items() if name in ("embeds", "pooled")}
            return Conditioning(batch=b, guidance_scale=1.0, tensors=tensors)

        return self.step(z, k, half(1)) - self.step(z, k, half(0))

    def _unet(self, z: torch.Tensor, timestep: float, embeds: torch.Tensor,
              pooled: torch.Tensor | None) -> torch.Tensor:
        x = z.to(self.dtype)
        t = torch.full((x.shape[0],), float(timestep), device=self.device)
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            h, w = z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor
            # original size = target size = the image size, no crop (the pipeline default)
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=self.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(x.shape[0], 6)}
        return self.components.unet(x, t, encoder_hidden_states=embeds, **kwargs).sample.to(z.dtype)

    def vae_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z in the VAE's own scale: diffusers keeps latents multiplied by scaling_factor (minus shift_factor),
        ComfyUI's LATENT and its VAE Decode do not."""
        config = self.components.vae.config
        latent = z / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        return latent if shift is None else latent + shift

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """VAE decode to [B,3,H,W] float32 in 0..1, clamped like the diffusers image postprocessing."""
        image = self.components.vae.decode(self.vae_latent(z.to(self.vae_dtype))).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)
