"""One home for detections: boxes with scores (and face keypoints), the rules that pick one,
IoU / NMS, and the pixel geometry of a box (clipping, cropping, masks, coverage).

Faces (SCRFD), objects (OWL-ViT), the multi-subject matcher and the crop node all go through
these functions, so a box means the same thing everywhere: x1 y1 x2 y2 in continuous pixel
coordinates of the image it was found in (pixel i spans [i, i+1)).

The default choice of face is insightface's own: `SCRFD.detect(img, max_num=n)` (insightface
0.7.3 and later, unchanged) keeps, when more than n faces are found, the n with the highest
`area - 2 * |box centre - image centre|^2`, the image centre being (W // 2, H // 2). RectifID's
released code calls `detect(max_num=1)` for one person and `max_num=2` for two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

# "insightface": SCRFD.detect(max_num)'s ranking (the reference code's choice); "largest": box
# area; "center": nearest the image centre; "index": index-th from the left (negative: from the
# right); "mask": the largest at least half inside a mask.
SELECTIONS = ("insightface", "largest", "center", "index", "mask")
Box = tuple[float, float, float, float]
Region = Union[Sequence[float], torch.Tensor, np.ndarray]


@dataclass
class Candidate:
    """One detection of some `kind` ("face", "subject"), as the multi-subject matcher pools them."""

    box: Box
    score: float
    kind: str
    keypoints: Optional[np.ndarray] = None  # [5, 2] for faces


@dataclass
class Detections:
    """Detections in one image: boxes [N,4] x1y1x2y2, scores [N], optional keypoints [N,5,2].

    `threshold` is the detection threshold that produced them (None when unknown or when
    nothing was found).
    """

    boxes: np.ndarray
    scores: np.ndarray
    keypoints: Optional[np.ndarray] = None
    threshold: Optional[float] = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if self.keypoints is not None:
            self.keypoints = np.asarray(self.keypoints, dtype=np.float32)
        if len(self.scores) != len(self.boxes) or (self.keypoints is not None and len(self.keypoints) != len(self.boxes)):
            raise ValueError(f"{len(self.boxes)} boxes, {len(self.scores)} scores and "
                             f"{'no' if self.keypoints is None else len(self.keypoints)} keypoint sets do not match")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, keypoints: bool = False, threshold: Optional[float] = None) -> "Detections":
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)) if keypoints else None, threshold)

    def subset(self, index: Sequence[int]) -> "Detections":
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        kps = None if self.keypoints is None else self.keypoints[index]
        return Detections(self.boxes[index], self.scores[index], kps, self.threshold)

    def box(self, i: int) -> Box:
        return tuple(float(v) for v in self.boxes[i])  # type: ignore[return-value]

    def candidates(self, kind: str) -> list[Candidate]:
        """The detections, in order, as matcher candidates."""
        return [Candidate(self.box(i), float(self.scores[i]), kind,
                          None if self.keypoints is None else self.keypoints[i]) for i in range(len(self))]


@dataclass
class LocatedSubject:
    """Every detection in one image and the index of the chosen one (None: nothing chosen)."""

    detections: Detections
    chosen: Optional[int]

    @property
    def boxes(self) -> list[Box]:
        return [self.detections.box(i) for i in range(len(self.detections))]

    @property
    def scores(self) -> list[float]:
        return [float(s) for s in self.detections.scores]


# -- geometry ---------------------------------------------------------------------------------


def box_areas(boxes: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """Areas of boxes [N,4]; `plus_one` counts both edge pixels (insightface's NMS convention)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    one = 1 if plus_one else 0
    return (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)


def iou_matrix(a: np.ndarray, b: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """IoU of every box in a [N,4] with every box in b [M,4] -> [N,M] (0 where the union is empty)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    one = 1 if plus_one else 0
    w = np.maximum(0.0, np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + one)
    h = np.maximum(0.0, np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + one)
    inter = w * h
    union = box_areas(a, plus_one)[:, None] + box_areas(b, plus_one)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, plus_one: bool = False) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first; a box is dropped when its
    IoU with a kept one exceeds `iou`. SCRFD uses plus_one=True, as insightface does."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores), kind="stable")
    x1, y1, x2, y2 = boxes.T
    one = 1 if plus_one else 0
    areas = box_areas(boxes, plus_one)
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return keep


def clip_box(box: Sequence[float], h: int, w: int) -> Box:
    """Box clipped to the image (corners sorted)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0.0), float(w)), min(max(x2, 0.0), float(w))))
    y1, y2 = sorted((min(max(y1, 0.0), float(h)), min(max(y2, 0.0), float(h))))
    return x1, y1, x2, y2


