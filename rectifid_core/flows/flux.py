"""FLUX.1 (schnell; dev with its distilled guidance) from a FluxPipeline folder, as Euler steps in sigma space.

Everything the pipeline does around the transformer is reproduced: 2x2 latent packing
into tokens, the image position ids, the CLIP pooled + T5 prompt features with zero
text ids, the sigmas linspace(1, 1/n, n) shifted by mu(image tokens) when the scheduler
asks for dynamic shifting, and the transformer called at t = timestep / 1000.
The latent the solver sees stays unpacked, [B, 16, H/8, W/8].
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import FlowDefaults
from .flow_matching import FlowMatchingComponents, FlowMatchingFlow, calculate_shift

SCHNELL_STEPS = 4
DEV_STEPS = 28  # FluxPipeline's num_inference_steps default
# black-forest-labs/FLUX.1-schnell model card example: guidance_scale=0.0, num_inference_steps=4,
# max_sequence_length=256; FluxPipeline samples 1024x1024 by default (default_sample_size 128 x 8).
# cfg 1 = no classifier-free guidance (schnell has no guidance embedding, so diffusers ignores 0.0).
_SCHNELL = FlowDefaults(1024, 1024, 1.0, "FLUX.1-schnell model card: guidance_scale=0.0 (no CFG), "
                                         "num_inference_steps=4, max_sequence_length=256; FluxPipeline default "
                                         "size 1024x1024")
# FluxPipeline's guidance_scale default 3.5 is the distilled guidance FLUX.1-dev embeds.
_DEV = FlowDefaults(1024, 1024, 3.5, "FluxPipeline defaults for a guidance-distilled transformer: "
                                     "guidance_scale=3.5 (embedded), 1024x1024")


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B, (h/2)(w/2), 4C]: FluxPipeline._pack_latents."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B,C,h,w]: FluxPipeline._unpack_latents for a latent of h x w cells."""
    b, _, channels = tokens.shape
    return tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] position ids (0, row, column) of the packed tokens: FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFlow(FlowMatchingFlow):
    """FLUX.1 over FluxTransformer2DModel + AutoencoderKL (scaling and shift) + CLIP-L pooled + T5.

    schnell (guidance_embeds False): cfg 1 runs one call per step; cfg > 1 runs true CFG
    against the negative prompt, as FluxPipeline's true_cfg_scale does. A guidance-distilled
    transformer (guidance_embeds True, FLUX.1-dev) gets the cfg value as its embedded
    guidance, as the pipeline's guidance_scale, and never runs a negative half.
    """

    patch_size = 2  # the 2x2 packing
    activation_family = "flux"

    def __init__(self, components: FlowMatchingComponents, num_steps: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None) -> None:
        self.guidance_embeds = bool(components.transformer.config.guidance_embeds)
        if num_steps is None:
            num_steps = DEV_STEPS if self.guidance_embeds else SCHNELL_STEPS
        # schnell was trained with 256 T5 tokens (its model card); the pipeline's default is 512
        self.max_sequence_length = int(max_sequence_length or (512 if self.guidance_embeds else 256))
        super().__init__(components, num_steps, device, dtype)

    def with_steps(self, num_steps: int) -> "FluxFlow":
        """The same models with `num_steps` Euler steps on the pipeline's sigmas for that count."""
        if num_steps == self.num_steps:
            return self
        return FluxFlow(self.components, num_steps, self.device, self.dtype, self.max_sequence_length)

    def defaults(self) -> FlowDefaults:
        return _DEV if self.guidance_embeds else _SCHNELL

    def uses_cfg(self, guidance_scale: float) -> bool:
        return not self.guidance_embeds and guidance_scale > 1.0

    def _schedule_arguments(self, latent_height: int, latent_width: int) -> tuple[list[float] | None, float]:
        config = self.components.scheduler_config
        n = self.num_steps
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n).tolist()
        mu = calculate_shift((latent_height // 2) * (latent_width // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return sigmas, mu

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        c = self.components
        clip_ids = self._tokens(c.tokenizer, texts, c.tokenizer.model_max_length)
        pooled = c.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self._tokens(c.tokenizer_2, texts, self.max_sequence_length)
        embeds = c.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return {"embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def _transformer(self, z: torch.Tensor, timestep: float, tensors: dict[str, Any],
                     guidance_scale: float) -> torch.Tensor:
        x = z.to(self.dtype)
        b, _, h, w = x.shape
        embeds = tensors["embeds"]
        # as the pipeline: the float32 timestep cast to the latent dtype, then / 1000
        t = torch.tensor(timestep, dtype=torch.float32, device=self.device).expand(b).to(x.dtype) / 1000
        guidance = (torch.full([1], guidance_scale, dtype=torch.float32, device=self.device).expand(b)
                    if self.guidance_embeds else None)
        out = self.components.transformer(
            hidden_states=pack_latents(x), timestep=t, guidance=guidance, pooled_projections=tensors["pooled"],
            encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device,
                                                              dtype=embeds.dtype),
            img_ids=latent_image_ids(h, w, self.device, x.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w).to(z.dtype)
