"""Face objective: antelopev2 loading, SCRFD decoding, retries, selection, alignment, ArcFace loss."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import tiny_faces
from rectifid_core.images import to_uint8_hwc
from rectifid_core.objectives import (
    ARCFACE_TEMPLATE,
    Detections,
    FaceIdentityObjective,
    MultiSubjectObjective,
    ObjectiveOutput,
    align_faces,
    alignment_matrix,
    detect_faces,
    find_antelopev2,
    load_face_models,
    resolve_providers,
    select,
    similarity_transform,
    top_n,
    warp_affine,
)


@pytest.fixture(scope="module")
def models(pack_root):
    return load_face_models(pack_root, provider="cpu")


# -- loading ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "nested", "self"])
def test_pack_found_in_every_user_layout(tmp_path, pack_root, layout):
    import shutil

    folder = {"flat": tmp_path / "antelopev2", "nested": tmp_path / "antelopev2" / "antelopev2", "self": tmp_path}[layout]
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        shutil.copy(pack_root / "models" / "antelopev2" / name, folder / name)
    assert find_antelopev2(tmp_path) == folder


def test_missing_pack_lists_every_path_and_file(tmp_path):
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    (tmp_path / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        load_face_models(tmp_path)
    msg = str(err.value)
    for folder in (tmp_path / "models" / "antelopev2", tmp_path / "antelopev2", tmp_path / "antelopev2" / "antelopev2", tmp_path):
        assert str(folder) in msg
    assert "glintr100.onnx" in msg and "scrfd_10g_bnkps.onnx" in msg and "insightface" in msg
    # the detector file is there; only the recognizer is reported missing for that folder
    line = next(l for l in msg.splitlines() if l.strip().startswith(str(tmp_path / "models" / "antelopev2") + " "))
    assert "glintr100.onnx" in line and "scrfd" not in line


def test_provider_choice_and_fallback():
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert resolve_providers("auto", [cpu]) == [cpu]
    assert resolve_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert resolve_providers("auto", ["CoreMLExecutionProvider", cpu]) == ["CoreMLExecutionProvider", cpu]
    assert resolve_providers("rocm", ["ROCMExecutionProvider", cpu]) == ["ROCMExecutionProvider", cpu]
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider is not available"):
        assert resolve_providers("cuda", [cpu]) == [cpu]
    with pytest.raises(ValueError, match="tpu"):
        resolve_providers("tpu", [cpu])


def test_unavailable_provider_loads_on_cpu(pack_root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_face_models(pack_root, provider="directml")
    assert m.providers == ["CPUExecutionProvider"]
    assert any("DmlExecutionProvider" in str(w.message) for w in caught)


# -- detection ----------------------------------------------------------------


def test_detector_reports_the_known_boxes(models):
    faces = ((5, 5, 1.0, 0.2), (12, 9, 0.8, 1.0))
    dets = models.detector.detect(to_uint8_hwc(tiny_faces.face_image(faces=faces)[0]), 0.5)
    assert len(dets) == 2 and dets.threshold == 0.5
    np.testing.assert_allclose(dets.scores, [1.0, 0.8], atol=0.01)
    for box, kps, (col, row, _, red) in zip(dets.boxes, dets.keypoints, faces):
        np.testing.assert_allclose(box, tiny_faces.expected_box(col, row, red), atol=1e-3)
        half = (box[2] - box[0]) / 2
        np.testing.assert_allclose(kps.reshape(-1), np.tile([32 * col, 32 * row], 5) + half * tiny_faces.KPS_UNIT, atol=1e-3)


def test_letterboxed_image_matches_insightface_decoder(models, pack_root):
    """A 320x300 image is scaled by 2 into the 640 input: boxes come back in image pixels."""
    faces = ((5, 5, 1.0, 0.8), (14, 12, 0.9, 1.0))
    img = tiny_faces.face_image(size=(320, 300), faces=faces, cell=16)
    rgb = to_uint8_hwc(img[0])
    dets = models.detector.detect(rgb, 0.5)
    assert len(dets) == 2
    for box, (col, row, _, red) in zip(dets.boxes, faces):
        np.testing.assert_allclose(box, tiny_faces.expected_box(col, row, red) / 2, atol=1.5)
    scrfd = pytest.importorskip("insightface.model_zoo.scrfd")
    ref = scrfd.SCRFD(model_file=str(pack_root / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx"))
    ref.prepare(-1, input_size=(640, 640))
    boxes, kps = ref.detect(rgb[:, :, ::-1].copy(), input_size=(640, 640))  # insightface takes BGR
    order = np.argsort(-boxes[:, 4], kind="stable")
    np.testing.assert_allclose(dets.boxes, boxes[order, :4], atol=0.5)
    np.testing.assert_allclose(dets.scores, boxes[order, 4], atol=0.01)
    np.testing.assert_allclose(dets.keypoints, kps[order], atol=0.5)


def _reference_thresholds(start=0.5, until=None):
    """The thresholds single_person.py tries: `det_thresh -= 0.1` after each detect."""
    out, t = [], start
    while until is None or t >= until - 1e-9:
        out.append(t)
        if until is None and t <= 0:
            break
        t -= 0.1
    return out


def test_skip_mode_lowers_threshold_down_to_the_floor_then_gives_up(models):
    dim = to_uint8_hwc(tiny_faces.face_image(faces=((10, 10, 0.35, 0.5),))[0])  # score ~0.35
    assert len(models.detector.detect(dim, 0.5)) == 0
    dets = detect_faces(models, dim, threshold=0.5, floor=0.1, step=0.1)
    assert len(dets) == 1 and dets.threshold == pytest.approx(0.3)
    dark = to_uint8_hwc(tiny_faces.face_image(faces=((10, 10, 0.05, 0.5),))[0])
    calls = []
    real = models.detector.detect
    models.detector.detect = lambda im, t, **k: calls.append(t) or real(im, t, **k)
    try:
        none = detect_faces(models, dark, threshold=0.5, floor=0.1, step=0.1)
        assert len(none) == 0 and calls == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
        calls.clear()
        # no floor (the reference's loop): the faint face is found just above 0, as insightface's loop finds it
        found = detect_faces(models, dark, threshold=0.5, floor=None, step=0.1)
        assert calls == _reference_thresholds()[:6] and 0 < calls[-1] < 1e-9
        assert len(found) >= 1 and found.threshold == calls[-1]
    finally:
        del models.detector.detect
    with pytest.raises(ValueError):
        detect_faces(models, dark, threshold=0.5, floor=0.0)


def _insightface_scrfd(pack_root):
    scrfd = pytest.importorskip("insightface.model_zoo.scrfd")
    det = scrfd.SCRFD(model_file=str(pack_root / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx"))
    det.prepare(-1, input_size=(640, 640))
    return det


def _reference_detect(det, rgb, max_num):
    """single_person.py / multi_person_perflow.ipynb, literally: lower det_thresh by 0.1 until
    max_num faces come back from insightface's own detect(max_num) (BGR input)."""
    backup = det.det_thresh
    boxes = []
    try:
        while len(boxes) < max_num:
            boxes, kpss = det.detect(rgb[:, :, ::-1].copy(), max_num=max_num)
            det.det_thresh -= 0.1
        used = det.det_thresh + 0.1
    finally:
        det.det_thresh = backup
    return boxes, kpss, used


