"""A small ONNX -> torch interpreter for insightface's frozen networks (ArcFace, SCRFD).

The identity gradient must flow through the recognizer, which insightface
ships only as ONNX, and the detector should run on the same device as the
generation so no guidance iteration leaves the GPU. onnx2torch would do this
but pulls torchvision (and with it a different torch build), so this module
covers the operator set of insightface's exports: the iResNet recognizers
(`arcface_torch` via torch.onnx, old and new exporters: convolutions, batch
norms, PReLU, residual arithmetic, the flatten / reshape / fully-connected
head) and the mmdet SCRFD detectors (ResNet/FPN with nearest Resize or
Upsample, Sigmoid heads, Transpose + Reshape per stride), plus the shape
bookkeeping (Shape, Gather, Slice, Cast, Unsqueeze, Concat) their exporters
emit. Weights become buffers, so nothing here is trainable.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UnsupportedOnnxOperator(RuntimeError):
    """The graph uses an operator (or attribute value) this converter does not cover."""


def _ints(x: Any) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def _conv(attrs: dict, x, w, b=None):
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOnnxOperator(f"Conv auto_pad={attrs['auto_pad']!r} is not supported")
    nd = w.ndim - 2
    pads = attrs.get("pads", [0] * (2 * nd))
    begin, end = pads[:nd], pads[nd:]
    padding: Union[list[int], int] = list(begin)
    if begin != end:
        flat = []
        for i in reversed(range(nd)):
            flat += [begin[i], end[i]]
        x = F.pad(x, flat)
        padding = 0
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, b, attrs.get("strides", [1] * nd), padding, attrs.get("dilations", [1] * nd), attrs.get("group", 1))


def _pool(kind: str):
    def run(attrs: dict, x):
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise UnsupportedOnnxOperator(f"{kind} auto_pad={attrs['auto_pad']!r} is not supported")
        k = attrs["kernel_shape"]
        nd = len(k)
        pads = attrs.get("pads", [0] * (2 * nd))
        if pads[:nd] != pads[nd:]:
            raise UnsupportedOnnxOperator(f"{kind} with asymmetric pads {pads} is not supported")
        strides = attrs.get("strides", [1] * nd)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "MaxPool":
            return F.max_pool2d(x, k, strides, pads[:nd], attrs.get("dilations", [1] * nd), ceil)
        return F.avg_pool2d(x, k, strides, pads[:nd], ceil, bool(attrs.get("count_include_pad", 0)))

    return run


def _gemm(attrs: dict, a, b, c=None):
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _reshape(attrs: dict, x, shape):
    dims = _ints(shape)
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(attrs: dict, x):
    axis = attrs.get("axis", 1) % (x.ndim + 1) if x.ndim else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _gather(attrs: dict, data, indices):
    axis = attrs.get("axis", 0) % data.ndim
    idx = indices.long() % data.shape[axis]
    out = torch.index_select(data, axis, idx.reshape(-1).to(data.device))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _axes(attrs: dict, extra: tuple) -> list[int]:
    if extra and extra[0] is not None:
        return _ints(extra[0])
    return list(attrs.get("axes", []))


def _unsqueeze(attrs: dict, x, *axes_in):
    axes = _axes(attrs, axes_in)
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(attrs: dict, x, *axes_in):
    axes = _axes(attrs, axes_in)
    if not axes:
        return x.squeeze()
    for a in sorted((a % x.ndim for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _pad(attrs: dict, x, pads=None, value=None, *_):
    if attrs.get("mode", "constant") != "constant":
        raise UnsupportedOnnxOperator(f"Pad mode={attrs['mode']!r} is not supported")
    p = _ints(pads) if pads is not None else list(attrs["pads"])
    nd = x.ndim
    flat = []
    for i in reversed(range(nd)):
        flat += [p[i], p[i + nd]]
    fill = float(value) if value is not None else float(attrs.get("value", 0.0))
    return F.pad(x, flat, value=fill)


def _clip(attrs: dict, x, lo=None, hi=None):
    lo = attrs.get("min") if lo is None else float(lo)
    hi = attrs.get("max") if hi is None else float(hi)
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _slice(attrs: dict, x, starts=None, ends=None, axes=None, steps=None):
    starts = _ints(starts) if starts is not None else list(attrs["starts"])
    ends = _ints(ends) if ends is not None else list(attrs["ends"])
    axes = _ints(axes) if axes is not None else list(attrs.get("axes", range(len(starts))))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step < 1:
            raise UnsupportedOnnxOperator(f"Slice with step {step} is not supported")
        dim = x.shape[axis]
        # ONNX clamps out-of-range bounds (INT64_MAX means "to the end"); Python slicing does too once negatives resolve
        start, end = (v + dim if v < 0 else v for v in (start, end))
        index[axis % x.ndim] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    return x[tuple(index)]


_ONNX_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}


def _cast(attrs: dict, x):
    to = attrs["to"]
    if to not in _ONNX_DTYPES:
        raise UnsupportedOnnxOperator(f"Cast to ONNX data type {to} is not supported")
    # float64 stays float32, as the converted weights do (see _to_tensor)
    return x.to(torch.float32 if to == 11 else _ONNX_DTYPES[to])


def _interpolate(x, mode: str, transform: str, nearest_mode: str, scales=None, sizes=None):
    """ONNX Resize / Upsample semantics mapped onto F.interpolate, for the modes torch computes identically."""
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
        kwargs: dict[str, Any] = {"size": size}
    else:
        factors = [float(v) for v in scales.tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise UnsupportedOnnxOperator(f"Resize of the batch or channel axis (scales {factors}) is not supported")
        # the output size ONNX defines (floor(in * scale)); torch then uses in/out as the sampling ratio, which is
        # what ONNX does as well for the integer factors the exporters write
        kwargs = {"size": [int(np.floor(d * f)) for d, f in zip(x.shape[2:], factors[2:])]}
    if mode == "nearest":
        if transform != "asymmetric" or nearest_mode != "floor":
            raise UnsupportedOnnxOperator(
                f"Resize nearest with coordinate_transformation_mode={transform!r}, nearest_mode={nearest_mode!r} "
                "is not supported (asymmetric + floor, what torch exports, is)")
        return F.interpolate(x, mode="nearest", **kwargs)
    if mode == "linear" and x.ndim == 4:
        if transform not in ("align_corners", "half_pixel", "pytorch_half_pixel"):
            raise UnsupportedOnnxOperator(
                f"Resize linear with coordinate_transformation_mode={transform!r} is not supported")
        return F.interpolate(x, mode="bilinear", align_corners=transform == "align_corners", **kwargs)
    raise UnsupportedOnnxOperator(f"Resize mode {mode!r} on a {x.ndim}-d tensor is not supported")


def _resize(attrs: dict, x, roi=None, scales=None, sizes=None):
    if attrs.get("antialias", 0):
        raise UnsupportedOnnxOperator("Resize with antialias=1 is not supported")
    if scales is None and sizes is None:
        raise UnsupportedOnnxOperator("Resize needs scales or sizes")
    return _interpolate(x, attrs.get("mode", "nearest"), attrs.get("coordinate_transformation_mode", "half_pixel"),
                        attrs.get("nearest_mode", "round_prefer_floor"), scales, sizes)


def _upsample(attrs: dict, x, scales=None):
    """Upsample (opset 7-9): scales as attribute (opset 7) or input (9); nearest only (its linear mode uses
    asymmetric coordinates, which F.interpolate does not offer)."""
    if attrs.get("mode", "nearest") != "nearest":
        raise UnsupportedOnnxOperator(f"Upsample mode {attrs['mode']!r} is not supported (nearest is)")
    factors = scales if scales is not None else torch.tensor(attrs["scales"])
    return _interpolate(x, "nearest", "asymmetric", "floor", factors)


_OPS: dict[str, Callable[..., Any]] = {
    "Conv": _conv,
    "BatchNormalization": lambda a, x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, a.get("epsilon", 1e-5)),
    "PRelu": lambda a, x, slope: torch.where(x >= 0, x, x * slope),
    "Relu": lambda a, x: F.relu(x),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Clip": _clip,
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": lambda a, x, y: torch.matmul(x, y),
    "Reshape": _reshape,
    "Identity": lambda a, x: x,
    "Dropout": lambda a, x, *_: x,
    "Shape": lambda a, x: torch.tensor(list(x.shape)[a.get("start", 0) : a.get("end", None)], dtype=torch.int64),
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda a, *xs: torch.cat([t.to(xs[0].device) for t in xs], dim=a["axis"]),
    "Transpose": lambda a, x: x.permute(*(a.get("perm") or reversed(range(x.ndim)))),
    "GlobalAveragePool": lambda a, x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "MaxPool": _pool("MaxPool"),
    "AveragePool": _pool("AveragePool"),
    "Pad": _pad,
    "Slice": _slice,
    "Cast": _cast,
    "Floor": lambda a, x: torch.floor(x),
    "Exp": lambda a, x: torch.exp(x),
    "ConstantOfShape": lambda a, shape: torch.full(
        _ints(shape), float(a["value"].reshape(-1)[0]) if "value" in a else 0.0,
        dtype=a["value"].dtype if "value" in a else torch.float32),
    "Resize": _resize,
    "Upsample": _upsample,
}

SUPPORTED_OPERATORS = tuple(sorted(_OPS))


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif hasattr(value, "dims") and hasattr(value, "data_type"):
            value = torch.from_numpy(np.array(numpy_helper.to_array(value)))
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[attr.name] = value
    return out


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    array = np.array(array)
    if array.dtype in (np.float16, np.float64):
        array = array.astype(np.float32)
    return torch.from_numpy(array)


class OnnxGraphModule(nn.Module):
    """Runs an ONNX graph node by node with torch ops; weights are frozen buffers."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        from onnx import numpy_helper

        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in _OPS and n.op_type != "Constant"})
        if unsupported:
            names = {op: next(n.name or f"#{i}" for i, n in enumerate(graph.node) if n.op_type == op) for op in unsupported}
            raise UnsupportedOnnxOperator(
                "ONNX graph uses operators this converter does not support: "
                + ", ".join(f"{op} (node {names[op]!r})" for op in unsupported)
                + f"; supported: {', '.join(SUPPORTED_OPERATORS)}"
            )
        self._names: dict[str, str] = {}
        self._host_constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            self._add_constant(init.name, _to_tensor(numpy_helper.to_array(init)))
        self._nodes: list[tuple[str, str, list[str], list[str], dict[str, Any]]] = []
        for i, node in enumerate(graph.node):
            attrs = _attributes(node)
            if node.op_type == "Constant":
                if "value" not in attrs:
                    raise UnsupportedOnnxOperator(f"Constant node {node.name!r} without a tensor 'value' attribute")
                self._add_constant(node.output[0], attrs["value"].clone())
                continue
            self._nodes.append((node.op_type, node.name or f"#{i}", list(node.input), list(node.output), attrs))
        constants = self._names.keys() | self._host_constants.keys()
        self.input_names = [i.name for i in graph.input if i.name not in constants]
        self.output_names = [o.name for o in graph.output]

    def _add_constant(self, name: str, value: torch.Tensor) -> None:
        if not value.is_floating_point():
            # integer constants are shape bookkeeping (Reshape shapes, Slice bounds, Gather indices), read on
            # the host like Shape's outputs: kept off the module's device, reading them never waits for a GPU
            self._host_constants[name] = value
            return
        key = f"c{len(self._names)}"
        self._names[name] = key
        self.register_buffer(key, value, persistent=True)

    def forward(self, *inputs: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"graph takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        env: dict[str, Any] = {name: getattr(self, key) for name, key in self._names.items()}
        env.update(self._host_constants)
        env.update(zip(self.input_names, inputs))
        for op, name, ins, outs, attrs in self._nodes:
            args = [env[i] if i else None for i in ins]
            while args and args[-1] is None:
                args.pop()
            try:
                result = _OPS[op](attrs, *args)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                if isinstance(exc, UnsupportedOnnxOperator):
                    raise
                # name the node: a bare torch error says nothing about the graph
                raise RuntimeError(f"ONNX node {name!r} ({op}) failed: {exc}") from exc
            env[outs[0]] = result
        outputs = tuple(env[o] for o in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def onnx_to_torch(source: Union[str, os.PathLike, Any]) -> OnnxGraphModule:
    """Load an ONNX file (or ModelProto) as a frozen, eval-mode torch module.

    A file is checked first (empty, truncated, external data outside its folder)
    so that a damaged download is named instead of failing inside protobuf.
    """
    if isinstance(source, (str, os.PathLike)):
        from onnx.external_data_helper import load_external_data_for_model

        from ..model_files import check_onnx_file

        if not os.path.isfile(source):
            raise FileNotFoundError(f"ONNX model not found: {source}")
        path = source
        source = check_onnx_file(path)
        load_external_data_for_model(source, os.path.dirname(os.path.abspath(path)))
    return OnnxGraphModule(source).eval()
