"""Face detector backends timed against each other: SCRFD in onnxruntime vs converted to torch.

The real scrfd_10g_bnkps.onnx cannot be downloaded here, so `ScrfdShaped` rebuilds SCRFD's
layers with random weights (speed does not depend on weight values): ResNet-v1e stem and
basic blocks with average-pool shortcuts, PAFPN with nearest upsampling, per-stride
conv-BN-ReLU heads with Sigmoid scores, scaled box distances and keypoints, flattened by
Transpose + a Reshape computed from the tensor's shape, exported by torch.onnx as mmdet's
exporter writes it. `scrfd_10g_config()` gives SCRFD-10G's widths and depths.

    python -m rectifid_core.benchmark.detector --preset 10g --size 640 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16, 32)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _BasicBlock(nn.Module):
    """ResNet basic block; a strided or widening shortcut is AvgPool + 1x1 conv + BN (ResNet-v1d/e "avg_down")."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False), nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def scrfd_10g_config() -> dict[str, Any]:
    """SCRFD-10G's widths and depths (insightface's scrfd_10g_bnkps config: ResNet stages 3/4/2/3 of
    56/88/88/224 channels, PAFPN of 56, three 80-channel conv-BN-ReLU layers per head)."""
    return {"stem": (28, 28, 56), "widths": (56, 88, 88, 224), "blocks": (3, 4, 2, 3), "neck": 56, "feat": 80,
            "stacked": 3}


