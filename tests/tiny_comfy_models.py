"""Tiny flow-matching models in the files ComfyUI's own loaders read: an SD3-shaped MMDiT, a FLUX.1-schnell-shaped
transformer (diffusers layouts, single safetensors files, as UNETLoader loads them) and a 16-channel VAE.

ComfyUI infers the architecture from the weights: an MMDiT's width is 64 x its depth (heads of 64 channels), so
the SD3 model is tiny and loads through `comfy.sd.load_diffusion_model` as UNETLoader does. FLUX's detection
fixes 24 heads of 128 channels (3072 wide, ~0.5 G parameters even at one block each), so `load_tiny_flux` runs
ComfyUI's own loading steps (its diffusers conversion, detection, model config, weight loading, ModelPatcher)
with only the head count and rope axes set to the tiny model's. ComfyUI's VAE config fixes the widths of the
SD/FLUX autoencoder (128..512 channels), so the VAE is the real architecture with random weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                  pooled_projection_dim=24, pos_embed_max_size=16, qk_norm="rms_norm")
FLUX_CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False,
                   axes_dims_rope=(4, 6, 6))
FLUX_HEADS = {"num_heads": 2, "axes_dim": [4, 6, 6]}  # what ComfyUI's FLUX detection fixes at 24 x (16, 56, 56)
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def _save(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def _randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial norm weights (diffusers initializes them to 1/0), so a wrong mapping of them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def build_sd3(path: Path, seed: int = 0) -> Path:
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**SD3_CONFIG)
    _randomize_norms(model, seed)
    with torch.no_grad():  # diffusers zero-initializes the output layer; a zero velocity would hide everything
        model.proj_out.weight.normal_(0, 0.2)
        for block in model.transformer_blocks:
            for p in block.norm1.linear.parameters():
                p.normal_(0, 0.05)
    return _save(model, path)


def build_flux(path: Path, seed: int = 0) -> Path:
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_CONFIG)
    _randomize_norms(model, seed)
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.2)
    return _save(model, path)


def build_vae(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return _save(AutoencoderKL(**VAE_CONFIG), path)


def load_tiny_flux(path: Path, dtype: torch.dtype) -> object:
    """ComfyUI's load_diffusion_model_state_dict steps for a diffusers FLUX file, with FLUX_HEADS in the config."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.utils

    sd = comfy.model_detection.convert_diffusers_mmdit(comfy.utils.load_torch_file(str(path)), "")
    unet_config = {**comfy.model_detection.detect_unet_config(sd, ""), **FLUX_HEADS}
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def build_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A single-file SD1.5 checkpoint Load Checkpoint accepts (LDM layout: UNet, CLIP text model, VAE), with random
    weights. Needs ComfyUI importable (its own UNet key map; run it in the ComfyUI child process). Only the UNet
    can shrink (tiny_comfy_sd15_unet); ComfyUI fixes SD1's CLIP (ViT-L text, sd1_clip_config.json) and its SD VAE
    widths, so those two are full size, stored in fp16 (~0.4 GB) and cast to fp32 on load."""
    import comfy.utils
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_diffusers import COMFY_SD15_LAYOUT, tiny_comfy_sd15_unet

    unet = tiny_comfy_sd15_unet(seed)
    mapping = comfy.utils.unet_to_diffusers(COMFY_SD15_LAYOUT)
    weights = {"model.diffusion_model." + mapping[k]: v for k, v in unet.state_dict().items()}
    config = CLIPTextConfig.from_json_file(str(Path(comfy.utils.__file__).parent / "sd1_clip_config.json"))
    with torch.device("meta"):  # shapes only: filling the tensors ourselves is ~10x faster than the HF init
        shapes = {k: v.shape for k, v in CLIPTextModel(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            value = torch.arange(shape[-1]).expand(shape)
        elif "norm" in name:
            value = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            value = 0.02 * torch.randn(shape, generator=gen)
        weights["cond_stage_model.transformer." + name] = value
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    weights.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}, str(path))
    return path
