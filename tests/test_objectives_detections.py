"""The shared detection module against independent computations: pixel-mask IoU, insightface's own NMS,
RectifID's object crop rule."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from rectifid_core.objectives.detections import Detections, box_mask, crop, inside_region, iou_matrix, nms


def _random_boxes(rng, n, size=60):
    xy = rng.integers(0, size - 10, (n, 2))
    wh = rng.integers(1, 30, (n, 2))
    return np.hstack([xy, np.minimum(xy + wh, size)]).astype(np.float64)


def test_iou_equals_pixel_mask_overlap():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
    masks = lambda boxes: [box_mask(60, 60, box).bool() for box in boxes]  # integer boxes: exact pixel sets
    expect = np.array([[float((m & n).sum()) / float((m | n).sum()) for n in masks(b)] for m in masks(a)])
    np.testing.assert_allclose(iou_matrix(a, b), expect, rtol=1e-12)
    # insightface's convention counts both edge pixels: the same as growing every box by one pixel
    grown = lambda boxes: boxes + np.array([0, 0, 1, 1])
    np.testing.assert_allclose(iou_matrix(a, b, plus_one=True), iou_matrix(grown(a), grown(b)), rtol=1e-12)


def test_nms_equals_insightface_nms():
    scrfd = pytest.importorskip("insightface.model_zoo.scrfd")
    rng = np.random.default_rng(1)
    for _ in range(20):
        boxes = _random_boxes(rng, 30) + rng.uniform(0, 1, (30, 4))
        scores = rng.uniform(0, 1, 30)
        order = np.argsort(-scores)  # insightface's nms expects detections sorted by score
        dets = np.hstack([boxes, scores[:, None]])[order].astype(np.float32)
        for thresh in (0.2, 0.4):
            expect = scrfd.SCRFD.nms(types.SimpleNamespace(nms_thresh=thresh), dets)
            assert nms(dets[:, :4], dets[:, 4], thresh, plus_one=True) == [int(i) for i in expect]


def test_crop_is_the_reference_object_crop():
    """single_object.py: box = [min(max(round(b), 0), size) for b in box]; TF.crop(image, top, left, h, w)."""
    rng = np.random.default_rng(2)
    image = torch.rand(1, 3, 48, 48)
    for _ in range(50):
        x1, y1 = rng.uniform(-8, 30, 2)
        box = [x1, y1, x1 + rng.uniform(3, 40), y1 + rng.uniform(3, 40)]
        r = [min(max(round(b), 0), 48) for b in box]
        if r[2] <= r[0] or r[3] <= r[1]:
            continue
        torch.testing.assert_close(crop(image, box), image[..., r[1]:r[3], r[0]:r[2]])


def test_region_keeps_boxes_at_least_half_inside():
    dets = Detections([[0, 0, 10, 10], [5, 0, 15, 10], [6, 0, 16, 10]], [0.9, 0.8, 0.7])
    left = torch.zeros(20, 20)
    left[:, :10] = 1
    kept = inside_region(dets, left, (20, 20))
    np.testing.assert_array_equal(kept.boxes, dets.boxes[:2])  # 100%, 50%; the third is 40% inside
    assert len(inside_region(dets, (12, 0, 20, 20), (20, 20))) == 0
    with pytest.raises(ValueError, match="boxes"):
        Detections([[0, 0, 1, 1]], [0.5, 0.4])
