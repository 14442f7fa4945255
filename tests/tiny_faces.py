"""Tiny stand-ins for insightface's antelopev2 pack, in the real file formats.

`build_arcface_onnx`: a small iResNet (insightface's IBasicBlock layout:
BN -> conv -> BN -> PReLU -> conv(stride) -> BN, 1x1 downsample, BN2d /
flatten / dropout / FC / BN1d head) exported with torch.onnx the way
insightface's arcface_torch does (eval mode, dynamic batch).

`build_scrfd_onnx`: an onnx.helper graph with SCRFD's interface (input
[1,3,H,W], 9 outputs: scores, box distances and keypoint distances for
strides 8/16/32 with 2 anchors, each [cells*2, k]). Its outputs are simple
functions of the image so tests know what it must find: on the stride-32
grid, score = mean green of the cell (0..1) and the box/keypoint spread is
(0.5 + 2 * mean red) strides; strides 8 and 16 report zero scores (their
box and keypoint maps are the stride-32 ones upsampled by a nearest Resize
whose sizes come from Shape/Slice/Concat, as mmdet's FPN exports them).

`build_scrfd_shaped_onnx`: the benchmark's SCRFD-shaped network
(rectifid_core/benchmark/detector.py: SCRFD's layers and export pattern with
random weights), tiny, with non-trivial batch-norm statistics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from rectifid_core.benchmark.detector import ScrfdShaped, export_scrfd_onnx

STRIDES = (8, 16, 32)
# Unit-box keypoint offsets (x, y pairs) of the synthetic detector: a face-like pattern.
KPS_UNIT = np.array([-0.4, -0.3, 0.4, -0.3, 0.0, 0.1, -0.3, 0.5, 0.3, 0.5], dtype=np.float32)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + self.down(x)


class TinyIResNet(nn.Module):
    """112x112 RGB in -1..1 -> `dim`-d embedding, shaped like insightface's iresnet."""

    def __init__(self, dim: int = 32, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.prelu = nn.PReLU(width)
        self.layers = nn.Sequential(
            _Block(width, width * 2, 2), _Block(width * 2, width * 2, 2), _Block(width * 2, width * 4, 2), _Block(width * 4, width * 4, 2)
        )
        self.bn2 = nn.BatchNorm2d(width * 4)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(width * 4 * 7 * 7, dim)
        self.features = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.prelu(self.bn1(self.conv1(x))))
        x = self.bn2(x)
        x = x.view(x.size(0), -1)  # old exports emit Shape/Gather/Unsqueeze/Concat/Reshape for this
        return self.features(self.fc(self.dropout(x)))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine terms, so that a converter which ignored them would fail."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
        if isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model


def build_arcface_onnx(path: Path, seed: int = 0, dim: int = 32, mxnet_style: bool = False) -> TinyIResNet:
    """Export a TinyIResNet to `path` (torch.onnx, TorchScript exporter); returns the torch model.

    mxnet_style: prepend the in-graph normalisation (Sub 127.5, Mul 1/127.5)
    that insightface's MXNet-converted recognizers carry, so the file takes
    raw 0..255 pixels.
    """
    torch.manual_seed(seed)
    model = randomize_batchnorm(TinyIResNet(dim), seed).eval()
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 112, 112),),
        str(path),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=11,
        dynamo=False,
    )
    if mxnet_style:
        from onnx import helper, load, numpy_helper, save

        proto = load(str(path))
        first = proto.graph.input[0].name
        for node in proto.graph.node:
            node.input[:] = ["normalised" if i == first else i for i in node.input]
        proto.graph.initializer.extend(
            [numpy_helper.from_array(np.float32(127.5), "mean"), numpy_helper.from_array(np.float32(1 / 127.5), "scale")]
        )
        head = [
            helper.make_node("Sub", [first, "mean"], ["centred"], name="_minus0"),
            helper.make_node("Mul", ["centred", "scale"], ["normalised"], name="_mul0"),
        ]
        nodes = head + list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        save(proto, str(path))
    return model


