"""Seeded captcha images for the CRNN + BiLSTM captcha reader of `captcha-whisperer==0.1.0`
(models/captcha_crnn.onnx: image [N,3,60,160], BGR, 0..255 -> logits [20,N,37], greedy CTC over
0-9, A-Z and a blank at index 36).

Two data sets drawn differently, so that a choice fitted on one shows on the other:

* 'a': the `captcha` package's ImageCaptcha (its bundled fonts, warped and rotated glyphs, a
  noise curve and dots), 4-6 characters; its randomness is seeded here (the package draws from
  `secrets`, which cannot be seeded).
* 'b': Pillow text in the system's DejaVu fonts on a tinted background, random per-glyph colour
  and height, crossing lines and a smoothing filter, 4-6 characters.

FP32 reads about 0.6 (a) and 0.8 (b) of 4-character strings right; the benchmarks score agreement
with FP32's strings, not with the labels.
"""

from __future__ import annotations

import contextlib
import glob
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BLANK = 36
HEIGHT, WIDTH = 60, 160


class _Seeded:
    """The three `secrets` functions captcha.image calls, drawn from a seeded generator."""

    def __init__(self, seed: int):
        self._r = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._r.randrange(n)

    def choice(self, seq):
        return self._r.choice(seq)

    def randbits(self, k: int) -> int:
        return self._r.getrandbits(k)


@contextlib.contextmanager
def _seeded_captcha(seed: int):
    import captcha.image as ci
    saved = ci.secrets
    ci.secrets = _Seeded(seed)
    try:
        yield ci
    finally:
        ci.secrets = saved


def _text(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(LABELS), int(rng.integers(4, 7))))


def _set_a(texts: list[str], seed: int) -> list[Image.Image]:
    with _seeded_captcha(seed) as ci:
        gen = ci.ImageCaptcha(width=WIDTH, height=HEIGHT, font_sizes=(36, 42, 46))
        return [gen.generate_image(t) for t in texts]


def _set_b_image(text: str, rng: np.random.Generator, fonts: list[str]) -> Image.Image:
    def colour(lo, hi):
        return tuple(int(v) for v in rng.integers(lo, hi, 3))

    img = Image.new("RGB", (WIDTH, HEIGHT), colour(190, 256))
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(28, 38)))
    step = (WIDTH - 16) / len(text)
    for i, ch in enumerate(text):
        x = 6 + i * step + float(rng.uniform(-2, 3))
        draw.text((x, int(rng.integers(2, 18))), ch, font=font, fill=colour(0, 130))
    for _ in range(int(rng.integers(2, 5))):
        pts = [(int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))) for _ in range(2)]
        draw.line(pts, fill=colour(0, 160), width=int(rng.integers(1, 3)))
    return img.filter(ImageFilter.SMOOTH)


def _bgr_chw(img: Image.Image) -> np.ndarray:
    rgb = np.asarray(img.convert("RGB").resize((WIDTH, HEIGHT), Image.BILINEAR), np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))[None]


def samples(n: int, seed: int, dataset: str, input_name: str = "image") -> list[tuple[dict, str]]:
    """n (feed, text) pairs of data set 'a' or 'b'."""
    rng = np.random.default_rng(seed)
    texts = [_text(rng) for _ in range(n)]
    if dataset == "a":
        images = _set_a(texts, seed)
    else:
        fonts = sorted(f for f in glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf")
                       if "ExtraLight" not in f and "Math" not in f)
        if not fonts:
            raise FileNotFoundError("no DejaVu fonts in /usr/share/fonts/truetype/dejavu (apt install fonts-dejavu-core)")
        draw = np.random.default_rng([seed, 1])
        images = [_set_b_image(t, draw, fonts) for t in texts]
    return [({input_name: _bgr_chw(im)}, t) for im, t in zip(images, texts)]


def decode(logits: np.ndarray) -> list[str]:
    """Greedy CTC over [T, N, 37] logits: one string per batch item."""
    best = np.asarray(logits).argmax(-1)          # [T, N]
    out = []
    for seq in best.T:
        chars, prev = [], -1
        for k in seq:
            if k != prev and k != BLANK:
                chars.append(LABELS[k])
            prev = k
        out.append("".join(chars))
    return out
