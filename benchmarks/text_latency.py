"""Latency of a sentence encoder's conversions against FP32, A/B in one run: each configuration is
converted on set a's calibration sentences (seed 1), then every file (FP32 first) is timed at one
thread, batch 1, on set a's shortest held-out sentence and on its median one, round-robin over the
files in several rounds so that drift on a shared machine hits all rows alike. Each file runs in
the session its report records (as `onnxq eval` runs it). Ratios are to FP32 in the same run.

    python benchmarks/text_latency.py --model M --configs 'w8=bits:8' 'w8n=bits:8,rotate:false'
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as g  # noqa: E402
from checkout import require_checkout  # noqa: E402

import onnxq  # noqa: E402


def make_session(path: Path, options: dict[str, str]) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for k, v in options.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_all(sessions: dict, feed: dict, rounds: int, runs: int) -> dict[str, float]:
    """Median ms of one run of each session, timed round-robin."""
    t: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            s.run(None, feed)
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            t[k].append((time.perf_counter() - t0) / runs * 1e3)
    return {k: float(np.median(v)) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="M", choices=[k for k, v in g.MODELS.items() if v["kind"] == "text"])
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    require_checkout()
    names = [g.parse_config(c) for c in a.configs]
    spec = g.MODELS[a.model]
    path = g.model_path(spec)
    cache = Path("/tmp/onnxq-bench-cache")
    cal = g.feeds(a.model, spec, path, "a", 1, spec["counts"][0], "calib", cache)
    ev = g.feeds(a.model, spec, path, "a", g.EVAL_SEED["a"], spec["counts"][1], "eval", cache)
    order = np.argsort([next(iter(f.values())).shape[-1] for f in ev])
    feeds = {"shortest": ev[order[0]], "median": ev[order[len(order) // 2]]}
    with tempfile.TemporaryDirectory(prefix="lat.") as tmp:
        files, sessions = {"fp32": path}, {"fp32": make_session(path, {})}
        for name in names:
            q, rep = onnxq.convert(str(path), onnxq.ConvertConfig(**g.CONFIGS[name]), calib=cal)
            files[name] = Path(tmp) / f"{name}.onnx"
            onnxq.save(q, files[name])
            sessions[name] = make_session(files[name], rep.session_options)
        for label, feed in feeds.items():
            ms = time_all(sessions, feed, a.rounds, a.runs)
            tokens = next(iter(feed.values())).shape[-1]
            for k in sessions:
                print(f"{a.model} {label} ({tokens} tokens) {k:>10}: {ms[k]:7.2f} ms  {ms[k] / ms['fp32']:.3f}x FP32  "
                      f"{files[k].stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
