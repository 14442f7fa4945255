"""Our ONNX -> torch converter against onnxruntime on the graphs an ArcFace export contains."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import tiny_faces
from rectifid_core.objectives import OnnxGraphModule, UnsupportedOnnxOperator, onnx_to_torch


def _ort(path_or_bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    sess = onnxruntime.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture(scope="module")
def arcface(tmp_path_factory):
    path = tmp_path_factory.mktemp("arcface") / "glintr100.onnx"
    model = tiny_faces.build_arcface_onnx(path, seed=3)
    return path, model


def test_iresnet_export_matches_onnxruntime_and_torch(arcface):
    path, model = arcface
    net = onnx_to_torch(path)
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ours = net(x)
        original = model(x)
    (ref,) = _ort(str(path), {net.input_names[0]: x.numpy()})
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.numpy(), original.numpy(), atol=1e-4, rtol=1e-4)
    # the export keeps the unfusable batch norms and the view()-style head
    ops = {op for op, *_ in net._nodes}
    assert {"BatchNormalization", "PRelu", "Add", "Conv", "Gemm", "Reshape"} <= ops


def test_gradient_reaches_the_image_and_weights_stay_frozen(arcface):
    net = onnx_to_torch(arcface[0])
    assert list(net.parameters()) == [] and all(not b.requires_grad for b in net.buffers())
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    (g,) = torch.autograd.grad(net(x * 2 - 1).pow(2).sum(), x)
    assert torch.isfinite(g).all() and (g.abs() > 0).float().mean() > 0.5
    # in float64 the gradient matches a central finite difference through the converted graph
    net = net.double()
    xd = x.detach().double().requires_grad_(True)
    f = lambda t: net(t * 2 - 1).pow(2).sum()
    (gd,) = torch.autograd.grad(f(xd), xd)
    d = torch.randn_like(xd)
    with torch.no_grad():
        fd = (f(xd + 1e-6 * d) - f(xd - 1e-6 * d)) / 2e-6
    assert float((gd * d).sum()) == pytest.approx(float(fd), rel=1e-5)


def _graph(nodes, inputs, outputs, inits, opset=13):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_other_operators_match_onnxruntime():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((5, 36)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(fc, "fc"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc_b"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 2, 0, 0], dtype=np.int64), "pads"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
        numpy_helper.from_array(np.float32(0.3), "lo"),
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "mm"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[0, 1, 1, 0], strides=[2, 1]),  # asymmetric pads
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(0.5), "k")),
        helper.make_node("Sub", ["r", "k"], ["s"]),
        helper.make_node("Div", ["s", "k"], ["dv"]),
        helper.make_node("LeakyRelu", ["dv"], ["lr"], alpha=0.2),
        helper.make_node("Pad", ["lr", "pads"], ["pd"], mode="constant"),
        helper.make_node("MaxPool", ["pd"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[1, 1]),
        helper.make_node("Dropout", ["ap"], ["dr"]),
        helper.make_node("Transpose", ["dr"], ["tr"], perm=[0, 1, 3, 2]),
        helper.make_node("Reshape", ["tr", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["gm"], transB=1, alpha=0.7, beta=1.3),
        helper.make_node("Unsqueeze", ["gm", "ax1"], ["us"]),
        helper.make_node("MatMul", ["us", "mm"], ["mt"]),
        helper.make_node("Squeeze", ["mt", "ax1"], ["sq"]),
        helper.make_node("Sigmoid", ["sq"], ["sg"]),
        helper.make_node("Clip", ["sg", "lo"], ["y"]),
        helper.make_node("GlobalAveragePool", ["c"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["y2"], axis=1),
    ]
    model = _graph(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        inits,
    )
    x = rng.standard_normal((2, 3, 8, 6)).astype(np.float32)
    y, y2 = OnnxGraphModule(model)(torch.from_numpy(x))
    ry, ry2 = _ort(model.SerializeToString(), {"x": x})
    np.testing.assert_allclose(y.numpy(), ry, atol=1e-5)
    np.testing.assert_allclose(y2.numpy(), ry2, atol=1e-5)


def test_unsupported_operator_is_named():
    model = _graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Softplus", ["a"], ["y"], name="head/softplus")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [],
    )
    with pytest.raises(UnsupportedOnnxOperator, match=r"Softplus \(node 'head/softplus'\)"):
        OnnxGraphModule(model)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="glintr100.onnx"):
        onnx_to_torch(tmp_path / "glintr100.onnx")


# -- SCRFD ------------------------------------------------------------------------

# Float32 graphs evaluated by two libraries differ only in summation order: ~3e-7 of each output's largest
# magnitude on these graphs. 1e-5 leaves a 30x margin; a wrong operator (nearest vs bilinear upsampling, an
# ignored batch-norm statistic, a shifted Slice) is off by 1e-2 or more.
RELATIVE = 1e-5


def _assert_outputs_close(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert tuple(a.shape) == b.shape
        scale = max(float(np.abs(b).max()), 1e-12)
        np.testing.assert_allclose(a.detach().double().numpy() / scale, b.astype(np.float64) / scale, atol=RELATIVE)


@pytest.fixture(scope="module")
def scrfd_shaped(tmp_path_factory):
    path = tmp_path_factory.mktemp("scrfd") / "scrfd_10g_bnkps.onnx"
    return path, tiny_faces.build_scrfd_shaped_onnx(path, seed=5)


@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (160, 96)])
def test_scrfd_shaped_export_matches_onnxruntime_on_random_inputs(scrfd_shaped, hw):
    path, model = scrfd_shaped
    net = onnx_to_torch(path)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0] * hw[1]))
    with torch.no_grad():
        ours = net(x)
        original = model(x)
    _assert_outputs_close(ours, _ort(str(path), {"input.1": x.numpy()}))
    _assert_outputs_close(ours, [o.numpy() for o in original])
    assert ours[0].shape == (hw[0] // 8 * hw[1] // 8 * 2, 1) and ours[8].shape == (hw[0] // 32 * hw[1] // 32 * 2, 10)
    # the export has the operators of SCRFD's mmdet export, dynamic reshapes included
    ops = {op for op, *_ in net._nodes}
    assert {"Conv", "BatchNormalization", "Relu", "Add", "Concat", "Resize", "Sigmoid", "Reshape", "Transpose", "Mul",
            "Shape", "Gather", "Unsqueeze", "MaxPool", "AveragePool"} <= ops


def test_synthetic_scrfd_graph_matches_onnxruntime(tmp_path):
    path = tmp_path / "scrfd.onnx"
    tiny_faces.build_scrfd_onnx(path)
    net = onnx_to_torch(path)
    x = torch.rand(1, 3, 640, 640) * 2 - 1
    _assert_outputs_close(net(x), _ort(str(path), {"input.1": x.numpy()}))
    assert {"Resize", "Slice", "Shape"} <= {op for op, *_ in net._nodes}


def test_resize_upsample_slice_cast_match_onnxruntime():
    rng = np.random.default_rng(1)
    i64 = lambda *v: np.array(v, dtype=np.int64)
    inits = [
        numpy_helper.from_array(np.array([1, 1, 2, 3], dtype=np.float32), "scales"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales2"),
        numpy_helper.from_array(np.zeros(0, dtype=np.float32), "roi"),
        numpy_helper.from_array(i64(1, -6), "st"),
        numpy_helper.from_array(i64(2**62, -1), "en"),  # past the end; from the end
        numpy_helper.from_array(i64(2, 3), "ax"),
        numpy_helper.from_array(i64(2, 1), "sp"),
        numpy_helper.from_array(i64(1, 2), "filled_shape"),
    ]
    nodes = [
        helper.make_node("Resize", ["x", "roi", "scales"], ["nn"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Resize", ["x", "roi", "scales2"], ["lin"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Resize", ["x", "roi", "scales2"], ["ac"], mode="linear",
                         coordinate_transformation_mode="align_corners"),
        helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["sl"]),
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Cast", ["shp"], ["shp_f"], to=TensorProto.FLOAT),
        helper.make_node("Floor", ["shp_f"], ["fl"]),
        helper.make_node("Exp", ["sl"], ["ex"]),
        helper.make_node("ConstantOfShape", ["filled_shape"], ["cs"],
                         value=numpy_helper.from_array(np.array([0.25], dtype=np.float32))),
    ]
    names = ["nn", "lin", "ac", "sl", "fl", "ex", "cs"]
    model = _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 7])],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names], inits, opset=11)
    x = rng.standard_normal((1, 2, 5, 7)).astype(np.float32)
    _assert_outputs_close(OnnxGraphModule(model)(torch.from_numpy(x)), _ort(model.SerializeToString(), {"x": x}))
    # opset 9 Upsample (scales as an input), as older SCRFD exports have it
    up = _graph([helper.make_node("Upsample", ["x", "scales2"], ["y"], mode="nearest")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 7])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits[1:2], opset=9)
    _assert_outputs_close([OnnxGraphModule(up)(torch.from_numpy(x))], _ort(up.SerializeToString(), {"x": x}))


def test_resize_modes_torch_cannot_match_are_refused():
    model = _graph([helper.make_node("Resize", ["x", "", "s"], ["y"], mode="nearest",
                                     coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "s")])
    refused = "Resize nearest with coordinate_transformation_mode='half_pixel'"
    with pytest.raises(UnsupportedOnnxOperator, match=refused):
        OnnxGraphModule(model)(torch.zeros(1, 1, 4, 4))


def test_converted_scrfd_runs_off_the_host_with_shape_constants_on_it(scrfd_shaped):
    """The meta device stands in for a GPU: every tensor op must run there, the shape bookkeeping
    (integer constants, Shape outputs) stays on the host so reading it never waits for the device."""
    net = onnx_to_torch(scrfd_shaped[0]).to("meta")
    assert net._host_constants and all(t.device.type == "cpu" for t in net._host_constants.values())
    assert all(b.device.type == "meta" and b.is_floating_point() for b in net.buffers())
    out = net(torch.zeros(1, 3, 64, 96, device="meta"))
    assert all(o.device.type == "meta" for o in out) and out[0].shape == (8 * 12 * 2, 1)