def build_scrfd_onnx(path: Path) -> None:
    """Write the synthetic SCRFD graph described in the module docstring."""
    from onnx import TensorProto, helper, numpy_helper, save

    def const(name: str, value) -> None:
        inits.append(numpy_helper.from_array(np.asarray(value), name))

    nodes, inits, outputs = [], [], {}
    const("zero", np.float32(0.0))
    const("one", np.float32(1.0))
    const("half", np.float32(0.5))
    const("two", np.float32(2.0))
    const("flat1", np.array([-1, 1], dtype=np.int64))
    const("ones4", np.ones((1, 4), dtype=np.float32))
    const("kps_unit", KPS_UNIT[None])
    for ch, name in ((0, "red"), (1, "green")):
        const(f"{name}_start", np.array([ch], dtype=np.int64))
        const(f"{name}_end", np.array([ch + 1], dtype=np.int64))
    const("axis1", np.array([1], dtype=np.int64))
    const("nc_start", np.array([0], dtype=np.int64))
    const("nc_end", np.array([2], dtype=np.int64))
    const("hw_start", np.array([2], dtype=np.int64))
    const("hw_end", np.array([4], dtype=np.int64))
    for s in sorted(STRIDES, reverse=True):  # stride 32 first: the others upsample its red map
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        per_cell = {}
        for name in ("red", "green"):
            nodes += [
                helper.make_node("Slice", [f"pool{s}", f"{name}_start", f"{name}_end", "axis1"], [f"{name}{s}"]),
                helper.make_node("Add", [f"{name}{s}", "one"], [f"{name}{s}_p1"]),
                helper.make_node("Mul", [f"{name}{s}_p1", "half"], [f"{name}{s}_01"]),  # pixel value / 255
                helper.make_node("Transpose", [f"{name}{s}_01"], [f"{name}{s}_t"], perm=[0, 2, 3, 1]),
                helper.make_node("Concat", [f"{name}{s}_t", f"{name}{s}_t"], [f"{name}{s}_a"], axis=3),  # 2 anchors
                helper.make_node("Reshape", [f"{name}{s}_a", "flat1"], [f"{name}{s}_col"]),
            ]
            per_cell[name] = f"{name}{s}_col"
        score = f"score_{s}"
        red = per_cell["red"]
        if s == 32:
            nodes.append(helper.make_node("Identity", [per_cell["green"]], [score]))
        else:
            nodes.append(helper.make_node("Mul", [per_cell["green"], "zero"], [score]))
            # the red map of stride 32 upsampled to this stride's grid (sizes = [N, C] of it + [H, W] of this one)
            red = f"red{s}_up_col"
            nodes += [
                helper.make_node("Shape", ["red32_01"], [f"shape32_{s}"]),
                helper.make_node("Slice", [f"shape32_{s}", "nc_start", "nc_end"], [f"nc_{s}"]),
                helper.make_node("Shape", [f"red{s}_01"], [f"shape{s}"]),
                helper.make_node("Slice", [f"shape{s}", "hw_start", "hw_end"], [f"hw_{s}"]),
                helper.make_node("Concat", [f"nc_{s}", f"hw_{s}"], [f"sizes_{s}"], axis=0),
                helper.make_node("Resize", ["red32_01", "", "", f"sizes_{s}"], [f"red{s}_up"], mode="nearest",
                                 coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                helper.make_node("Transpose", [f"red{s}_up"], [f"red{s}_up_t"], perm=[0, 2, 3, 1]),
                helper.make_node("Concat", [f"red{s}_up_t", f"red{s}_up_t"], [f"red{s}_up_a"], axis=3),
                helper.make_node("Reshape", [f"red{s}_up_a", "flat1"], [red]),
            ]
        nodes += [
            helper.make_node("Mul", [red, "two"], [f"r2_{s}"]),
            helper.make_node("Add", [f"r2_{s}", "half"], [f"spread_{s}"]),
            helper.make_node("Mul", [f"spread_{s}", "ones4"], [f"bbox_{s}"]),
            helper.make_node("Mul", [f"spread_{s}", "kps_unit"], [f"kps_{s}"]),
        ]
        outputs[s] = (score, f"bbox_{s}", f"kps_{s}")
    out_vi = []
    for k, width in enumerate((1, 4, 10)):
        for s in STRIDES:
            out_vi.append(helper.make_tensor_value_info(outputs[s][k], TensorProto.FLOAT, [None, width]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, None, None])],
        out_vi,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))


def build_scrfd_shaped_onnx(path: Path, seed: int = 0, **config) -> nn.Module:
    """Export a random-weight ScrfdShaped (`config`: its widths) to `path` with a dynamic input size."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(ScrfdShaped(**config), seed).eval()
    export_scrfd_onnx(model, path)
    return model


def build_antelopev2(root: Path, layout: str = "models", mxnet_style: bool = False) -> Path:
    """Write both models under `root` in one of the folder layouts users have; returns the pack folder."""
    folder = {
        "models": root / "models" / "antelopev2",
        "flat": root / "antelopev2",
        "nested": root / "antelopev2" / "antelopev2",
        "self": root,
    }[layout]
    folder.mkdir(parents=True, exist_ok=True)
    build_scrfd_onnx(folder / "scrfd_10g_bnkps.onnx")
    build_arcface_onnx(folder / "glintr100.onnx", mxnet_style=mxnet_style)
    return folder


def face_image(
    size: tuple[int, int] = (640, 640),
    faces: tuple[tuple[int, int, float, float], ...] = ((10, 10, 1.0, 1.0),),
    cell: int = 32,
) -> torch.Tensor:
    """[1,3,H,W] black image with one-cell "faces" on a `cell`-pixel grid.

    Each face is (column, row, green, red): in a 640x640 image the synthetic
    SCRFD reports it with score ~green, centred on the cell's top-left corner
    (32*column, 32*row) with a box of half-size 32 * (0.5 + 2 * red); a
    smaller image with a smaller `cell` lands on the same grid once the
    detector letterboxes it to 640. The blue channel holds random texture so
    the recognizer sees something.
    """
    h, w = size
    img = torch.zeros(1, 3, h, w)
    g = torch.Generator().manual_seed(1)
    for col, row, green, red in faces:
        ys, xs = slice(cell * row, cell * (row + 1)), slice(cell * col, cell * (col + 1))
        img[0, 0, ys, xs] = red
        img[0, 1, ys, xs] = green
    img[0, 2] = torch.rand((h, w), generator=g)
    return img


def expected_box(col: int, row: int, red: float) -> np.ndarray:
    """Box the synthetic SCRFD reports for a face cell (in the 640-pixel detector frame)."""
    half = 32 * (0.5 + 2 * ((np.round(red * 255) + 0.5) / 256))
    return np.array([32 * col - half, 32 * row - half, 32 * col + half, 32 * row + half])
