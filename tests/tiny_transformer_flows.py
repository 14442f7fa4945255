"""Builders of tiny FluxPipeline / StableDiffusion3Pipeline folders (real classes and file formats, random weights).

Saved with `save_pretrained` in the layout of black-forest-labs/FLUX.1-schnell and
stabilityai/stable-diffusion-3.5-large-turbo, so the loader reads them exactly as it
reads the real folders. The T5 tokenizer is the benchmark's letters-only Unigram model,
built offline and saved as T5TokenizerFast (tokenizer.json); the CLIP tokenizers are tiny_diffusers'.
The VAE downscales by 2 (two blocks) with 4 latent channels, and both transformers
take 2x2 latent patches, so an image side must be a multiple of 4: 32 px -> 16x16 latent.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tiny_diffusers import _text_encoder, _write_json, write_tokenizer

T5_DIM = 64
# the real schedulers' configs (FLUX.1-schnell: no dynamic shifting, shift 1; SD3.5: shift 3)
FLUX_SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0",
                          "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                          "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
                          "use_dynamic_shifting": False}
FLUX_DEV_SCHEDULER = {**FLUX_SCHNELL_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0",
                  "num_train_timesteps": 1000, "shift": 3.0}


def write_t5_tokenizer(folder: Path) -> int:
    """Save the benchmark's letters-only Unigram T5 tokenizer (T5TokenizerFast, tokenizer.json); returns its size."""
    from rectifid_core.benchmark.transformer_models import letters_t5_tokenizer

    tok = letters_t5_tokenizer()
    tok.save_pretrained(folder)
    return len(tok)


def _t5(folder: Path, vocab_size: int) -> None:
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).save_pretrained(folder)


def _vae(folder: Path, scaling_factor: float, shift_factor: float) -> None:
    from diffusers import AutoencoderKL

    # as FLUX.1 / SD3.5's VAE: no quant convs, a scaling and a shift factor
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=scaling_factor,
                  shift_factor=shift_factor, use_quant_conv=False,
                  use_post_quant_conv=False).save_pretrained(folder)


def build_tiny_flux(path: str | Path, guidance_embeds: bool = False, seed: int = 0) -> Path:
    """A tiny FluxPipeline folder (schnell; with guidance_embeds a dev-style distilled-guidance transformer)."""
    from diffusers import FluxTransformer2DModel

    root = Path(path)
    torch.manual_seed(seed)
    clip_vocab = write_tokenizer(root / "tokenizer")
    t5_vocab = write_t5_tokenizer(root / "tokenizer_2")
    _text_encoder(root / "text_encoder", clip_vocab, clip_vocab - 1, with_projection=False)
    _t5(root / "text_encoder_2", t5_vocab)
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=32,
                           guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).save_pretrained(
        root / "transformer")
    _vae(root / "vae", scaling_factor=0.3611, shift_factor=0.1159)
    _write_json(root / "scheduler" / "scheduler_config.json",
                FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER)
    _write_json(root / "model_index.json", {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
    return root


def build_tiny_sd3(path: str | Path, with_t5: bool = True, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline folder (SD3.5 Large layout: qk RMS norm; CLIP-L, CLIP-G, T5)."""
    from diffusers import SD3Transformer2DModel

    root = Path(path)
    torch.manual_seed(seed)
    clip_vocab = write_tokenizer(root / "tokenizer")
    write_tokenizer(root / "tokenizer_2")
    _text_encoder(root / "text_encoder", clip_vocab, clip_vocab - 1, with_projection=True)
    _text_encoder(root / "text_encoder_2", clip_vocab, clip_vocab - 1, with_projection=True)
    if with_t5:
        _t5(root / "text_encoder_3", write_t5_tokenizer(root / "tokenizer_3"))
    SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
                          pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
                          qk_norm="rms_norm").save_pretrained(root / "transformer")
    _vae(root / "vae", scaling_factor=1.5305, shift_factor=0.0609)
    _write_json(root / "scheduler" / "scheduler_config.json", SD35_SCHEDULER)
    t5 = (["transformers", "T5EncoderModel"], ["transformers", "T5TokenizerFast"]) if with_t5 else ([None, None],) * 2
    _write_json(root / "model_index.json", {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": t5[0],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": t5[1], "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]})
    return root


_BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
_CACHE: dict[str, Path] = {}


def cached_folder(kind: str) -> Path:
    """A default tiny folder ("flux" or "sd3") built once per test process; treat it as read-only."""
    if kind not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix=f"tiny_{kind}_"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE[kind] = _BUILDERS[kind](root / kind)
    return _CACHE[kind]


def float64_flow_and_pipeline(folder: Path, steps: int | None = None, **pipeline_parts: Any) -> tuple:
    """Our flow and diffusers' own pipeline over one folder, each loaded by its own code, both in float64."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from rectifid_core.flows import load_flow

    flow = load_flow(folder, dtype="fp32", device="cpu", steps=steps)
    flow = type(flow)(flow.components, flow.num_steps, "cpu", torch.float64)  # casts the models in place
    pipeline_cls = FluxPipeline if flow.activation_family == "flux" else StableDiffusion3Pipeline
    pipe = pipeline_cls.from_pretrained(folder, **pipeline_parts).to(dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return flow, pipe


def gradient_of_rollout(flow, cond, noise: torch.Tensor) -> torch.Tensor:
    """d mean(decoded image^2) / d noise through every step: the gradient the guidance solver needs."""
    z0 = noise.clone().requires_grad_(True)
    z = z0
    for i in range(flow.num_steps):
        z = flow.step(z, i, cond)
    return torch.autograd.grad(flow.decode(z).pow(2).mean(), z0)[0]


def count_forward_calls(module: torch.nn.Module, monkeypatch) -> list[bool]:
    """Record every run of module.forward (grad mode at the time); the checkpoint's recomputation included, which
    forward hooks do not see."""
    calls: list[bool] = []
    forward = module.forward

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", counting)
    return calls


def seeded_noise(flow, size: int = 32, seed: int = 1) -> torch.Tensor:
    """float64 noise of an image of size x size pixels, the same for every flow of one latent shape."""
    return torch.randn(flow.latent_shape(1, size, size), generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def sample(flow, cond, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latent, decoded image) of a plain rollout without guidance."""
    with torch.no_grad():
        for i in range(flow.num_steps):
            z = flow.step(z, i, cond)
        return z, flow.decode(z)
