"""PNG figures drawn with PIL only (matplotlib is not a dependency)."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

CELL = 64
PAD = 6


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