def _ranking_0_7_3(det, img_shape, max_num):
    """insightface 0.7.3 SCRFD.detect's max_num block, copied as a literal re-implementation."""
    if max_num > 0 and det.shape[0] > max_num:
        area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
        img_center = img_shape[0] // 2, img_shape[1] // 2
        offsets = np.vstack([(det[:, 0] + det[:, 2]) / 2 - img_center[1], (det[:, 1] + det[:, 3]) / 2 - img_center[0]])
        offset_dist_squared = np.sum(np.power(offsets, 2.0), 0)
        values = area - offset_dist_squared * 2.0
        bindex = np.argsort(values)[::-1]
        det = det[bindex[0:max_num], :]
    return det


def test_insightface_ranking_equals_the_0_7_3_rule_on_random_boxes():
    rng = np.random.default_rng(7)
    for trial in range(200):
        h, w = int(rng.integers(33, 900)), int(rng.integers(33, 900))  # odd sizes exercise H // 2, W // 2
        n = int(rng.integers(1, 7))
        xy = rng.uniform(0, [w, h], (n, 2))
        wh = rng.uniform(4, 200, (n, 2))
        boxes = np.hstack([xy, xy + wh]).astype(np.float32)
        scores = np.sort(rng.uniform(0.1, 1, n))[::-1].astype(np.float32)
        dets = Detections(boxes, scores)
        for max_num in (1, 2, 3):
            expect = _ranking_0_7_3(np.hstack([boxes, scores[:, None]]), (h, w), max_num)
            np.testing.assert_array_equal(top_n(dets, (h, w), max_num).boxes, expect[:, :4])
        assert select(dets, (h, w), "insightface") is not None
        np.testing.assert_array_equal(dets.boxes[select(dets, (h, w), "insightface")],
                                      _ranking_0_7_3(np.hstack([boxes, scores[:, None]]), (h, w), 1)[0, :4])


