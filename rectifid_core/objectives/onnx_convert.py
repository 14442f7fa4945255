"""A small ONNX -> torch interpreter for frozen recognition networks (ArcFace).

The identity gradient must flow through the recognizer, which insightface
ships only as ONNX. onnx2torch would do this but pulls torchvision (and with
it a different torch build), so this module covers the operator set of
insightface's iResNet exports (`arcface_torch` via torch.onnx, old and new
exporters): convolutions, batch norms, PReLU, residual arithmetic, the
flatten / reshape / fully-connected head and the shape bookkeeping older
exporters emit. Weights become buffers, so nothing here is trainable.
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
        self.input_names = [i.name for i in graph.input if i.name not in self._names]
        self.output_names = [o.name for o in graph.output]

    def _add_constant(self, name: str, value: torch.Tensor) -> None:
        key = f"c{len(self._names)}"
        self._names[name] = key
        self.register_buffer(key, value, persistent=True)

    def forward(self, *inputs: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"graph takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        env: dict[str, Any] = {name: getattr(self, key) for name, key in self._names.items()}
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
