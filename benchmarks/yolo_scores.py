"""Where a quantized YOLOv8n (nudenet's 320n.onnx) departs from FP32: box rows and class-score
rows of its [1, 4+C, A] output apart, on 200 photos of each data set that no benchmark
calibrates on (benchmarks/generalise.py's pools, other seeds).

The whole-output SQNR that targets.py and generalise.py print is the box distances' (pixels,
large) more than the class scores' (0..1), and F1 on 60-100 photos moves by a few detections;
this prints both parts and F1 on 400 photos, for any number of converted files:

    python benchmarks/yolo_scores.py old.onnx new.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import generalise as g  # noqa: E402
import targets as tg  # noqa: E402

FRESH = 100            # evaluation seeds offset from generalise.py's, so the photos differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="converted YOLOv8n files")
    ap.add_argument("--count", type=int, default=200, help="photos per data set")
    ap.add_argument("--cache", default="/tmp/onnxq-photos", help="folder for the decoded photos")
    a = ap.parse_args()
    spec = g.MODELS["A"]
    path = g.model_path(spec)
    fp = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    print("| data set | model | boxes dB | class scores dB | F1 |\n|---|---|---|---|---|")
    for ds in ("a", "b"):
        feeds = g.feeds("A", spec, path, ds, g.EVAL_SEED[ds] + FRESH, a.count, "eval", Path(a.cache))
        ref = np.stack([fp.run(None, f)[0] for f in feeds])
        for name in a.models:
            s = ort.InferenceSession(name, providers=["CPUExecutionProvider"])
            out = np.stack([s.run(None, f)[0] for f in feeds])
            f1 = g.score("yolo", [[o] for o in out], [[r] for r in ref])
            print(f"| {ds} | {Path(name).name} | {tg.metrics.sqnr_db(ref[:, :, :4], out[:, :, :4]):.1f} | "
                  f"{tg.metrics.sqnr_db(tg.yolo_scores(ref), tg.yolo_scores(out)):.1f} | {f1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