def test_generated_face_is_the_one_insightface_picks(models, pack_root):
    """Large-but-off-centre, small-but-central and medium faces: ours picks what detect(max_num=1) picks,
    which is neither always the largest nor always the most central."""
    ref_det = _insightface_scrfd(pack_root)
    layouts = [((3, 10, 1.0, 1.0), (11, 10, 1.0, 0.1), (16, 15, 1.0, 0.5)),  # centre small one wins
               ((7, 9, 1.0, 1.0), (10, 10, 1.0, 0.05), (15, 3, 1.0, 0.6)),  # large, near the centre wins
               ((4, 4, 0.9, 0.8), (16, 16, 0.8, 0.8), (12, 5, 0.7, 0.2))]
    picks = set()
    objective = FaceIdentityObjective(models, tiny_faces.face_image())
    for faces in layouts:
        img = tiny_faces.face_image(faces=faces)
        rgb = to_uint8_hwc(img[0])
        dets = models.detector.detect(rgb, 0.5)
        assert len(dets) == 3
        boxes, _, _ = _reference_detect(ref_det, rgb, 1)
        k = select(dets, (640, 640), "insightface")
        np.testing.assert_allclose(dets.boxes[k], boxes[0, :4], atol=0.5)
        largest = select(dets, (640, 640), "largest")
        center = select(dets, (640, 640), "center")
        picks.add((k == largest, k == center))
        # the objective steers that face
        out = objective(img)
        np.testing.assert_allclose(out.diagnostics["boxes"][0], boxes[0, :4], atol=0.5)
    assert (False, True) in picks and (True, False) in picks  # the rule is neither "largest" nor "center"


def test_faint_face_is_still_steered_as_the_reference_does(models, pack_root):
    """Best score ~0.03: the reference keeps lowering the threshold and steers it; 'skip' gives up at 0.1."""
    faint = tiny_faces.face_image(faces=((10, 10, 0.03, 1.0),))
    rgb = to_uint8_hwc(faint[0])
    assert len(models.detector.detect(rgb, 0.1)) == 0
    boxes, _, used = _reference_detect(_insightface_scrfd(pack_root), rgb, 1)
    obj = FaceIdentityObjective(models, tiny_faces.face_image())
    x = faint.clone().requires_grad_(True)
    out = obj(x)
    assert out.diagnostics["missing"] == [[]] and out.diagnostics["skipped"] == [False]
    assert out.diagnostics["det_threshold"][0] == used
    np.testing.assert_allclose(out.diagnostics["boxes"][0], boxes[0, :4], atol=0.5)
    (g,) = torch.autograd.grad(out.loss.sum(), x)
    assert out.loss.item() > 0 and g.abs().sum() > 0
    skip = FaceIdentityObjective(models, tiny_faces.face_image(), no_face="skip")(x)
    assert skip.diagnostics["missing"] == [[0]] and skip.loss.item() == 0.0


