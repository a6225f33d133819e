"""Seeded synthetic inputs for the three PP-OCR models shipped in rapidocr-onnxruntime.

Text is rendered with Pillow (the built-in scalable font by default, so nothing outside PyPI is
needed) and pre-processed the way RapidOCR does it, re-implemented with numpy + Pillow:

* rec: grey text line -> height 48 keeping the aspect ratio, (x/255 - 0.5) / 0.5, CHW, padded on
  the right with zeros up to `min_width` (RapidOCR pads to at least 320 columns).
* cls: same normalisation, 48x192, squeezed if wider, padded on the right; label 1 = rotated 180.
* det: a page crop with a few lines of text, side a multiple of 32, mean/std 0.5.

Every function is deterministic for a given seed. The rec model's alphabet comes from its ONNX
metadata (`character`); CTC index 0 is the blank and the last index is a space.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

REC_HEIGHT = 48
CLS_SHAPE = (48, 192)

_WORDS = """
the of and to in is for on with as by at from that this be are was it or an not have
data model table report total price order invoice number date page section chapter figure
value result sample test train input output layer weight scale batch image text line word
account balance payment amount due paid customer address phone email street city state
north south east west river station market school hospital library museum airport hotel
red green blue black white orange yellow purple small large quick brown lazy bright dark
open close start stop enter exit push pull left right up down first last next previous
monday tuesday friday january march april june july october december spring summer winter
coffee bread water apple lemon sugar salt pepper cheese butter milk honey rice pasta soup
read write print scan copy paste save load send receive check verify update delete create
Hello World Welcome Thank You Please Note Warning Error Total Subtotal Tax Discount Name
London Paris Berlin Tokyo Boston Sydney Toronto Madrid Vienna Dublin Oslo Rome Cairo
""".split()


# ----------------------------------------------------------------------------- text and fonts

def _font(size: int, font_path: str | None = None) -> ImageFont.FreeTypeFont:
    if font_path:
        return ImageFont.truetype(font_path, size)
    return ImageFont.load_default(size=size)


def _token(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.62:
        w = str(rng.choice(_WORDS))
        c = rng.random()
        return w.capitalize() if c < 0.25 else w.upper() if c < 0.32 else w
    if r < 0.80:
        k = rng.integers(0, 4)
        if k == 0:
            return str(rng.integers(0, 10000))
        if k == 1:
            return f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
        if k == 2:
            return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}"
        return f"{rng.integers(0, 100)}%"
    if r < 0.90:  # word glued to punctuation
        return str(rng.choice(_WORDS)) + str(rng.choice([",", ".", ":", ";", "!", "?"]))
    if r < 0.95:
        return f"({rng.choice(_WORDS)})"
    k = rng.integers(0, 4)  # punctuation inside a token: a lone ',' is ambiguous even to a reader
    return (f"${rng.integers(1, 500)}.{rng.integers(0, 100):02d}", f"#{rng.integers(1, 999)}",
            f"+{rng.integers(1, 99)}", f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}")[k]


def random_text(rng: np.random.Generator, min_tokens: int = 1, max_tokens: int = 5) -> str:
    """A short line mixing English words, numbers and punctuation (single spaces)."""
    n = int(rng.integers(min_tokens, max_tokens + 1))
    return " ".join(_token(rng) for _ in range(n))


# ----------------------------------------------------------------------------- rendering

def _degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Small blur and pixel noise, as in a clean scan or screenshot."""
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 0.8))))
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0.0, rng.uniform(0.0, 6.0), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def render_line(text: str, rng: np.random.Generator, font_path: str | None = None) -> Image.Image:
    """A tight grey crop of one text line: dark text on a light background, with padding."""
    size = int(rng.integers(26, 41))
    font = _font(size, font_path)
    fg, bg = int(rng.integers(0, 80)), int(rng.integers(185, 256))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
    # vertical extent from a full-height reference so short glyphs ('ace') keep their baseline
    _, ry0, _, ry1 = probe.textbbox((0, 0), "Ag|", font=font)
    y0, y1 = min(y0, ry0), max(y1, ry1)
    px = int(rng.integers(2, max(3, size // 2)))
    py_top, py_bot = (int(rng.integers(max(1, size // 10), max(2, size // 3))) for _ in range(2))
    w, h = x1 - x0 + 2 * px, y1 - y0 + py_top + py_bot
    img = Image.new("L", (w, h), bg)
    ImageDraw.Draw(img).text((px - x0, py_top - y0), text, font=font, fill=fg)
    return _degrade(img, rng)


def _normalize(img: Image.Image) -> np.ndarray:
    """Grey PIL image -> float32 [3,H,W] in [-1, 1]."""
    a = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    a = (a - 0.5) / 0.5
    return np.repeat(a[None], 3, axis=0)


def rec_array(img: Image.Image, min_width: int = 320, max_width: int | None = None) -> np.ndarray:
    """RapidOCR rec pre-processing: height 48, natural width (squeezed above max_width), pad right."""
    w, h = img.size
    nat = max(1, math.ceil(REC_HEIGHT * w / h))
    rw = nat if max_width is None else min(nat, max_width)
    chw = _normalize(img.resize((rw, REC_HEIGHT), Image.BILINEAR))
    out = np.zeros((1, 3, REC_HEIGHT, max(rw, min_width)), np.float32)
    out[0, :, :, :rw] = chw
    return out


def cls_array(img: Image.Image) -> np.ndarray:
    """RapidOCR cls pre-processing: 48x192, squeezed if wider, pad right with zeros."""
    h, W = CLS_SHAPE
    w0, h0 = img.size
    rw = min(W, math.ceil(h * w0 / h0))
    out = np.zeros((1, 3, h, W), np.float32)
    out[0, :, :, :rw] = _normalize(img.resize((rw, h), Image.BILINEAR))
    return out


# ----------------------------------------------------------------------------- sample sets

def rec_samples(n: int, seed: int, min_width: int = 320, max_width: int | None = None,
                font_path: str | None = None) -> list[tuple[dict[str, np.ndarray], str]]:
    """n (feed, text) pairs for the recogniser; widths vary (>= min_width) unless max_width caps them.

    With min_width == max_width every feed has the same shape (lines that would need squeezing
    are re-drawn shorter, so the text stays legible).
    """
    rng = np.random.default_rng([seed, 101])
    out = []
    while len(out) < n:
        text = random_text(rng)
        img = render_line(text, rng, font_path)
        if max_width is not None and REC_HEIGHT * img.width / img.height > max_width:
            continue
        out.append(({"x": rec_array(img, min_width, max_width)}, text))
    return out


def cls_samples(n: int, seed: int, font_path: str | None = None) -> list[tuple[dict[str, np.ndarray], int]]:
    """n (feed, label) pairs for the orientation classifier: 0 upright, 1 rotated 180 degrees."""
    rng = np.random.default_rng([seed, 202])
    out = []
    for _ in range(n):
        img = render_line(random_text(rng, 1, 4), rng, font_path)
        label = int(rng.random() < 0.5)
        if label:
            img = img.rotate(180)
        out.append(({"x": cls_array(img)}, label))
    return out


def det_page(rng: np.random.Generator, side: int = 480, font_path: str | None = None) -> Image.Image:
    """A light page crop with 3-8 lines of dark text at random positions and sizes."""
    bg = int(rng.integers(190, 256))
    img = Image.new("L", (side, side), bg)
    d = ImageDraw.Draw(img)
    y = int(rng.integers(4, 30))
    for _ in range(int(rng.integers(3, 9))):
        size = int(rng.integers(16, 37))
        font = _font(size, font_path)
        text = random_text(rng, 1, 6)
        x = int(rng.integers(4, side // 3))
        if y + size * 1.3 > side:
            break
        d.text((x, y), text, font=font, fill=int(rng.integers(0, 90)))
        y += int(size * rng.uniform(1.3, 2.2))
    return _degrade(img, rng)


def det_samples(n: int, seed: int, side: int = 480, font_path: str | None = None) -> list[dict[str, np.ndarray]]:
    """n detector feeds {'x': [1,3,side,side]}; side must be a multiple of 32."""
    if side % 32:
        raise ValueError("det side must be a multiple of 32")
    rng = np.random.default_rng([seed, 303])
    return [{"x": _normalize(det_page(rng, side, font_path))[None]} for _ in range(n)]


def write_npz_folder(feeds: list[dict[str, np.ndarray]], folder: str | Path) -> Path:
    """One .npz a sample (keys = input names, arrays with the batch dim): the onnxq --calib format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **feed)
    return folder


# ----------------------------------------------------------------------------- decoding

def load_charset(model_path: str | Path) -> list[str]:
    """CTC alphabet of the rec model: [blank] + metadata 'character' lines + [' ']."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    if "character" not in meta:
        raise KeyError(f"{model_path} has no 'character' metadata")
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def ctc_decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, merge repeats, drop blanks (index 0). probs: [N,T,C]."""
    idx = np.asarray(probs).argmax(-1)
    texts = []
    for row in idx:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(charset[i] for i in row[keep]))
    return texts
