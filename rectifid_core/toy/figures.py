"""PNG figures drawn with PIL only (matplotlib is not a dependency)."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

CELL = 64
PAD = 6
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
          (127, 127, 127), (23, 190, 207)]


def to_pil(image: torch.Tensor, size: int = CELL) -> Image.Image:
    """[3,H,W] in 0..1 -> nearest-upscaled RGB tile."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB").resize((size, size), Image.NEAREST)


def image_grid(columns: dict[str, torch.Tensor], row_labels: list[str] | None = None) -> Image.Image:
    """One column per entry ([B,3,H,W] each, same B), titled; one row per reference."""
    font = ImageFont.load_default()
    names = list(columns)
    rows = next(iter(columns.values())).shape[0]
    label_w = 60 if row_labels else 0
    head = 30
    width = label_w + len(names) * (CELL + PAD) + PAD
    height = head + rows * (CELL + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        if columns[name].shape[0] != rows:
            raise ValueError(f"column {name!r} has {columns[name].shape[0]} images, expected {rows}")
        x = label_w + PAD + j * (CELL + PAD)
        for line_no, line in enumerate(name.replace(" (", "\n(").splitlines()[:2]):
            draw.text((x, 3 + 12 * line_no), line[:11], fill="black", font=font)
        for i in range(rows):
            canvas.paste(to_pil(columns[name][i]), (x, head + i * (CELL + PAD)))
    for i, label in enumerate(row_labels or []):
        draw.text((4, head + i * (CELL + PAD) + CELL // 2 - 5), label, fill="black", font=font)
    return canvas


def line_plot(curves: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (560, 360)) -> Image.Image:
    """Minimal line chart with axes, ticks and a legend."""
    font = ImageFont.load_default()
    w, h = size
    left, right, top, bottom = 56, 170, 28, 40
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    values = [v for ys in curves.values() for v in ys]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    n = max(len(ys) for ys in curves.values())
    pw, ph = w - left - right, h - top - bottom

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + pw * i / max(n - 1, 1), top + ph * (1 - (v - lo) / (hi - lo))

    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for q in range(5):
        v = lo + (hi - lo) * q / 4
        y = xy(0, v)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 5), f"{v:.3f}", fill="black", font=font)
    for q in range(6):
        i = round((n - 1) * q / 5)
        x = xy(i, lo)[0]
        draw.line([x, top + ph, x, top + ph + 4], fill="black")
        draw.text((x - 6, top + ph + 6), str(i), fill="black", font=font)
    draw.text((left + pw // 2 - 30, h - 14), xlabel, fill="black", font=font)
    draw.text((left, 8), f"{title}   ({ylabel})", fill="black", font=font)
    for c, (name, ys) in enumerate(curves.items()):
        color = COLORS[c % len(COLORS)]
        draw.line([xy(i, v) for i, v in enumerate(ys)], fill=color, width=2)
        ly = top + 14 * c
        draw.line([left + pw + 10, ly + 6, left + pw + 28, ly + 6], fill=color, width=2)
        draw.text((left + pw + 32, ly), name[:22], fill="black", font=font)
    return canvas
