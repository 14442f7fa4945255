"""Stable Diffusion 3.x (SD3.5 Large Turbo) from a StableDiffusion3Pipeline folder, as Euler steps in sigma space.

Prompt features as StableDiffusion3Pipeline builds them: CLIP-L and CLIP-G penultimate
hidden states side by side, zero-padded to T5's width and followed by the T5 tokens (zeros
when the folder has no T5), pooled = both CLIP projections; the sigmas of the scheduler's
own shifted linspace (shift 3.0 in SD3.5's config); the transformer called at
t = sigma * 1000; true CFG over [negative, prompt] when the scale is above 1.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import FlowDefaults
from .flow_matching import FlowMatchingComponents, FlowMatchingFlow, calculate_shift

TURBO_STEPS = 4
# stabilityai/stable-diffusion-3.5-large-turbo model card example: num_inference_steps=4, guidance_scale=0.0
# (CFG off; cfg 1 here); StableDiffusion3Pipeline samples 1024x1024 by default (sample_size 128 x 8).
_TURBO = FlowDefaults(1024, 1024, 1.0, "stable-diffusion-3.5-large-turbo model card: num_inference_steps=4, "
                                       "guidance_scale=0.0 (no CFG); StableDiffusion3Pipeline default size 1024x1024")


class SD3Flow(FlowMatchingFlow):
    """SD3.x over SD3Transformer2DModel + AutoencoderKL (scaling and shift) + CLIP-L + CLIP-G + T5."""

    activation_family = "sd35"

    def __init__(self, components: FlowMatchingComponents, num_steps: int = TURBO_STEPS,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int = 256) -> None:
        self.patch_size = int(components.transformer.config.patch_size)
        self.max_sequence_length = int(max_sequence_length)  # the pipeline's default
        super().__init__(components, num_steps, device, dtype)

    def with_steps(self, num_steps: int) -> "SD3Flow":
        """The same models with `num_steps` Euler steps on the pipeline's sigmas for that count."""
        if num_steps == self.num_steps:
            return self
        return SD3Flow(self.components, num_steps, self.device, self.dtype, self.max_sequence_length)

    def defaults(self) -> FlowDefaults:
        return _TURBO

    def _schedule_arguments(self, latent_height: int, latent_width: int) -> tuple[None, float | None]:
        config = self.components.scheduler_config
        if not config.get("use_dynamic_shifting"):
            return None, None
        p = self.patch_size
        return None, calculate_shift((latent_height // p) * (latent_width // p), config.get("base_image_seq_len", 256),
                                     config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                     config.get("max_shift", 1.16))

    def _clip(self, tokenizer: Any, encoder: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = encoder(self._tokens(tokenizer, texts, self.components.tokenizer.model_max_length),
                      output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        c = self.components
        hidden_l, pooled_l = self._clip(c.tokenizer, c.text_encoder, texts)
        hidden_g, pooled_g = self._clip(c.tokenizer_2, c.text_encoder_2, texts)
        clip = torch.cat([hidden_l, hidden_g.to(hidden_l.dtype)], dim=-1)
        if c.text_encoder_3 is None:
            t5 = torch.zeros(len(texts), self.max_sequence_length, c.transformer.config.joint_attention_dim,
                             device=clip.device, dtype=clip.dtype)
        else:
            t5 = c.text_encoder_3(self._tokens(c.tokenizer_3, texts, self.max_sequence_length))[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip.to(self.dtype), t5.to(self.dtype)], dim=-2)
        pooled = torch.cat([pooled_l, pooled_g.to(pooled_l.dtype)], dim=-1)
        return {"embeds": embeds, "pooled": pooled.to(self.dtype)}

    def _transformer(self, z: torch.Tensor, timestep: float, tensors: dict[str, Any],
                     guidance_scale: float) -> torch.Tensor:
        x = z.to(self.dtype)
        # as the pipeline: the scheduler's float32 timestep (sigma * 1000), not cast to the latent dtype
        t = torch.tensor(timestep, dtype=torch.float32, device=self.device).expand(x.shape[0])
        out = self.components.transformer(hidden_states=x, timestep=t, encoder_hidden_states=tensors["embeds"],
                                          pooled_projections=tensors["pooled"], return_dict=False)[0]
        return out.to(z.dtype)
