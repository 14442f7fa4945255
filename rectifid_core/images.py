"""Image conversion for the core: everything becomes float [B,3,H,W] in 0..1 RGB.

Reference photos arrive in every mode PIL knows (scans in CMYK, 16-bit PNGs,
palette GIFs, cut-outs with transparency); detectors and encoders want plain
RGB, so the conversion lives in one place.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

ALPHA_MODES = ("white", "black", "drop")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# float pixels this far outside 0..1 are rounding (resampling overshoot, fp16) and are clamped; beyond it an
# upstream node produced another range, which clamping would silently turn into a white or black image
PIXEL_TOLERANCE = 1e-3


def check_pixel_values(images: torch.Tensor, what: str = "image") -> torch.Tensor:
    """Refuse empty batches, NaN/inf and values outside 0..1 (beyond rounding); clamp the rounding.

    `images` is [B, ...] with the batch first; messages count images from 1.
    """
    if images.shape[0] == 0:
        raise ValueError(f"the {what} input is an empty batch (0 images); connect a node that outputs images")
    if images[0].numel() == 0:
        raise ValueError(f"the {what} input has zero size {tuple(images.shape)}; check the node that produced it")
    flat = images.detach().reshape(images.shape[0], -1).float()
    bad = ~torch.isfinite(flat)
    if bad.any():
        i = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(
            f"{what} {i + 1} of {images.shape[0]} has {int(bad[i].sum())} NaN or infinite pixel values; the node "
            "that produced it failed (an fp16 overflow in a VAE decode is common: decode in fp32 or bf16)")
    outside = ((flat < -PIXEL_TOLERANCE) | (flat > 1.0 + PIXEL_TOLERANCE)).any(dim=1)
    if outside.any():
        i = int(outside.nonzero()[0])
        lo, hi = float(flat[i].min()), float(flat[i].max())
        if lo >= -1.0 - PIXEL_TOLERANCE and lo < -PIXEL_TOLERANCE and hi <= 1.0 + PIXEL_TOLERANCE:
            hint = "it looks like -1..1: map it with (x + 1) / 2"
        elif lo >= -PIXEL_TOLERANCE and hi <= 255.0 + PIXEL_TOLERANCE:
            hint = "it looks like 0..255: divide it by 255"
        else:
            hint = "rescale it to 0..1"
        raise ValueError(
            f"{what} {i + 1} of {images.shape[0]} has pixel values from {lo:.4g} to {hi:.4g}, but images must lie in "
            f"0..1; {hint} (or fix the node that produced it)")
    return images.clamp(0.0, 1.0)


def pil_to_tensor(image: Image.Image, *, alpha: str = "white") -> torch.Tensor:
    """PIL image of any mode -> [1,3,H,W] float 0..1.

    alpha: "white" composites transparent pixels on white (cut-out subjects
    usually sit on a light backdrop and detectors treat black as shadow),
    "black" on black, "drop" ignores the alpha channel (keeps the hidden RGB).
    16-bit modes ('I;16*', and 'I' as PIL opens 16-bit PNGs) are scaled from
    0..65535; 'F' is taken as 0..1 when its maximum is <= 1, else 0..255.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        gray = np.asarray(image, dtype=np.float64) / 65535.0
        return _gray_to_tensor(np.clip(gray, 0.0, 1.0))
    if mode == "F":
        gray = np.asarray(image, dtype=np.float64)
        if not np.isfinite(gray).all():
            raise ValueError(f"the 32-bit float image has {int((~np.isfinite(gray)).sum())} NaN or infinite pixels; "
                             "save it again without them")
        scale = 1.0 if gray.size == 0 or gray.max() <= 1.0 else 255.0
        return _gray_to_tensor(np.clip(gray / scale, 0.0, 1.0))
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        rgba = np.asarray(image, dtype=np.float32) / 255.0
        rgb, a = rgba[..., :3], rgba[..., 3:]
        if alpha == "white":
            rgb = rgb * a + (1.0 - a)
        elif alpha == "black":
            rgb = rgb * a
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float()
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous()


def _gray_to_tensor(gray: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(gray.astype(np.float32))
    return t.expand(3, *t.shape).unsqueeze(0).contiguous()


def open_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Read an image file upright: EXIF orientation applied, as ComfyUI's LoadImage does for phone photos."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from exc
    except OSError as exc:  # truncated or corrupt data after a valid header
        raise ValueError(f"{path} is a damaged image file ({exc}); save or download it again") from exc


def load_image(path: Union[str, os.PathLike], *, alpha: str = "white") -> torch.Tensor:
    """Read an image file -> [1,3,H,W] float 0..1, upright (EXIF orientation applied)."""
    image = open_image(path)
    try:
        return pil_to_tensor(image, alpha=alpha)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def to_image_batch(image: ImageLike, *, alpha: str = "white") -> torch.Tensor:
    """PIL / numpy HWC or HW / torch [3,H,W] or [B,3,H,W] -> float [B,3,H,W] 0..1.

    uint8 and uint16 arrays are scaled by their type's range; float arrays and
    tensors must already be 0..1 and are checked, because a 0..255 float image
    silently saturates every detector.
    """
    if isinstance(image, Image.Image):
        return pil_to_tensor(image, alpha=alpha)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"numpy image must be HW or HWC with 1, 3 or 4 channels, got shape {image.shape}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
        return to_image_batch(t, alpha=alpha)
    if isinstance(image, torch.Tensor):
        t = image.unsqueeze(0) if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[1] not in (1, 3, 4):
            raise ValueError(f"tensor image must be [3,H,W] or [B,C,H,W] with C in 1,3,4, got {tuple(image.shape)}")
        t = check_pixel_values(t.float())
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        elif t.shape[1] == 4:
            rgb, a = t[:, :3], t[:, 3:]
            t = {"white": rgb * a + (1 - a), "black": rgb * a, "drop": rgb}[alpha]
        return t.contiguous()
    raise TypeError(f"unsupported image type {type(image).__name__}; expected PIL image, numpy array or tensor")


def ensure_min_size(image: torch.Tensor, min_side: int, *, upscale: bool = True, what: str = "image") -> torch.Tensor:
    """Upscale (bicubic, aspect kept) or reject an image whose short side is below `min_side`."""
    h, w = image.shape[-2:]
    if min(h, w) >= min_side:
        return image
    if not upscale or min(h, w) < 1:
        raise ValueError(f"{what} is {w}x{h} pixels; at least {min_side} pixels on the short side are needed")
    scale = min_side / min(h, w)
    size = (max(min_side, round(h * scale)), max(min_side, round(w * scale)))
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def to_pixel_levels(image: torch.Tensor) -> torch.Tensor:
    """[3,H,W] 0..1 -> float 0..255 integer levels on the same device: the 8-bit image a detector sees,
    without leaving the device (`to_uint8_hwc` is its host copy)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected [3,H,W], got {tuple(image.shape)}")
    return (image.detach().float().clamp(0, 1) * 255.0).round()


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] 0..1 -> uint8 HWC RGB for detectors that run outside torch."""
    return to_pixel_levels(image).byte().permute(1, 2, 0).cpu().numpy()


def as_reference_list(images: Union[ImageLike, Sequence[ImageLike]], *, alpha: str = "white") -> list[torch.Tensor]:
    """One or several reference images (of different sizes) -> list of [1,3,H,W]."""
    if isinstance(images, (list, tuple)):
        out = [t for im in images for t in to_image_batch(im, alpha=alpha).split(1)]
    else:
        out = list(to_image_batch(images, alpha=alpha).split(1))
    if not out:
        raise ValueError("no reference image given")
    return out
