"""Paths of the real pretrained models the tests use, and realistic inputs for them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"test dependency {package} is missing: "
                           "pip install --no-deps -r requirements-models.txt")
    return Path(spec.origin).parent.joinpath(*parts)


def silero_path(name: str = "silero_vad.onnx") -> Path:
    return package_file("silero_vad", "data", name)


def ocr_path(kind: str) -> Path:
    names = {"rec": "ch_PP-OCRv4_rec_infer.onnx", "det": "ch_PP-OCRv4_det_infer.onnx",
             "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
    return package_file("rapidocr_onnxruntime", "models", names[kind])


def speech_like(seconds: float, seed: int, sr: int = 16000) -> np.ndarray:
    """Voiced segments (a gliding pitch with harmonics, syllable-rate envelope) between pauses
    of low noise: the structure a voice-activity detector responds to."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    out = 0.003 * rng.standard_normal(n)
    pos = int(0.3 * sr)
    while pos < n:
        dur = int(rng.uniform(0.4, 1.2) * sr)
        seg = slice(pos, min(pos + dur, n))
        tt = t[seg] - t[pos]
        f0 = rng.uniform(100, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * tt))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voice = sum(np.sin(k * phase) / k for k in range(1, 12))
        env = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * tt), 0, None) ** 0.5
        out[seg] += 0.2 * env * voice
        pos += dur + int(rng.uniform(0.3, 0.9) * sr)
    return out.astype(np.float32)


def silero_stream(model, audio: np.ndarray, sr: int = 16000, chunk: int = 512):
    """Run a streaming VAD over `audio`; returns (probabilities, feeds seen)."""
    sess = ort.InferenceSession(model if isinstance(model, (str, bytes)) else str(model))
    state = np.zeros((2, 1, 128), np.float32)
    probs, feeds = [], []
    context = 64 if sr == 16000 else 32          # the model reads the chunk plus this much before it
    padded = np.concatenate([np.zeros(context, np.float32), audio])
    for i in range(0, len(audio) - chunk + 1, chunk):
        feed = {"input": padded[None, i:i + context + chunk], "state": state, "sr": np.array(sr, np.int64)}
        feeds.append(feed)
        p, state = sess.run(None, feed)
        probs.append(float(p.reshape(-1)[0]))
    return np.array(probs), feeds


def orinet_path() -> Path:
    return package_file("occular_deskew", "weights", "orientation_orinet_fp32.onnx")


def rotated_pages(n: int, seed: int, size: int = 320) -> tuple[list[dict], np.ndarray]:
    """n text pages (lines of the machine's licence texts, or seeded words where those are
    missing) turned k quarter turns clockwise, letterboxed on white to size x size, ImageNet
    normalised -> (feeds {'x': [1,3,size,size]}, k per page)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    texts = sorted(Path("/usr/share/common-licenses").glob("*"))
    lines = [l for p in texts if p.is_file() for l in p.read_text(errors="replace").splitlines() if l.strip()]
    if len(lines) < 50:
        words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 9)))) for _ in range(300)]
        lines = [" ".join(rng.choice(words, 9)) for _ in range(300)]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    feeds, ks = [], []
    for j in range(n):
        w = int(rng.integers(560, 900))
        h = int(w * rng.uniform(1.25, 1.45))
        font = ImageFont.load_default(size=max(10, w // 55))
        page = Image.new("RGB", (w, h), (250, 250, 248))
        d = ImageDraw.Draw(page)
        i = int(rng.integers(0, len(lines) - 60))
        for y in range(h // 20, h - h // 20, int(font.size * 1.4)):
            d.text((w // 12, y), lines[i], font=font, fill=(20, 20, 20))
            i += 1
        k = j % 4
        page = page.rotate(-90 * k, expand=True)
        s = size / max(page.size)
        small = page.resize((max(1, round(page.width * s)), max(1, round(page.height * s))), Image.BILINEAR)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
        a = (np.asarray(canvas, np.float32) / 255.0 - mean) / std
        feeds.append({"x": a.transpose(2, 0, 1)[None].astype(np.float32)})
        ks.append(k)
    return feeds, np.array(ks)
