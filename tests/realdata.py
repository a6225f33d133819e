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