def test_face_selection_rules(models):
    faces = ((4, 10, 1.0, 0.3), (10, 10, 1.0, 0.6), (16, 4, 1.0, 1.0))  # left small, centre, right largest
    img = tiny_faces.face_image(faces=faces)
    dets = models.detector.detect(to_uint8_hwc(img[0]), 0.5)
    assert len(dets) == 3
    cx = (dets.boxes[:, 0] + dets.boxes[:, 2]) / 2
    hw = (640, 640)
    assert cx[select(dets, hw, "largest")] == pytest.approx(512, abs=2)
    assert cx[select(dets, hw, "center")] == pytest.approx(320, abs=2)
    assert cx[select(dets, hw, "index", index=0)] == pytest.approx(128, abs=2)
    assert cx[select(dets, hw, "index", index=-1)] == pytest.approx(512, abs=2)
    assert select(dets, hw, "index", index=3) is None
    # a region restricts the choice: the largest face inside the left half
    assert cx[select(dets, hw, "largest", region=(0, 0, 400, 640))] == pytest.approx(320, abs=2)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :20] = 1  # left 200 pixels once resized to the image
    assert cx[select(dets, hw, "largest", region=mask)] == pytest.approx(128, abs=2)
    assert select(dets, hw, "largest", region=(600, 600, 640, 640)) is None
    with pytest.raises(ValueError, match="biggest"):
        select(dets, hw, "biggest")
    with pytest.raises(ValueError, match="needs a mask"):
        select(dets, hw, "mask")
    assert cx[select(dets, hw, "mask", region=mask)] == pytest.approx(128, abs=2)


# -- alignment ----------------------------------------------------------------


def test_similarity_transform_recovers_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    a = math.radians(25)
    m_true = np.array([[1.7 * math.cos(a), -1.7 * math.sin(a), 12.0], [1.7 * math.sin(a), 1.7 * math.cos(a), -30.0]])
    dst = src @ m_true[:, :2].T + m_true[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), m_true, atol=1e-9)


def test_warp_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (90, 120, 3)).astype(np.float32)
    a = math.radians(-15)
    m = np.array([[0.8 * math.cos(a), -0.8 * math.sin(a), 7.3], [0.8 * math.sin(a), 0.8 * math.cos(a), -4.1]])
    ref = cv2.warpAffine(img, m, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    ours = warp_affine(torch.from_numpy(img).permute(2, 0, 1)[None], torch.from_numpy(m)[None], (112, 112))[0]
    np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), ref, atol=1e-4)
    # half a pixel off (the align_corners=False convention) would be far from OpenCV
    m[:, 2] += 0.5
    shifted = warp_affine(torch.from_numpy(img).permute(2, 0, 1)[None], torch.from_numpy(m)[None], (112, 112))[0]
    assert np.abs(shifted.permute(1, 2, 0).numpy() - ref).max() > 0.1


def test_alignment_puts_landmarks_on_template():
    h, w = 300, 400
    a = math.radians(20)
    s = 2.3
    to_template = np.array([[s * math.cos(a), -s * math.sin(a), 0.0], [s * math.sin(a), s * math.cos(a), 0.0]])
    to_template[:, 2] = ARCFACE_TEMPLATE.mean(0) - to_template[:, :2] @ np.array([210.0, 140.0])
    inv = np.linalg.inv(np.vstack([to_template, [0, 0, 1]]))[:2]
    kps = ARCFACE_TEMPLATE @ inv[:, :2].T + inv[:, 2]  # landmark positions in the photo
    ys, xs = np.mgrid[:h, :w]
    img = np.zeros((h, w), dtype=np.float32)
    sigma = 1.5 * s
    for x, y in kps:
        img += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    photo = torch.from_numpy(img)[None, None].expand(1, 3, h, w).contiguous()
    crop = align_faces(photo, kps[None])[0, 0].numpy()
    assert crop.shape == (112, 112)
    for tx, ty in ARCFACE_TEMPLATE:
        x0, y0 = int(round(tx)), int(round(ty))
        win = crop[y0 - 6 : y0 + 7, x0 - 6 : x0 + 7]
        wy, wx = np.mgrid[y0 - 6 : y0 + 7, x0 - 6 : x0 + 7]
        cx, cy = (win * wx).sum() / win.sum(), (win * wy).sum() / win.sum()
        assert abs(cx - tx) < 1.0 and abs(cy - ty) < 1.0, (cx, cy, tx, ty)


# -- objective ----------------------------------------------------------------


def _embedding(models, img, keypoints):
    with torch.no_grad():
        return models.recognizer(align_faces(img, keypoints[None]) * 2 - 1)[0]