def pixel_bounds(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """Integer pixel rectangle (x1, y1, x2, y2), end exclusive, of a box: corners rounded and
    clipped to the image, at least one pixel (RectifID's object crop rounds the same way)."""
    x1, y1, x2, y2 = clip_box(box, h, w)
    xa, ya = min(int(round(x1)), w - 1), min(int(round(y1)), h - 1)
    return xa, ya, max(int(round(x2)), xa + 1), max(int(round(y2)), ya + 1)


def crop(image: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
    """Crop [..., H, W] to a box's pixel rectangle; differentiable in the image."""
    xa, ya, xb, yb = pixel_bounds(box, *image.shape[-2:])
    return image[..., ya:yb, xa:xb]


def box_mask(height: int, width: int, box: Sequence[float]) -> torch.Tensor:
    """[H,W] float mask, 1 on the box's pixel rectangle."""
    xa, ya, xb, yb = pixel_bounds(box, height, width)
    mask = torch.zeros(height, width)
    mask[ya:yb, xa:xb] = 1.0
    return mask


def region_mask(region: Region, hw: tuple[int, int]) -> np.ndarray:
    """Boolean [H,W] of a region: a pixel box (x1, y1, x2, y2) or a mask at any resolution."""
    h, w = hw
    if isinstance(region, (torch.Tensor, np.ndarray)):
        m = region.detach().float().cpu() if isinstance(region, torch.Tensor) else torch.from_numpy(
            np.asarray(region, dtype=np.float32))
        while m.ndim > 2:
            if m.shape[0] != 1:
                raise ValueError(f"region mask must be [H,W] (or with leading 1-dims), got shape {tuple(m.shape)}")
            m = m[0]
        return F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0].numpy() > 0.5
    if len(region) != 4:
        raise ValueError(f"region box must be (x1, y1, x2, y2) in pixels, got {region!r}")
    return box_mask(h, w, region).numpy() > 0.5


def region_coverage(boxes: np.ndarray, region: Region, hw: tuple[int, int]) -> np.ndarray:
    """Fraction of each box's pixel rectangle inside the region."""
    m = region_mask(region, hw)
    cover = np.zeros(len(boxes))
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 4)):
        xa, ya, xb, yb = pixel_bounds(box, *hw)
        cover[i] = m[ya:yb, xa:xb].mean()
    return cover


# -- rankings and selections ------------------------------------------------------------------


def insightface_values(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """SCRFD.detect's ranking value per box: area - 2 * squared offset of the box centre from
    the image centre (W // 2, H // 2)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    h, w = hw
    dx = (boxes[:, 0] + boxes[:, 2]) / 2 - w // 2
    dy = (boxes[:, 1] + boxes[:, 3]) / 2 - h // 2
    return box_areas(boxes) - 2.0 * (dx**2 + dy**2)


def top_n(dets: Detections, hw: tuple[int, int], n: int) -> Detections:
    """insightface's `detect(max_num=n)`: with more than n detections, the n best by its ranking
    (in ranking order); otherwise all of them, unchanged (score order)."""
    if n < 1 or len(dets) <= n:
        return dets
    return dets.subset(np.argsort(insightface_values(dets.boxes, hw))[::-1][:n])


def inside_region(dets: Detections, region: Optional[Region], hw: tuple[int, int]) -> Detections:
    """The detections at least half inside `region` (all of them when region is None)."""
    if region is None or not len(dets):
        return dets
    return dets.subset(np.flatnonzero(region_coverage(dets.boxes, region, hw) >= 0.5))


def select(dets: Detections, hw: tuple[int, int], selection: str = "insightface", index: int = 0,
           region: Optional[Region] = None) -> Optional[int]:
    """Index (into `dets`) of the chosen detection, or None.

    A region (pixel box or mask) first restricts the choice to detections at least half inside
    it; "mask" needs one and takes the largest there. See SELECTIONS for the rules.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if selection == "mask" and region is None:
        raise ValueError("selection 'mask' needs a mask that marks the subject to keep")
    pool = np.arange(len(dets))
    if region is not None and len(pool):
        pool = pool[region_coverage(dets.boxes, region, hw) >= 0.5]
    if len(pool) == 0:
        return None
    boxes = dets.boxes[pool]
    if selection == "insightface":
        return int(pool[np.argsort(insightface_values(boxes, hw))[::-1][0]])
    if selection in ("largest", "mask"):
        return int(pool[np.argmax(box_areas(boxes))])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    if selection == "center":
        return int(pool[np.argmin((cx - hw[1] / 2) ** 2 + (cy - hw[0] / 2) ** 2)])
    order = pool[np.argsort(cx, kind="stable")]
    return int(order[index]) if -len(order) <= index < len(order) else None


def describe_choice(located: LocatedSubject, what: str, selection: str) -> str:
    """One line for the log: how many were found and which one was taken (counted from 1)."""
    dets, k = located.detections, located.chosen
    if k is None:
        return f"{what}: {len(dets)} found, none chosen"
    box = ", ".join(f"{v:.0f}" for v in dets.boxes[k])
    return (f"{what}: {len(dets)} found, took number {k + 1} (score {float(dets.scores[k]):.2f}, box [{box}]) "
            f"by selection '{selection}'")
