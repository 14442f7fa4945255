"""The three toy networks and their weight files.

VelocityNet  class-conditional velocity of the rectified flow (class 10 = null, for CFG).
FeatureNet   small CNN trained contrastively (SimCLR) on clean digits: the guiding discriminator.
EvaluatorNet MLP autoencoder with a class head, different architecture, seed and objective:
             used only to measure identity (bottleneck cosine) and prompt accuracy (class head).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import NUM_CLASSES

NULL_CLASS = NUM_CLASSES
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = {
    "flow": "flow_2rf.safetensors",
    "flow_1rf": "flow_1rf.safetensors",
    "feature": "feature.safetensors",
    "evaluator": "evaluator.safetensors",
}


class VelocityNet(nn.Module):
    """v(z_t, t, class) for 8x8 latents; time t runs 1 (noise) -> 0 (data)."""

    def __init__(self, hidden: int = 256, emb: int = 64) -> None:
        super().__init__()
        self.emb = emb
        self.class_emb = nn.Embedding(NUM_CLASSES + 1, emb)
        self.inp = nn.Linear(64 + 2 * emb, hidden)
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(3)])
        self.cond = nn.Linear(2 * emb, 3 * hidden)
        self.out = nn.Linear(hidden, 64)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.emb // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float().view(-1, 1) * 1000.0 * freqs.view(1, -1)
        return torch.cat([angles.sin(), angles.cos()], 1)

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = torch.cat([self.time_embedding(t).to(z.dtype), self.class_emb(labels)], 1)
        h = F.silu(self.inp(torch.cat([z.flatten(1), c], 1)))
        shifts = self.cond(F.silu(c)).chunk(len(self.blocks), 1)
        for block, shift in zip(self.blocks, shifts):
            h = h + block(F.silu(h + shift))
        return self.out(F.silu(h)).view_as(z)


class FeatureNet(nn.Module):
    """Conv embedding of a digit; `forward` returns the 64-d feature compared by cosine."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.embed = nn.Linear(64 * 4, dim)
        self.head = nn.Sequential(nn.Linear(dim, 128), nn.SiLU(), nn.Linear(128, 64))

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(gray).flatten(1))


class EvaluatorNet(nn.Module):
    """MLP autoencoder (appearance) with a class head on the bottleneck (prompt accuracy)."""

    def __init__(self, bottleneck: int = 24) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(),
                                     nn.Linear(128, bottleneck))
        self.decoder = nn.Sequential(nn.Linear(bottleneck, 128), nn.GELU(), nn.Linear(128, 256), nn.GELU(),
                                     nn.Linear(256, 64))
        self.classifier = nn.Linear(bottleneck, NUM_CLASSES)
        self.register_buffer("center", torch.zeros(bottleneck))

    def forward(self, gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centered bottleneck code (for cosine) and class logits."""
        code = self.encoder(gray.flatten(1))
        return code - self.center, self.classifier(code)

    def reconstruct(self, gray: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(gray.flatten(1)))).view_as(gray)


def to_gray(image: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] or [B,1,H,W] image in 0..1 -> [B,1,8,8] gray, the networks' input."""
    if image.dim() != 4 or image.shape[1] not in (1, 3) or tuple(image.shape[-2:]) != (8, 8):
        raise ValueError(f"expected digit images [B,1|3,8,8], got {tuple(image.shape)}")
    return image.mean(1, keepdim=True)


def save_weights(model: nn.Module, name: str, directory: Path = WEIGHTS_DIR) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / WEIGHT_FILES[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_weights(name: str, directory: Path | str = WEIGHTS_DIR) -> nn.Module:
    """Build the network for `name` (flow, flow_1rf, feature, evaluator) and load its shipped weights."""
    from safetensors.torch import load_file

    if name not in WEIGHT_FILES:
        raise ValueError(f"unknown toy network {name!r}; choose one of {', '.join(WEIGHT_FILES)}")
    path = Path(directory) / WEIGHT_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"toy weights not found at {path}; run `python -m rectifid_core.toy.train`")
    model = {"flow": VelocityNet, "flow_1rf": VelocityNet, "feature": FeatureNet, "evaluator": EvaluatorNet}[name]()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