class ScrfdShaped(nn.Module):
    """SCRFD's layers: [1,3,H,W] -> 9 outputs (scores [cells*2, 1], box distances [cells*2, 4],
    keypoint distances [cells*2, 10] for strides 8, 16, 32). Tiny by default."""

    def __init__(self, stem: Sequence[int] = (4, 4, 8), widths: Sequence[int] = (8, 8, 16, 16),
                 blocks: Sequence[int] = (1, 1, 1, 1), neck: int = 8, feat: int = 8, stacked: int = 1,
                 anchors: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(3, stem[0], 2), _conv_bn_relu(stem[0], stem[1]),
                                  _conv_bn_relu(stem[1], stem[2]), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], stem[2]
        for i, (width, depth) in enumerate(zip(widths, blocks)):
            stages.append(nn.Sequential(*(_BasicBlock(cin if j == 0 else width, width, 2 if i and j == 0 else 1)
                                          for j in range(depth))))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(w, neck, 1) for w in widths[1:])
        self.fpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, 1, 1) for _ in STRIDES)
        self.down = nn.ModuleList(nn.Conv2d(neck, neck, 3, 2, 1) for _ in STRIDES[1:])
        self.pafpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, 1, 1) for _ in STRIDES[1:])
        self.heads = nn.ModuleList(
            nn.Sequential(*(_conv_bn_relu(neck if j == 0 else feat, feat) for j in range(stacked))) for _ in STRIDES)
        self.cls = nn.ModuleList(nn.Conv2d(feat, anchors, 3, 1, 1) for _ in STRIDES)
        self.reg = nn.ModuleList(nn.Conv2d(feat, 4 * anchors, 3, 1, 1) for _ in STRIDES)
        self.kps = nn.ModuleList(nn.Conv2d(feat, 10 * anchors, 3, 1, 1) for _ in STRIDES)
        self.scales = nn.Parameter(torch.tensor([1.0, 0.9, 1.1]))
        for conv in self.cls:  # mmdet's prior probability 0.01: few anchors pass a 0.5 threshold, as on a real photo
            nn.init.constant_(conv.bias, -4.595)
        for conv in self.reg:  # boxes of about four strides that overlap their neighbours, so NMS has work
            nn.init.constant_(conv.bias, 2.0)

    @staticmethod
    def _flat(t: torch.Tensor, k: int) -> torch.Tensor:
        # mmdet's reshape(batch, -1, k) (shape from the tensor: Shape/Gather/Unsqueeze/Concat), batch 1 dropped
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, k)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i:
                feats.append(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        inter = [conv(t) for conv, t in zip(self.fpn, lat)]
        for i in range(len(inter) - 1):
            inter[i + 1] = inter[i + 1] + self.down[i](inter[i])
        outs = [inter[0]] + [conv(t) for conv, t in zip(self.pafpn, inter[1:])]
        scores, boxes, kps = [], [], []
        for i, t in enumerate(outs):
            h = self.heads[i](t)
            scores.append(self._flat(self.cls[i](h).sigmoid(), 1))
            boxes.append(self._flat(self.reg[i](h) * self.scales[i], 4))
            kps.append(self._flat(self.kps[i](h), 10))
        return (*scores, *boxes, *kps)


def export_scrfd_onnx(model: nn.Module, path: Path) -> None:
    """torch.onnx export (opset 11, dynamic input size) that keeps the batch-norm nodes and the shape arithmetic."""
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    torch.onnx.export(model.eval(), (torch.randn(1, 3, 64, 64),), str(path), input_names=["input.1"],
                      output_names=names,
                      dynamic_axes={"input.1": {2: "height", 3: "width"}, **{n: {0: "anchors"} for n in names}},
                      opset_version=11, dynamo=False, do_constant_folding=False)


def _median_seconds(fn: Any, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocations, onnxruntime's first run
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_backends(preset: str, image_hw: tuple[int, int], input_size: int, repeats: int, threads: int,
                  device: str = "cpu", provider: str = "cpu") -> dict[str, Any]:
    """Median seconds of one `ScrfdDetector.detect` (letterbox, network, decode, NMS) per backend."""
    import onnx
    import onnxruntime

    from ..objectives.face_models import resolve_providers
    from ..objectives.scrfd import ScrfdDetector

    torch.manual_seed(0)
    model = ScrfdShaped(**(scrfd_10g_config() if preset == "10g" else {}))
    if threads:
        torch.set_num_threads(threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scrfd.onnx"
        export_scrfd_onnx(model, path)
        proto = onnx.load(str(path))
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=resolve_providers(provider))
        detectors = {"onnxruntime": ScrfdDetector.from_session(session, proto, input_size),
                     "torch": ScrfdDetector.from_torch(proto, dev, input_size)}
        image = torch.rand(3, *image_hw, generator=torch.Generator().manual_seed(0)).to(dev)
        seconds = {name: _median_seconds(lambda d=d: d.detect(image, 0.5), repeats, dev)
                   for name, d in detectors.items()}
    return {"preset": preset, "parameters": sum(p.numel() for p in model.parameters()), "image_hw": list(image_hw),
            "input_size": input_size, "device": device, "providers": session.get_providers(), "threads": threads,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "repeats": repeats,
            "seconds": seconds, "faster": min(seconds, key=seconds.get)}


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m rectifid_core.benchmark.detector", description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["tiny", "10g"], choices=["tiny", "10g"])
    p.add_argument("--image", nargs="+", type=int, default=[512, 640], help="square image sides to detect in")
    p.add_argument("--size", type=int, default=640, help="detector input size (letterbox)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both backends (0: library defaults)")
    p.add_argument("--device", default="cpu", help="device of the torch backend and the image")
    p.add_argument("--provider", default="cpu", help="onnxruntime provider (cpu, cuda, ...)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    rows = [time_backends(preset, (side, side), args.size, args.repeats, args.threads, args.device, args.provider)
            for preset in args.preset for side in args.image]
    print("| preset | params | image | device | onnxruntime s | torch s | faster |\n|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        print(f"| {r['preset']} | {r['parameters'] / 1e6:.2f} M | {r['image_hw'][0]} px | {r['device']} "
              f"({', '.join(r['providers'])}) | {s['onnxruntime']:.4f} | {s['torch']:.4f} | {r['faster']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
