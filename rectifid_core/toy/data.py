"""sklearn digits as tensors, a deterministic split, and the augmentations the networks train on."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class DigitSplit:
    """Images [N,1,8,8] in 0..1 and labels [N] for the training and held-out parts."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_images: torch.Tensor
    held_labels: torch.Tensor


def load_split() -> DigitSplit:
    """Per-class 80/20 split with a fixed seed so every script sees the same held-out digits.

    sklearn's digits have no writer labels, so a writer may be on both sides of the split.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.RandomState(SPLIT_SEED)
    train_idx, held_idx = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(digits.target == c)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * HELD_OUT_FRACTION))
        held_idx.extend(idx[:n_held].tolist())
        train_idx.extend(idx[n_held:].tolist())
    train_idx, held_idx = sorted(train_idx), sorted(held_idx)
    return DigitSplit(images[train_idx], labels[train_idx], images[held_idx], labels[held_idx])


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """0..1 pixels -> the flow's data space (-1..1)."""
    return images * 2.0 - 1.0


def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Small affine jitter, a smooth elastic warp, stroke-weight gamma and pixel noise.

    Kept small on purpose: the features must stay sensitive to slant, stroke and
    thickness (the digit's style), only robust to what a re-drawing would change.
    """
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle = uniform(-8.0, 8.0) * strength * math.pi / 180.0
    scale = 1.0 + uniform(-0.08, 0.08) * strength
    shear = uniform(-0.1, 0.1) * strength
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * 0.15 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear, shift[:, 0]], 1),
        torch.stack([sin, cos, shift[:, 1]], 1),
    ], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    coarse = torch.randn(b, 2, 3, 3, generator=generator) * 0.06 * strength
    grid = grid + F.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(uniform(-0.3, 0.3) * strength).view(b, 1, 1, 1)
    out = out.clamp(0, 1) ** gamma
    out = out + torch.randn(out.shape, generator=generator) * 0.03 * strength
    return out.clamp(0, 1)