def test_identity_loss_matches_independent_computation_and_has_gradient(models):
    ref = tiny_faces.face_image(faces=((10, 10, 1.0, 0.8),))
    gen = tiny_faces.face_image(size=(512, 512), faces=((7, 8, 0.9, 0.5),))
    gen[:, 2] = gen[:, 2].flip(-1)
    obj = FaceIdentityObjective(models, ref)
    x = gen.clone().requires_grad_(True)
    out = obj(x)
    assert isinstance(out, ObjectiveOutput)
    r_dets = models.detector.detect(to_uint8_hwc(ref[0]), 0.5)
    g_dets = models.detector.detect(to_uint8_hwc(gen[0]), 0.5)
    e_ref = _embedding(models, ref, r_dets.keypoints[0])
    e_gen = _embedding(models, gen, g_dets.keypoints[0])
    cos = torch.nn.functional.cosine_similarity(e_ref, e_gen, dim=0)
    assert out.loss.shape == (1,)
    assert out.loss[0].item() == pytest.approx(100 * (1 - cos.item()), abs=1e-3)
    assert out.diagnostics["similarity"][0] == pytest.approx(cos.item(), abs=1e-5)
    assert out.diagnostics["det_threshold"] == [0.5] and out.diagnostics["skipped"] == [False]
    np.testing.assert_allclose(out.diagnostics["boxes"][0], g_dets.boxes[0], atol=0.1)
    out.loss.sum().backward()
    grad = x.grad[0].abs().sum(0)
    # the gradient covers exactly the source footprint of the 112x112 crop
    m = np.vstack([alignment_matrix(g_dets.keypoints[0]), [0, 0, 1]])
    corners = np.array([[0, 0, 1], [111, 0, 1], [0, 111, 1], [111, 111, 1]]) @ np.linalg.inv(m)[:2].T
    x0, y0 = np.floor(corners.min(0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
    inside = grad[y0:y1, x0:x1].sum()
    assert inside > 0 and grad.sum() == pytest.approx(inside.item(), rel=1e-6)


def test_same_image_gives_zero_loss_and_references_are_averaged(models):
    a = tiny_faces.face_image(faces=((10, 10, 1.0, 0.8),))
    b = tiny_faces.face_image(faces=((6, 12, 1.0, 0.4),))
    b[:, 2] = 1 - b[:, 2]
    assert FaceIdentityObjective(models, a)(a).loss.item() == pytest.approx(0.0, abs=1e-3)
    ea = _embedding(models, a, models.detector.detect(to_uint8_hwc(a[0]), 0.5).keypoints[0])
    eb = _embedding(models, b, models.detector.detect(to_uint8_hwc(b[0]), 0.5).keypoints[0])
    norm = torch.nn.functional.normalize
    both = FaceIdentityObjective(models, [a, b], average="normalized")
    torch.testing.assert_close(both.reference_embedding, (norm(ea, dim=0) + norm(eb, dim=0)) / 2, atol=1e-5, rtol=1e-4)
    plain = FaceIdentityObjective(models, torch.cat([a, b]), average="plain")
    torch.testing.assert_close(plain.reference_embedding, (ea + eb) / 2, atol=1e-5, rtol=1e-4)


def test_recognizer_that_normalises_in_graph_gets_raw_pixels(tmp_path, models):
    """An MXNet-style recognizer (Sub/Mul inside the graph) with the same weights gives the same loss."""
    tiny_faces.build_antelopev2(tmp_path, mxnet_style=True)
    raw = load_face_models(tmp_path, provider="cpu")
    assert (raw.input_mean, raw.input_std) == (0.0, 1.0) and (models.input_mean, models.input_std) == (127.5, 127.5)
    ref = tiny_faces.face_image(faces=((10, 10, 1.0, 0.8),))
    gen = tiny_faces.face_image(faces=((8, 11, 1.0, 0.6),))
    a = FaceIdentityObjective(models, ref)(gen).loss
    b = FaceIdentityObjective(raw, ref)(gen).loss
    assert a.item() > 0.01 and b.item() == pytest.approx(a.item(), rel=1e-3)


def test_no_face_skip_mode_gives_no_gradient_and_counts(models):
    obj = FaceIdentityObjective(models, tiny_faces.face_image(), no_face="skip")
    gen = torch.cat([tiny_faces.face_image(faces=()), tiny_faces.face_image(faces=((9, 9, 1.0, 0.7),))])
    x = gen.clone().requires_grad_(True)
    out = obj(x)
    assert out.diagnostics["skipped"] == [True, False] and out.diagnostics["missing"] == [[0], []]
    assert out.diagnostics["similarity"][0] is None and out.diagnostics["det_threshold"][0] is None
    assert out.diagnostics["skipped_count"] == 1 and out.diagnostics["faces_found"] == [0, 1]
    assert out.loss[0].item() == 0.0 and out.loss[1].item() > 0
    (g,) = torch.autograd.grad(out.loss.sum(), x)
    assert g[0].abs().sum() == 0 and g[1].abs().sum() > 0
    obj(x)
    assert obj.skipped_total == 2
    # an all-skipped batch still gives a graph the solver can differentiate
    (g,) = torch.autograd.grad(obj(x[:1]).loss.sum(), x)
    assert g.abs().sum() == 0
    # the default (the reference's loop) steers the best candidate it finds in the blank image
    out = FaceIdentityObjective(models, tiny_faces.face_image())(x)
    assert out.diagnostics["missing"] == [[], []] and 0 < out.diagnostics["det_threshold"][0] < 1e-9
    with pytest.raises(ValueError, match="no_face must be one of fallback, skip"):
        FaceIdentityObjective(models, tiny_faces.face_image(), no_face="ignore")


def test_reference_without_face_names_it(models):
    good = tiny_faces.face_image()
    with pytest.raises(ValueError, match=r"no face found in reference image 2 \(320x240 pixels\)"):
        FaceIdentityObjective(models, [good, tiny_faces.face_image(size=(240, 320), faces=())])
    with pytest.raises(ValueError, match=r"face reference image 1 is 20x20 pixels"):
        FaceIdentityObjective(models, torch.rand(1, 3, 20, 20))


def test_two_people_matched_to_their_references(models):
    """Faces placed in either order are assigned to the right reference every time."""
    left, right = (4, 10, 1.0, 0.6), (15, 10, 1.0, 0.6)
    img = tiny_faces.face_image(faces=(left, right))
    # each reference is the generated image with only one of the two people visible
    ref_a = img.clone()
    ref_a[..., :, 240:] = 0
    ref_b = img.clone()
    ref_b[..., :, :320] = 0
    objs = [FaceIdentityObjective(models, ref_a, no_face="skip"), FaceIdentityObjective(models, ref_b, no_face="skip")]
    multi = MultiSubjectObjective(objs)
    x = img.clone().requires_grad_(True)
    out = multi(x)
    boxes = out.diagnostics["boxes"][0]
    owner = [(boxes[i][0] + boxes[i][2]) / 2 for i in out.diagnostics["assignment"][0]]
    assert owner[0] < 320 < owner[1]
    assert out.loss.item() == pytest.approx(0.0, abs=1e-2)
    assert all(s == pytest.approx(1.0, abs=1e-4) for s in out.diagnostics["similarity"][0])
    (g,) = torch.autograd.grad(out.loss.sum(), x)
    assert torch.isfinite(g).all()
    # only one person in the image: the other reference is reported missing
    solo = ref_b.clone().requires_grad_(True)
    out = multi(solo)
    assert out.diagnostics["missing"] == [[0]] and out.diagnostics["assignment"] == [[None, 0]]
    assert out.diagnostics["similarity"][0][0] is None
    # nobody: skipped, zero loss, valid graph
    empty = tiny_faces.face_image(faces=()).requires_grad_(True)
    out = multi(empty)
    assert out.diagnostics["skipped"] == [True] and out.loss.item() == 0.0
    torch.autograd.grad(out.loss.sum(), empty)


def test_two_faces_follow_the_multi_person_notebook(models, pack_root):
    """multi_person_perflow.ipynb: lower the threshold until two faces pass, keep insightface's top two
    (detect(max_num=2)), loss = 100 * (2 - best pairing's summed similarity)."""
    ref_det = _insightface_scrfd(pack_root)
    refs = [tiny_faces.face_image(faces=((10, 10, 1.0, 0.8),)), tiny_faces.face_image(faces=((9, 11, 1.0, 0.3),))]
    refs[1][:, 2] = 1 - refs[1][:, 2]
    objs = [FaceIdentityObjective(models, r) for r in refs]
    multi = MultiSubjectObjective(objs)
    e_refs = [_embedding(models, r, models.detector.detect(to_uint8_hwc(r[0]), 0.5).keypoints[0]) for r in refs]
    cos = torch.nn.functional.cosine_similarity
    for faces in (((4, 10, 1.0, 0.6), (15, 12, 0.35, 0.4)),  # second face only passes at 0.3
                  ((3, 4, 1.0, 1.0), (11, 9, 0.9, 0.3), (16, 14, 0.8, 0.7))):  # three faces: top two kept
        img = tiny_faces.face_image(faces=faces)
        rgb = to_uint8_hwc(img[0])
        boxes, kpss, used = _reference_detect(ref_det, rgb, 2)
        cands, info = objs[0].propose(img, 2, 4)
        assert info["det_threshold"] == used
        np.testing.assert_allclose(np.array([c.box for c in cands]), boxes[:, :4], atol=0.5)
        e = [_embedding(models, img, k) for k in kpss]
        sim = [cos(e_refs[0], e[0], dim=0), cos(e_refs[1], e[1], dim=0),
               cos(e_refs[0], e[1], dim=0), cos(e_refs[1], e[0], dim=0)]
        expected = (2 - max(sim[0] + sim[1], sim[2] + sim[3])) * 100
        out = multi(img)
        assert out.loss.item() == pytest.approx(expected.item(), abs=1e-3)
        assert out.diagnostics["missing"] == [[]] and len(out.diagnostics["boxes"][0]) == 2


def test_reference_photo_with_several_faces_uses_the_selection_and_logs_it(models, pack_root, caplog):
    faces = ((3, 10, 1.0, 1.0), (11, 10, 1.0, 0.1))  # large off-centre, small central: insightface takes the small
    photo = tiny_faces.face_image(faces=faces)
    boxes, _, _ = _reference_detect(_insightface_scrfd(pack_root), to_uint8_hwc(photo[0]), 1)
    with caplog.at_level("INFO", logger="rectifid_core.objectives.faces"):
        obj = FaceIdentityObjective(models, [tiny_faces.face_image(), photo])
    np.testing.assert_allclose(obj.reference_boxes[1], boxes[0, :4], atol=0.5)
    (record,) = [r for r in caplog.records if "reference image 2" in r.getMessage()]
    assert "2 found, took number" in record.getMessage() and "'insightface'" in record.getMessage()
    located = obj.reference_located[1]
    assert len(located.detections) == 2 and located.chosen is not None
    largest = FaceIdentityObjective(models, photo, reference_selection="largest")
    np.testing.assert_allclose(largest.reference_boxes[0], tiny_faces.expected_box(3, 10, 1.0), atol=1.0)
    with pytest.raises(ValueError, match="has no mask"):
        FaceIdentityObjective(models, photo, reference_selection="mask")


def test_index_selection_lowers_until_that_face_exists_and_single_face_references_still_work(models):
    ref = tiny_faces.face_image()  # one face: used whatever the index
    obj = FaceIdentityObjective(models, ref, selection="index", index=1, reference_selection="index", no_face="skip")
    np.testing.assert_allclose(obj.reference_boxes[0], tiny_faces.expected_box(10, 10, 1.0), atol=1.0)
    # the second face from the left only passes at threshold 0.3
    gen = tiny_faces.face_image(faces=((4, 10, 1.0, 0.5), (15, 10, 0.35, 0.5)))
    out = obj(gen)
    assert out.diagnostics["det_threshold"] == [pytest.approx(0.3)] and out.diagnostics["faces_found"] == [2]
    np.testing.assert_allclose(out.diagnostics["boxes"][0], tiny_faces.expected_box(15, 10, 0.5), atol=0.1)
    with pytest.raises(ValueError, match=r"reference image 1 has 2 face\(s\); face index 2 is out of range"):
        FaceIdentityObjective(models, tiny_faces.face_image(faces=((4, 10, 1.0, 0.5), (15, 10, 1.0, 0.5))),
                              reference_selection="index", index=2)
