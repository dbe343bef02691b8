"""Line charts as PNG with Pillow (already installed with torchvision): the bench's growth plots.

Small on purpose: one panel per series, log-2 x axis, linear y from 0, a legend, tick labels.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def line_panels(panels: list[dict], path: Path, *, width: int = 420, height: int = 300) -> None:
    """``panels``: [{"title", "xlabel", "ylabel", "x": [...], "lines": {name: [y...]}}]."""
    img = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(img)
    for i, panel in enumerate(panels):
        _panel(draw, panel, i * width, width, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _panel(draw: ImageDraw.ImageDraw, panel: dict, x0: int, width: int, height: int) -> None:
    left, right, top, bottom = x0 + 60, x0 + width - 15, 30, height - 45
    xs = panel["x"]
    ys = [y for line in panel["lines"].values() for y in line if y is not None]
    if not xs or not ys:
        return
    y_max = max(ys) * 1.1 or 1.0
    lx = [math.log2(x) for x in xs]
    lo, hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (math.log2(x) - lo) / (hi - lo) * (right - left),
                bottom - y / y_max * (bottom - top))

    draw.text((left, 8), panel["title"], fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for x in xs:
        px, _ = to_px(x, 0)
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px - 10, bottom + 6), f"{x:g}", fill="black")
    for k in range(5):
        y = y_max * k / 4
        _, py = to_px(xs[0], y)
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((x0 + 5, py - 6), f"{y:.3g}", fill="black")
    draw.text((left + (right - left) // 2 - 30, height - 18), panel["xlabel"], fill="black")
    draw.text((x0 + 5, top - 22 + 8), panel["ylabel"], fill="gray")
    for j, (name, line) in enumerate(panel["lines"].items()):
        colour = COLOURS[j % len(COLOURS)]
        points = [to_px(x, y) for x, y in zip(xs, line) if y is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((right - 110, top + 4 + 14 * j), name, fill=colour)
