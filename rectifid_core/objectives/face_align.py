"""Face alignment to the ArcFace 112x112 template, differentiable in the image.

The 5 keypoints (eyes, nose, mouth corners) come from the detector without
gradient; the similarity transform is fitted in numpy and the warp is done
with grid_sample so the identity loss backpropagates into the pixels.
Pixel convention: integer coordinates are pixel centres (as OpenCV's
warpAffine and insightface's landmarks), hence align_corners=True below.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ARCFACE_SIZE = 112
# Where ArcFace models expect left eye, right eye, nose tip, left and right
# mouth corner in a 112x112 crop (the standard insightface template).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst.

    Umeyama's closed form; returns the 2x3 matrix M with dst ~ M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need matching [N,2] point sets with N >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("source points are all identical; cannot fit a similarity transform")
    cov = d_c.T @ s_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sing * d).sum() / var_s)
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], axis=1)


def warp_affine(image: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Differentiable cv2.warpAffine: out[y, x] = image at M^-1 (x, y), zeros outside.

    image [B,C,H,W]; matrices [B,2,3] mapping source pixels to output pixels;
    size (height, width) of the output.
    """
    if image.ndim != 4 or matrices.shape != (image.shape[0], 2, 3):
        raise ValueError(f"need image [B,C,H,W] and matrices [B,2,3], got {tuple(image.shape)} and {tuple(matrices.shape)}")
    b, _, h, w = image.shape
    out_h, out_w = size
    dev = image.device
    full = torch.zeros(b, 3, 3, dtype=torch.float64, device=dev)
    full[:, :2] = matrices.to(device=dev, dtype=torch.float64)
    full[:, 2, 2] = 1.0
    inv = torch.linalg.inv(full)[:, :2]  # output pixel -> source pixel
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64, device=dev),
        torch.arange(out_w, dtype=torch.float64, device=dev),
        indexing="ij",
    )
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3)
    src = pts @ inv.transpose(1, 2)  # [B, out_h*out_w, 2] in source pixels
    norm = torch.stack([2.0 * src[..., 0] / max(w - 1, 1) - 1.0, 2.0 * src[..., 1] / max(h - 1, 1) - 1.0], dim=-1)
    grid = norm.reshape(b, out_h, out_w, 2).to(image.dtype)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def alignment_matrix(keypoints: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """2x3 matrix taking the 5 detected keypoints onto the template (scaled to `size`)."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (5, 2):
        raise ValueError(f"need 5 keypoints [5,2], got shape {keypoints.shape}")
    return similarity_transform(keypoints, ARCFACE_TEMPLATE * (size / ARCFACE_SIZE))


def align_faces(image: torch.Tensor, keypoints: np.ndarray, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Crops [N,3,size,size] 0..1 of the faces given by keypoints [N,5,2] in one image [1,3,H,W]."""
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, 5, 2)
    mats = torch.from_numpy(np.stack([alignment_matrix(k, size) for k in keypoints]))
    return warp_affine(image.expand(len(keypoints), -1, -1, -1), mats, (size, size))
