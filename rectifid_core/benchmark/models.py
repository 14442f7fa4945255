"""Random-weight models with the real architectures, for timing and memory only.

Speed and memory of one guidance iteration depend on the architecture and the
tensor sizes, not on the weight values, so the benchmark builds SD1.5-shaped
(or SDXL-shaped) UNet/VAE/CLIP models from their published configs and an
ArcFace-r100-shaped recognizer (iResNet-100) with random weights. `width_scale`
shrinks every width (and a few depths in the "tiny" preset) so the same code
runs on a CPU in seconds.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..flows.base import RectifiedFlow
from ..flows.perflow import PeRFlow
from ..flows.stable_diffusion import StableDiffusionComponents
from ..objectives.base import ObjectiveOutput
from .transformer_models import TRANSFORMER_FAMILIES, build_transformer_flow

FAMILIES = ("sd15", "sdxl", "tiny", *TRANSFORMER_FAMILIES)

# Scheduler and prediction type of the public PeRFlow checkpoints (SD's scaled-linear betas).
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear"}
PREDICTION = {"sd15": "diff_eps", "sdxl": "ddim_eps", "tiny": "diff_eps"}


def _width(c: int, scale: float, multiple: int = 32) -> int:
    """Scaled width, kept a multiple of the GroupNorm group count."""
    return max(multiple, int(round(c * scale / multiple)) * multiple)


def unet_config(family: str, width_scale: float = 1.0) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config of SD1.5 or SDXL (tiny: SD1.5 topology, 1 layer per block)."""
    texts = text_encoder_configs(family, width_scale)
    context = sum(t["hidden_size"] for t in texts)  # SDXL concatenates both encoders' tokens
    if family == "sdxl":
        return {
            "sample_size": 128, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [_width(c, width_scale) for c in (320, 640, 1280)],
            "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20], "cross_attention_dim": context,
            "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": texts[1]["projection_dim"] + 6 * 256,
            "norm_num_groups": 32,
        }
    base = {
        "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [_width(c, width_scale) for c in (320, 640, 1280, 1280)],
        "layers_per_block": 2, "cross_attention_dim": context,
        "attention_head_dim": 8, "norm_num_groups": 32,
    }
    if family == "tiny":
        base.update(layers_per_block=1, attention_head_dim=4)
    return base


