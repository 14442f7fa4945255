"""SCRFD backends: the detector converted to torch finds what onnxruntime finds, and the rule that picks one."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tiny_faces
from rectifid_core.images import to_uint8_hwc
from rectifid_core.objectives import (FaceIdentityObjective, UnsupportedOnnxOperator, load_face_models,
                                      resolve_detector_backend)


@pytest.fixture(scope="module")
def both(pack_root):
    return {b: load_face_models(pack_root, provider="cpu", detector_backend=b) for b in ("onnxruntime", "torch")}


def _assert_same_detections(a, b, atol=1e-4):
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=atol)
    np.testing.assert_allclose(a.keypoints, b.keypoints, atol=atol)


IMAGES = [  # (size, faces, cell): square, and letterboxed non-square ones scaled by 2 and by 1.6
    ((640, 640), ((5, 5, 1.0, 0.2), (12, 9, 0.8, 1.0), (17, 3, 0.6, 0.5)), 32),
    ((320, 300), ((5, 5, 1.0, 0.8), (14, 12, 0.9, 1.0)), 16),
    ((200, 400), ((3, 4, 0.7, 0.3), (17, 2, 1.0, 0.9)), 20),
]


@pytest.mark.parametrize("size,faces,cell", IMAGES)
def test_torch_backend_finds_the_same_faces_as_onnxruntime(both, size, faces, cell):
    img = tiny_faces.face_image(size=size, faces=faces, cell=cell)
    assert both["torch"].detector.backend == "torch" and both["onnxruntime"].detector.backend == "onnxruntime"
    ort = both["onnxruntime"].detector.detect(to_uint8_hwc(img[0]), 0.5)
    assert len(ort) == len(faces)
    # the torch backend takes the uint8 array or the 0..1 tensor itself (quantised the same way, on its device)
    for image in (to_uint8_hwc(img[0]), img[0]):
        _assert_same_detections(both["torch"].detector.detect(image, 0.5), ort)


def test_random_weight_scrfd_gives_the_same_detections_on_both_backends(tmp_path, pack_root):
    """Hundreds of overlapping candidates from an SCRFD-shaped network: same scores, boxes and NMS result."""
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    shutil.copy(pack_root / "models" / "antelopev2" / "glintr100.onnx", folder)
    tiny_faces.build_scrfd_shaped_onnx(folder / "scrfd_10g_bnkps.onnx", seed=2)
    dets = {}
    image = (np.random.default_rng(0).random((96, 150, 3)) * 255).astype(np.uint8)
    for backend in ("onnxruntime", "torch"):
        models = load_face_models(tmp_path, provider="cpu", detector_backend=backend, detector_size=128)
        dets[backend] = models.detector.detect(image, 0.01)
    scores = torch.cat(models.detector.raw_outputs(image)[0][:3])
    assert len(dets["torch"]) > 5 and int((scores >= 0.01).sum()) > 2 * len(dets["torch"])  # NMS dropped most
    _assert_same_detections(dets["torch"], dets["onnxruntime"], atol=1e-3)


def test_faces_objective_gives_the_same_loss_and_gradient_on_both_backends(both):
    ref = tiny_faces.face_image(faces=((10, 10, 1.0, 0.8),))
    gen = tiny_faces.face_image(size=(512, 384), faces=((7, 8, 0.9, 0.5),), cell=32)
    gen[:, 2] = gen[:, 2].flip(-1)
    losses, grads = [], []
    for backend in ("onnxruntime", "torch"):
        x = gen.clone().double().requires_grad_(True)
        out = FaceIdentityObjective(both[backend], ref)(x)
        out.loss.sum().backward()
        losses.append(out.loss.detach().double())
        grads.append(x.grad)
    assert losses[0].item() > 0.01
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)


def test_auto_backend_rule(pack_root):
    assert resolve_detector_backend("auto", "cuda") == "torch"
    assert resolve_detector_backend("auto", torch.device("cuda", 1)) == "torch"
    assert resolve_detector_backend("auto", "cpu") == "onnxruntime"
    assert resolve_detector_backend("auto", "mps") == "onnxruntime"
    assert resolve_detector_backend("auto", "cpu", onnxruntime_installed=False) == "torch"
    assert resolve_detector_backend("onnxruntime", "cuda") == "onnxruntime"
    assert resolve_detector_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown detector backend 'tensorrt'; choose one of auto, torch, onnxruntime"):
        resolve_detector_backend("tensorrt", "cpu")
    cpu = load_face_models(pack_root, provider="cpu")
    assert cpu.detector.backend == "onnxruntime" and cpu.providers == ["CPUExecutionProvider"]
    assert "onnxruntime (CPUExecutionProvider)" in cpu.detector.description


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_keeps_the_image_on_the_gpu(pack_root):
    models = load_face_models(pack_root, device="cuda")
    assert models.detector.backend == "torch" and models.providers == []
    img = tiny_faces.face_image(faces=((10, 10, 1.0, 0.8),))
    outputs, _ = models.detector.raw_outputs(img[0].cuda())
    assert all(o.is_cuda for o in outputs)
    ort = load_face_models(pack_root, provider="cpu", detector_backend="onnxruntime").detector.detect(img[0], 0.5)
    _assert_same_detections(models.detector.detect(img[0].cuda(), 0.5), ort, atol=1e-3)


def test_detector_benchmark_times_both_backends(tmp_path):
    from rectifid_core.benchmark.detector import main

    out = tmp_path / "rows.json"
    rows = main(["--preset", "tiny", "--image", "96", "--size", "128", "--repeats", "1", "--threads", "0",
                 "--json", str(out)])  # threads 0: the test process's thread count is left alone
    assert json.loads(out.read_text()) == rows and len(rows) == 1
    assert set(rows[0]["seconds"]) == {"onnxruntime", "torch"} and min(rows[0]["seconds"].values()) > 0


def test_detector_torch_cannot_convert_is_named_and_auto_falls_back_to_onnxruntime(tmp_path, pack_root, monkeypatch):
    from onnx import load, save

    from rectifid_core.objectives import face_models

    folder = tmp_path / "antelopev2"
    shutil.copytree(pack_root / "models" / "antelopev2", folder)
    proto = load(str(folder / "scrfd_10g_bnkps.onnx"))
    next(n for n in proto.graph.node if n.op_type == "Identity").op_type = "Softplus"  # stride-32 scores
    save(proto, str(folder / "scrfd_10g_bnkps.onnx"))
    with pytest.raises(UnsupportedOnnxOperator, match=r"scrfd_10g_bnkps.onnx cannot run in torch: .*Softplus.*'onnxruntime'"):
        load_face_models(tmp_path, provider="cpu", detector_backend="torch")
    monkeypatch.setattr(face_models, "resolve_detector_backend", lambda *a, **k: "torch")  # what auto picks on CUDA
    with pytest.warns(RuntimeWarning, match="runs in onnxruntime instead"):
        models = load_face_models(tmp_path, provider="cpu")
    assert models.detector.backend == "onnxruntime" and models.providers == ["CPUExecutionProvider"]
