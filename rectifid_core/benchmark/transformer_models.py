"""Random-weight FLUX.1-schnell and SD3.5 Large Turbo models with their real configs, for timing and memory only.

The configs are the official config.json values of the diffusers folders
black-forest-labs/FLUX.1-schnell (transformer/, vae/, text_encoder/ = CLIP ViT-L/14 text,
text_encoder_2/ = T5 v1.1 XXL encoder) and stabilityai/stable-diffusion-3.5-large-turbo
(transformer/, vae/, text_encoder/ = CLIP-L with projection, text_encoder_2/ = OpenCLIP
bigG with projection, text_encoder_3/ = T5 v1.1 XXL), written out here because no weights
or hub files can be fetched. `width_scale` scales the attention heads of the transformer
and the text encoders (head size kept); the VAE always has its real widths.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..flows.flow_matching import FlowMatchingComponents, FlowMatchingFlow
from ..flows.flux import FluxFlow
from ..flows.sd3 import SD3Flow

TRANSFORMER_FAMILIES = ("flux", "sd35")

FLUX_SCHNELL_TRANSFORMER = {"attention_head_dim": 128, "guidance_embeds": False, "in_channels": 64,
                            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                            "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
                            "axes_dims_rope": (16, 56, 56)}
SD35_LARGE_TRANSFORMER = {"attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16,
                          "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38, "out_channels": 16,
                          "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                          "qk_norm": "rms_norm", "sample_size": 128}
# both VAEs: SD's AutoencoderKL topology with 16 latent channels and no quant convs; their own scaling/shift
_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": False,
        "use_post_quant_conv": False, "mid_block_add_attention": True}
VAE_FACTORS = {"flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
               "sd35": {"scaling_factor": 1.5305, "shift_factor": 0.0609}}
SCHEDULERS = {"flux": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                       "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
              "sd35": {"num_train_timesteps": 1000, "shift": 3.0}}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0,
          "pad_token_id": 0, "eos_token_id": 1}
# CLIP ViT-L/14 text and OpenCLIP ViT-bigG/14 text: (hidden, layers, heads, activation)
_CLIPS = {"flux": [(768, 12, 12, "quick_gelu")], "sd35": [(768, 12, 12, "quick_gelu"), (1280, 32, 20, "gelu")]}


def _heads(heads: int, width_scale: float) -> int:
    return max(1, round(heads * width_scale))


def transformer_config(family: str, width_scale: float = 1.0) -> dict[str, Any]:
    """The transformer config with its heads scaled; text widths follow `clip_configs` / `t5_config`."""
    clips = clip_configs(family, width_scale)
    t5 = t5_config(width_scale)
    if family == "flux":
        return {**FLUX_SCHNELL_TRANSFORMER, "num_attention_heads": _heads(24, width_scale),
                "joint_attention_dim": t5["d_model"], "pooled_projection_dim": clips[0]["hidden_size"]}
    heads = _heads(38, width_scale)
    return {**SD35_LARGE_TRANSFORMER, "num_attention_heads": heads, "caption_projection_dim": heads * 64,
            "joint_attention_dim": t5["d_model"],
            "pooled_projection_dim": sum(c["projection_dim"] for c in clips)}


def transformer_width(family: str, width_scale: float) -> float:
    """The transformer's width relative to the real one (heads are whole numbers)."""
    full = FLUX_SCHNELL_TRANSFORMER if family == "flux" else SD35_LARGE_TRANSFORMER
    return transformer_config(family, width_scale)["num_attention_heads"] / full["num_attention_heads"]


def vae_config(family: str) -> dict[str, Any]:
    return {**_VAE, **VAE_FACTORS[family]}


def t5_config(width_scale: float = 1.0, layers: int | None = None) -> dict[str, Any]:
    heads = _heads(64, width_scale)
    return {**T5_XXL, "num_heads": heads, "d_model": heads * 64, "d_ff": max(64, round(10240 * width_scale)),
            "num_layers": T5_XXL["num_layers"] if layers is None else layers}


def clip_configs(family: str, width_scale: float = 1.0, layers: int | None = None) -> list[dict[str, Any]]:
    out = []
    for hidden, depth, heads, act in _CLIPS[family]:
        h = _heads(heads, width_scale) * (hidden // heads)
        out.append({"vocab_size": 49408, "hidden_size": h, "intermediate_size": 4 * h,
                    "num_hidden_layers": depth if layers is None else layers,
                    "num_attention_heads": _heads(heads, width_scale), "max_position_embeddings": 77,
                    "hidden_act": act, "projection_dim": h, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})
    return out


def letters_t5_tokenizer() -> Any:
    """A real T5TokenizerFast over a letters-only Unigram vocabulary (no hub files; prompts are encoded once)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


@contextmanager
def _created_as(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """New modules allocate their weights on `device` in `dtype` (a 12B model never exists in fp32 on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer_components(family: str, width_scale: float = 1.0, seed: int = 0,
                                 text_layers: int | None = None, device: torch.device | str = "cpu",
                                 dtype: torch.dtype = torch.float32) -> FlowMatchingComponents:
    """Transformer + VAE (created on `device` in `dtype`) + text encoders (CPU) of the family, random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .models import _letters_tokenizer

    if family not in TRANSFORMER_FAMILIES:
        raise ValueError(f"unknown transformer family {family!r}; choose one of {', '.join(TRANSFORMER_FAMILIES)}")
    if not width_scale > 0:
        raise ValueError(f"width_scale must be > 0, got {width_scale!r}")
    torch.manual_seed(seed)
    transformer_cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    clip_cls = CLIPTextModel if family == "flux" else CLIPTextModelWithProjection
    clips = [CLIPTextConfig(**c) for c in clip_configs(family, width_scale, text_layers)]
    t5 = T5EncoderModel(T5Config(**t5_config(width_scale, text_layers)))
    clip_tok = _letters_tokenizer()
    with _created_as(device, dtype):
        transformer = transformer_cls(**transformer_config(family, width_scale))
        vae = AutoencoderKL(**vae_config(family))
    components = FlowMatchingComponents(
        transformer=transformer, vae=vae, scheduler_config=dict(SCHEDULERS[family]),
        text_encoder=clip_cls(clips[0]), tokenizer=clip_tok)
    if family == "flux":
        components.text_encoder_2, components.tokenizer_2 = t5, letters_t5_tokenizer()
    else:
        components.text_encoder_2, components.tokenizer_2 = CLIPTextModelWithProjection(clips[1]), clip_tok
        components.text_encoder_3, components.tokenizer_3 = t5, letters_t5_tokenizer()
    return components


def build_transformer_flow(family: str, width_scale: float = 1.0, num_steps: int = 4, device: str = "cpu",
                           dtype: torch.dtype = torch.float32, seed: int = 0,
                           text_layers: int | None = None) -> FlowMatchingFlow:
    """Our FluxFlow / SD3Flow over random-weight models of the real architecture."""
    components = build_transformer_components(family, width_scale, seed, text_layers, device, dtype)
    cls = FluxFlow if family == "flux" else SD3Flow
    return cls(components, num_steps, device=device, dtype=dtype)
