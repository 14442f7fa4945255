"""Tiny OWL-ViT, DINOv2 and CLIP-vision folders in transformers' save_pretrained format.

Same classes and files as the hub checkpoints (config.json, model.safetensors,
preprocessor/processor config, a CLIP BPE tokenizer from our own small
vocabulary and merges), with
a few thousand parameters and small input sizes so CPU tests stay fast.
"""
from __future__ import annotations

from pathlib import Path

import torch

OWL_SIZE = 64
ENCODER_SIZE = 56


def build_clip_tokenizer():
    """A character-level CLIP BPE tokenizer from our own vocabulary and merges (no download).

    The special tokens get the highest ids, as in CLIP's real vocabulary:
    OWL-ViT treats a query whose first id is 0 as padding.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for merge in ("d o", "do g</w>", "c a", "ca t</w>"):
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_owlvit(folder: Path, seed: int = 0) -> Path:
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessorPil, OwlViTProcessor

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    n_vocab = len(tokenizer.get_vocab())
    config = OwlViTConfig(
        text_config=dict(
            vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16,
            bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=OWL_SIZE, patch_size=16,
        ),
        projection_dim=32,
    )
    OwlViTForObjectDetection(config).eval().save_pretrained(folder)
    size = {"height": OWL_SIZE, "width": OWL_SIZE}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def build_dinov2(folder: Path, seed: int = 0) -> Path:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=ENCODER_SIZE, patch_size=14)
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": ENCODER_SIZE, "width": ENCODER_SIZE},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def build_clip_vision(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=ENCODER_SIZE, patch_size=14, projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": ENCODER_SIZE}, crop_size={"height": ENCODER_SIZE, "width": ENCODER_SIZE}
    ).save_pretrained(folder)
    return folder
