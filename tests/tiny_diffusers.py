"""Builders of tiny diffusers-format model folders (real architectures and file formats, random weights).

Used by the flow tests, the node tests and the benchmarks: no hub access, so every
folder a test loads is written here with `save_pretrained`, the way a downloaded
PeRFlow / InstaFlow folder is laid out. The tokenizer is a byte-level CLIP BPE with
a handful of merges, enough to tokenize any prompt.

The latent is 4 channels and the VAE downscales by 2 (two blocks), so a 16x16
image has an 8x8 latent.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

TEXT_DIM = 32
MAX_TOKENS = 77
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1,
                "clip_sample": False}
_MERGES = ["p h", "o t", "ph ot", "phot o</w>", "t h", "th e</w>", "o f</w>", "c a", "ca t</w>"]


def _byte_chars() -> list[str]:
    """CLIP's byte -> printable-unicode table (GPT-2 byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> int:
    """Save a small CLIP tokenizer to `folder`; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = _byte_chars()
    tokens += [t + "</w>" for t in _byte_chars()]
    tokens += ["".join(m.split()) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                        model_max_length=MAX_TOKENS)
    tok.save_pretrained(folder)
    return len(vocab)


def _text_encoder(folder: Path, vocab_size: int, eos_id: int, with_projection: bool) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            projection_dim=TEXT_DIM, bos_token_id=eos_id - 1, eos_token_id=eos_id,
                            pad_token_id=eos_id, hidden_act="quick_gelu")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    cls(config).save_pretrained(folder)


def _vae(folder: Path, scaling_factor: float, force_upcast: bool) -> None:
    tiny_vae(scaling_factor, force_upcast).save_pretrained(folder)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _scheduler(path: Path, scheduler_class: str, prediction: str | None, num_time_windows: int | None) -> None:
    config = {"_class_name": scheduler_class, "_diffusers_version": "0.27.0", **SD_SCHEDULER}
    if prediction is not None:
        config["prediction_type"] = prediction
    if num_time_windows is not None:
        config["num_time_windows"] = num_time_windows
    _write_json(path / "scheduler" / "scheduler_config.json", config)


def build_tiny_sd15(path: str | Path, prediction: str | None = "diff_eps",
                    scheduler_class: str = "PeRFlowScheduler", num_time_windows: int | None = 4,
                    pipeline_class: str = "StableDiffusionPipeline", seed: int = 0) -> Path:
    """A tiny SD1.5-layout folder (one CLIP text encoder, 32-d cross attention); returns its path."""
    from diffusers import UNet2DConditionModel

    root = Path(path)
    torch.manual_seed(seed)
    vocab_size = write_tokenizer(root / "tokenizer")
    _text_encoder(root / "text_encoder", vocab_size, vocab_size - 1, with_projection=False)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                         attention_head_dim=8, norm_num_groups=32).save_pretrained(root / "unet")
    _vae(root / "vae", scaling_factor=0.18215, force_upcast=False)
    _scheduler(root, scheduler_class, prediction, num_time_windows)
    _write_json(root / "model_index.json", {
        "_class_name": pipeline_class, "_diffusers_version": "0.27.0",
        "scheduler": ["diffusers" if scheduler_class != "PeRFlowScheduler" else None, scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    return root


def build_tiny_2rflow(path: str | Path, seed: int = 0) -> Path:
    """A tiny InstaFlow / 2-rectified-flow folder: RectifiedFlowPipeline with an SD scheduler config."""
    return build_tiny_sd15(path, prediction="epsilon", scheduler_class="PNDMScheduler", num_time_windows=None,
                           pipeline_class="RectifiedFlowPipeline", seed=seed)


def build_tiny_sdxl(path: str | Path, prediction: str | None = "ddim_eps",
                    scheduler_class: str = "PeRFlowScheduler", num_time_windows: int | None = 4,
                    force_zeros_for_empty_prompt: bool = True, seed: int = 0) -> Path:
    """A tiny SDXL-layout folder: two text encoders (concatenated 64-d context), text_time added embedding."""
    from diffusers import UNet2DConditionModel

    root = Path(path)
    torch.manual_seed(seed)
    vocab_size = write_tokenizer(root / "tokenizer")
    write_tokenizer(root / "tokenizer_2")
    _text_encoder(root / "text_encoder", vocab_size, vocab_size - 1, with_projection=False)
    _text_encoder(root / "text_encoder_2", vocab_size, vocab_size - 1, with_projection=True)
    time_dim = 8
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * TEXT_DIM,
                         attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
                         addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                         projection_class_embeddings_input_dim=6 * time_dim + TEXT_DIM,
                         transformer_layers_per_block=1).save_pretrained(root / "unet")
    _vae(root / "vae", scaling_factor=0.13025, force_upcast=True)
    _scheduler(root, scheduler_class, prediction, num_time_windows)
    _write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.27.0",
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "scheduler": [None, scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    return root


_BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "2rflow": build_tiny_2rflow}
_CACHE: dict[str, Path] = {}


def cached_folder(kind: str) -> Path:
    """A default tiny folder ("sd15", "sdxl" or "2rflow") built once per test process; treat it as read-only."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny folder kind {kind!r}; expected one of {', '.join(_BUILDERS)}")
    if kind not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix=f"tiny_{kind}_"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE[kind] = _BUILDERS[kind](root / kind)
    return _CACHE[kind]


# ComfyUI's unet_config of `tiny_comfy_sd15_unet` (its LDM key layout: one level, one resnet and one transformer each)
COMFY_SD15_LAYOUT = {"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
                     "transformer_depth_output": [1, 1], "transformer_depth_middle": 1}


def tiny_comfy_sd15_unet(seed: int = 0):
    """The smallest UNet ComfyUI 0.8.0's model detection takes for SD1.5: it matches on 320 model channels and a
    768-d context (comfy/supported_models.py SD15.unet_config), so only the depth can shrink."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(320,),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768, attention_head_dim=8,
                                norm_num_groups=32)


def tiny_vae(scaling_factor: float = 0.18215, force_upcast: bool = False):
    """The tiny AutoencoderKL every folder above holds (latent 4 channels, downscale 2), in memory."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=scaling_factor,
                         force_upcast=force_upcast)