def vae_config(family: str, width_scale: float = 1.0) -> dict[str, Any]:
    """AutoencoderKL config of SD (SDXL: same topology, its scaling factor and fp32 upcast)."""
    cfg = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [_width(c, width_scale) for c in (128, 256, 512, 512)],
        "layers_per_block": 1 if family == "tiny" else 2, "norm_num_groups": 32,
        "sample_size": 512, "scaling_factor": 0.18215,
    }
    if family == "sdxl":
        cfg.update(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return cfg


def text_encoder_configs(family: str, width_scale: float = 1.0, layers: int | None = None) -> list[dict[str, Any]]:
    """CLIPTextConfig kwargs: CLIP-L (SD1.5), CLIP-L + OpenCLIP-bigG (SDXL); `layers` overrides the depth."""
    def clip(hidden: int, full_depth: int, heads: int, act: str) -> dict[str, Any]:
        depth = full_depth if layers is None else layers
        h = _width(hidden, width_scale, multiple=heads * 8 if family == "tiny" else heads)
        return {"vocab_size": 49408, "hidden_size": h, "intermediate_size": 4 * h, "num_hidden_layers": depth,
                "num_attention_heads": heads, "max_position_embeddings": 77, "hidden_act": act,
                "projection_dim": h, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    if family == "tiny":
        return [clip(768, 2, 4, "quick_gelu")]
    if family == "sdxl":
        return [clip(768, 12, 12, "quick_gelu"), clip(1280, 32, 20, "gelu")]
    return [clip(768, 12, 12, "quick_gelu")]


def _letters_tokenizer() -> Any:
    """A real CLIPTokenizer over a letters-only vocabulary (no hub files needed; prompts are encoded once)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory(prefix="rectifid_bench_tok_") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_components(family: str, width_scale: float = 1.0, seed: int = 0,
                     text_layers: int | None = None) -> StableDiffusionComponents:
    """UNet + VAE + text encoder(s) with random weights and the family's architecture.

    `text_layers` makes the text encoders shallower (same widths, so the UNet sees the
    same features); prompts are encoded once, outside the measured loop.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if not width_scale > 0:
        raise ValueError(f"width_scale must be > 0, got {width_scale!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family, width_scale))
    vae = AutoencoderKL(**vae_config(family, width_scale))
    texts = text_encoder_configs(family, width_scale, text_layers)
    encoder = CLIPTextModel(CLIPTextConfig(**texts[0]))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**texts[1])) if len(texts) > 1 else None
    tok = _letters_tokenizer()
    return StableDiffusionComponents(unet=unet, vae=vae, text_encoder=encoder, tokenizer=tok,
                                     text_encoder_2=encoder_2, tokenizer_2=tok if encoder_2 is not None else None)


def build_flow(family: str, width_scale: float = 1.0, num_windows: int = 4, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0, text_layers: int | None = None) -> PeRFlow:
    """Our PeRFlow backend over random-weight models of the family's architecture."""
    components = build_components(family, width_scale, seed, text_layers)
    return PeRFlow(components, SCHEDULER_CONFIG, PREDICTION[family], num_windows=num_windows,
                   device=device, dtype=dtype)


class _IBlock(nn.Module):
    """iResNet basic block (BN-conv-BN-PReLU-conv-BN, stride on the second conv)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.short(x)


class IResNet(nn.Module):
    """ArcFace's iResNet: 112x112 face -> embedding (r100: layers 3,13,30,3; widths 64..512)."""

    def __init__(self, layers: tuple[int, ...] = (3, 13, 30, 3), widths: tuple[int, ...] = (64, 128, 256, 512),
                 embedding: int = 512) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.PReLU(widths[0]))
        blocks, cin = [], widths[0]
        for n, w in zip(layers, widths):
            blocks += [_IBlock(cin, w, 2)] + [_IBlock(w, w, 1) for _ in range(n - 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.Flatten(), nn.Linear(cin * 7 * 7, embedding),
                                  nn.BatchNorm1d(embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_recognizer(family: str, width_scale: float = 1.0, seed: int = 0) -> IResNet:
    """iResNet-100 (tiny preset: one block per stage, scaled widths), random weights, frozen, eval."""
    torch.manual_seed(seed + 1)
    if family == "tiny":
        net = IResNet((1, 1, 1, 1), tuple(max(8, int(w * width_scale)) for w in (64, 128, 256, 512)), 64)
    else:
        net = IResNet()
    return net.eval().requires_grad_(False)


class RecognizerObjective:
    """ArcFace-style loss 100*(1 - cos) on the whole image resized to 112x112 (no detector: it has no gradient)."""

    def __init__(self, net: nn.Module, reference: torch.Tensor) -> None:
        self.net = net
        self.reference = F.normalize(reference.float(), dim=-1)

    def __call__(self, image: torch.Tensor) -> ObjectiveOutput:
        p = next(self.net.parameters())
        face = F.interpolate(image.to(p.dtype), size=(112, 112), mode="bilinear", align_corners=False)
        emb = F.normalize(self.net(face * 2 - 1).float(), dim=-1)
        cos = (emb * self.reference.to(emb.device)).sum(-1)
        return ObjectiveOutput(loss=100.0 * (1.0 - cos), diagnostics={})


@dataclass
class BenchModels:
    flow: RectifiedFlow  # PeRFlow, or FluxFlow / SD3Flow for the transformer families
    objective: RecognizerObjective


def build_models(family: str, width_scale: float = 1.0, num_windows: int = 4, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, text_layers: int | None = None) -> BenchModels:
    """Flow + recognizer objective on one device/dtype (the recognizer follows the model's dtype).

    sd15 / sdxl / tiny: PeRFlow over a UNet; flux / sd35: FLUX.1-schnell / SD3.5 Large Turbo
    (transformer_models.py) with `num_windows` Euler steps.
    """
    if family in TRANSFORMER_FAMILIES:
        flow = build_transformer_flow(family, width_scale, num_windows, device, dtype, seed, text_layers)
    else:
        flow = build_flow(family, width_scale, num_windows, device, dtype, seed, text_layers)
    net = build_recognizer(family, width_scale, seed).to(device=device, dtype=dtype)
    emb_dim = net.head[-1].num_features
    reference = torch.randn(1, emb_dim, generator=torch.Generator().manual_seed(seed + 2))
    return BenchModels(flow=flow, objective=RecognizerObjective(net, reference.to(device)))
