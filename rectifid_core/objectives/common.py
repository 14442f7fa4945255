"""Small helpers shared by the face, subject and multi-subject objectives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

AVERAGES = ("normalized", "plain")


def average_embeddings(embeddings: torch.Tensor, how: str = "normalized") -> torch.Tensor:
    """One reference embedding from several photos [N,D] -> [D].

    "normalized" averages unit vectors, so a sharp photo with a large
    embedding norm does not outvote the others; "plain" averages raw vectors.
    """
    if how not in AVERAGES:
        raise ValueError(f"embedding average must be one of {AVERAGES}, got {how!r}")
    if how == "normalized":
        embeddings = F.normalize(embeddings, dim=-1)
    return embeddings.mean(0)


def check_image_batch(image: torch.Tensor) -> None:
    """Objectives take the solver's decoded images [B,3,H,W]; say so instead of failing deep inside."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected image [B,3,H,W], got {shape}")
