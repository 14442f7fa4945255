"""Type adaptation shared by the node classes: ComfyUI tensors <-> core tensors, autograd under ComfyUI.

ComfyUI runs every node inside torch.inference_mode(). Tensors made there are
inference tensors and can never join an autograd graph, yet RectifID needs
gradients through the flow and the discriminator. So models are loaded, and
the sampler runs, inside `autograd_enabled()`, and IMAGE inputs are copied
into normal tensors with `image_to_core`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from rectifid_core.images import check_pixel_values

CATEGORY = "RectifID"

# custom socket types shown in the UI
FLOW = "RECTIFIED_FLOW"
DISCRIMINATOR = "RECTIFID_DISCRIMINATOR"
SUBJECT = "RECTIFID_SUBJECT"
OBJECTIVE = "RECTIFID_OBJECTIVE"


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Leave ComfyUI's inference mode and turn gradients on for the duration of the block."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def image_to_core(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] 0..1 -> normal (non-inference) float tensor [B,3,H,W] on the CPU.

    Empty batches, NaN/inf and values outside 0..1 are refused with a message
    naming `what` (the input) instead of being clamped into a blank image.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a ComfyUI IMAGE [batch, height, width, channels] for {what}, got {shape}")
    with torch.inference_mode(False):
        out = image.detach().to("cpu", torch.float32).clone().movedim(-1, 1)
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)
        return check_pixel_values(out[:, :3], what).contiguous()


def image_to_comfy(image: torch.Tensor) -> torch.Tensor:
    """Core [B,3,H,W] 0..1 -> ComfyUI IMAGE [B,H,W,3] float32 on the CPU."""
    return image.detach().to("cpu", torch.float32).movedim(1, -1).clamp(0, 1).contiguous()


def mask_to_core(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """ComfyUI MASK [B,H,W] or [H,W] -> normal float tensor [B,H,W].

    A connected mask restricts where a subject is looked for, so an empty one
    (zero size, or all zero) would silently find nothing: it is refused.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"expected a ComfyUI MASK [batch, height, width] for {what}, got {shape}")
    with torch.inference_mode(False):
        out = mask.detach().to("cpu", torch.float32).clone()
        out = out.unsqueeze(0) if out.dim() == 2 else out
    if out.numel() == 0:
        raise ValueError(f"the {what} input is empty (shape {tuple(out.shape)}); connect a painted mask or "
                         "disconnect it")
    if not torch.isfinite(out).all():
        raise ValueError(f"the {what} input holds NaN or infinite values; check the node that produced it")
    empty = [i + 1 for i in range(out.shape[0]) if not (out[i] > 0).any()]
    if empty:
        raise ValueError(
            f"{what} {', '.join(map(str, empty))} of {out.shape[0]} is all zero, so it marks no area (LoadImage gives "
            "an all-zero mask for a picture without transparency); paint the area in the mask editor or "
            "disconnect the mask")
    return out


@dataclass
class Subject:
    """One reference: its per-subject objective and the name shown in similarity reports."""

    objective: Any
    label: str
    kind: str


@dataclass
class ObjectiveBundle:
    """The sampler's single input type: an objective plus the subject names it reports on."""

    objective: Any
    labels: list[str] = field(default_factory=list)
