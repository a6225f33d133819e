"""How much of a sentence encoder's 4-bit word-table error the rows calibration reads carry
(onnxq/plan/hot.py): the FP32 encoder with only its word table at 4 bits (affine blocks of 32, as
onnxq codes it), then with the rows its calibration sentences read exact, judged on held-out
sentences of the same set and of the other one.

    python benchmarks/hot_rows.py --models M3 M

Per line: the rows read, the share of held-out tokens they cover, output SQNR against FP32 with the
4-bit table and with the rows read exact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as g  # noqa: E402

from onnxq.algos.matrix import dequantize_rows  # noqa: E402
from onnxq.algos.weights import blocked  # noqa: E402

TABLE = "words.weight"


def session(path: Path, table: np.ndarray) -> ort.InferenceSession:
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.name == TABLE:
            t.CopyFrom(numpy_helper.from_array(table.astype(np.float32), TABLE))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def sqnr(ref, got) -> float:
    return float(10 * np.log10(sum(np.sum(r ** 2) for r in ref) / sum(np.sum((r - x) ** 2) for r, x in zip(ref, got))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["M3", "M"])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/onnxq-bench-cache"))
    a = ap.parse_args()
    for key in a.models:
        spec = g.MODELS[key]
        path = g.model_path(spec)
        w = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == TABLE))
        q = blocked("mse", w.astype(np.float64), 4, None, 32, affine=True)
        w4 = dequantize_rows(q.codes.astype(np.float64), q.scales)
        fp32, four = session(path, w), session(path, w4)
        print(f"{key}: word table {w.shape}, 4-bit table SQNR {sqnr([w], [w4]):.1f} dB", flush=True)
        for cal_set, ev_set in (("a", "a"), ("b", "b"), ("a", "b"), ("b", "a")):
            cal = g.feeds(key, spec, path, cal_set, 1, a.calib, "calib", a.cache)
            ev = g.feeds(key, spec, path, ev_set, g.EVAL_SEED[ev_set], spec["counts"][1], "eval", a.cache)
            read = np.unique(np.concatenate([f["input_ids"].ravel() for f in cal]))
            tokens = np.concatenate([f["input_ids"].ravel() for f in ev])
            hot = w4.copy()
            hot[read] = w[read]
            ref = [fp32.run(None, f)[0] for f in ev]
            plain = sqnr(ref, [four.run(None, f)[0] for f in ev])
            exact = session(path, hot)
            print(f"  calibration set {cal_set} -> held-out set {ev_set}: {len(read)} rows read, "
                  f"{np.isin(tokens, read).mean():.3f} of the tokens; 4-bit table {plain:.2f} dB, "
                  f"rows read exact {sqnr(ref, [exact.run(None, f)[0] for f in ev]):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
