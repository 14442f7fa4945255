"""Loss and similarity per iteration drawn with PIL, so the sampler can return its history as an image.

No matplotlib: ComfyUI installs rarely have it and two line charts do not need it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (127, 127, 127), (23, 190, 207)]
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 58, 12, 22, 26


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _nice_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        pad = max(abs(hi) * 0.05, 1e-3)
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: dict[str, Sequence[float | None]], font: ImageFont.ImageFont, x_start: int = 1,
           legend_width: int = 0) -> None:
    """One chart in `box` (x0, y0, x1, y1): axes, 3 y ticks, x ticks labelled from `x_start`, a line per series.

    The legend sits inside the plot's top right, or in a column of `legend_width` pixels beside it.
    """
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = x0 + _MARGIN_LEFT, y0 + _MARGIN_TOP, x1 - _MARGIN_RIGHT - legend_width, y1 - _MARGIN_BOTTOM
    draw.text((px0, y0 + 4), title, fill=(0, 0, 0), font=font)
    draw.rectangle((px0, py0, px1, py1), outline=(90, 90, 90))
    values = [v for vals in series.values() for v in vals if _ok(v)]
    if not values:
        draw.text((px0 + 8, (py0 + py1) // 2), "no data", fill=(120, 120, 120), font=font)
        return
    lo, hi = _nice_range(values)
    n = max(len(v) for v in series.values())

    def xy(i: int, v: float) -> tuple[float, float]:
        x = px0 + (px1 - px0) * (i / (n - 1) if n > 1 else 0.5)
        return x, py1 - (py1 - py0) * (v - lo) / (hi - lo)

    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        _, y = xy(0, v)
        draw.line((px0 - 4, y, px0, y), fill=(90, 90, 90))
        draw.text((x0 + 2, y - 6), _fmt(v), fill=(60, 60, 60), font=font)
    for i in sorted({0, n - 1, (n - 1) // 2}):
        x, _ = xy(i, lo)
        draw.line((x, py1, x, py1 + 4), fill=(90, 90, 90))
        draw.text((x - 6, py1 + 6), str(i + x_start), fill=(60, 60, 60), font=font)
    for idx, (name, vals) in enumerate(series.items()):
        color = PALETTE[idx % len(PALETTE)]
        # runs of consecutive values; a gap (subject not found, non-finite loss) breaks the line
        runs: list[list[tuple[float, float]]] = [[]]
        for i, v in enumerate(vals):
            if _ok(v):
                runs[-1].append(xy(i, v))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) == 1:
                x, y = run[0]
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
            elif run:
                draw.line(run, fill=color, width=2)
        if len(series) > 1 or name:
            legend_x = px1 + 8 if legend_width else px1 - 110
            draw.text((legend_x, py0 + 4 + 12 * idx), name[:18 + legend_width // 8], fill=color, font=font)


def line_chart(series: dict[str, Sequence[float | None]], title: str, size: tuple[int, int] = (560, 360),
               x_start: int = 1) -> Image.Image:
    """One chart with a line per series against its index (ticks labelled from `x_start`); None leaves a gap."""
    return chart_grid([(title, series)], 1, size, x_start)


def chart_grid(panels: Sequence[tuple[str, dict[str, Sequence[float | None]]]], columns: int = 2,
               panel_size: tuple[int, int] = (560, 360), x_start: int = 1) -> Image.Image:
    """Several line charts (title, series) in one image, `columns` per row, each with its legend beside it."""
    if not panels or columns < 1:
        raise ValueError(f"need at least one panel and one column, got {len(panels)} panels, {columns} columns")
    rows = math.ceil(len(panels) / columns)
    w, h = panel_size
    image = Image.new("RGB", (w * min(columns, len(panels)), h * rows), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for i, (title, series) in enumerate(panels):
        x, y = (i % columns) * w, (i // columns) * h
        _panel(draw, (x, y, x + w, y + h), title, series, font, x_start, legend_width=160)
    return image


def plot_history(losses: Sequence[float], similarities: dict[str, Sequence[float | None]] | None = None,
                 width: int = 512, height: int = 384) -> torch.Tensor:
    """Loss (top) and per-subject similarity (bottom) against iteration, as [1,3,H,W] in 0..1.

    None in a similarity series (the subject was not found that iteration) leaves a gap.
    """
    if width < 160 or height < 120:
        raise ValueError(f"plot size {width}x{height} is too small; use at least 160x120")
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    panels = [("loss per iteration (lower is better)", {"loss": list(losses)})]
    if similarities:
        panels.append(("similarity to reference per iteration", {k: list(v) for k, v in similarities.items()}))
    h = height // len(panels)
    for i, (title, series) in enumerate(panels):
        _panel(draw, (0, i * h, width, (i + 1) * h), title, series, font)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def draw_boxes(image: torch.Tensor, boxes: Sequence[Sequence[float]], chosen: int | None,
               labels: Sequence[str] | None = None) -> torch.Tensor:
    """[3,H,W] 0..1 with every box outlined: the chosen one thick red, the others thin grey; each
    labelled with `labels[i]` or its number counted from 1."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(array)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    width = max(2, round(min(pil.size) / 128))
    order = [i for i in range(len(boxes)) if i != chosen] + ([chosen] if chosen is not None else [])
    for i in order:
        color, thick = ((230, 30, 30), width) if i == chosen else ((170, 170, 170), max(1, width // 2))
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle((x1, y1, x2, y2), outline=color, width=thick)
        text = labels[i] if labels is not None and i < len(labels) else str(i + 1)
        draw.text((x1 + thick + 1, y1 + thick), text, fill=color, font=font)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
