"""Batch-1 latency of the model files a run.py run left behind, measured alone and interleaved.

run.py times each model right after evaluating it, so on a shared 2-core machine its latency
column drifts with whatever else runs. Here every model gets one session per thread count, and
the timed runs go round-robin over all models in several rounds, so drift hits all rows alike.
Rows marked "weights folded" are the same onnxq model with each weight DequantizeLinear replaced
by its float result: the difference to the unfolded row is what dequantizing the weights at run
time costs. Rows marked "no QDQ fusion" run the unchanged file with onnxruntime's session entry
`session.disable_quant_qdq` = 1: onnxruntime then constant-folds the weight dequantization itself
(it keeps those nodes only for the QDQ fusions, which onnxq's input-only placement never meets).

    python benchmarks/latency.py rec benchmarks/out/rec --rounds 10 --runs 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MODEL_FILES, build_data, models_dir  # noqa: E402

from onnxq.runtime import session  # noqa: E402
from checkout import require_checkout  # noqa: E402


def folded(path: Path) -> bytes:
    """The model with every weight DequantizeLinear (all inputs constant) turned into a float
    initializer."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    kept = []
    for n in m.graph.node:
        args = [x for x in n.input if x]
        if n.op_type != "DequantizeLinear" or not all(x in inits for x in args):
            kept.append(n)
            continue
        q, s = (numpy_helper.to_array(inits[x]).astype(np.float32) for x in args[:2])
        z = numpy_helper.to_array(inits[args[2]]).astype(np.float32) if len(args) > 2 else np.float32(0)
        if s.size > 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), (z.reshape(shape) if z.size > 1 else z)
        m.graph.initializer.append(numpy_helper.from_array((q - z) * s, n.output[0]))
    del m.graph.node[:]
    m.graph.node.extend(kept)
    return m.SerializeToString()


def main() -> None:
    require_checkout()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(MODEL_FILES))
    ap.add_argument("folder", type=Path, help="a run.py output folder (benchmarks/out/MODEL)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each model per round")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    rows: list[tuple[str, "str | bytes", bool]] = [("fp32", str(models_dir() / MODEL_FILES[args.model]), True)]
    for p in sorted(args.folder.glob("*.onnx")):
        rows.append((p.stem, str(p), True))
        if not p.stem.startswith("ort-"):
            rows.append((f"{p.stem} (no QDQ fusion)", str(p), False))
        if p.stem.startswith("onnxq-w8a8"):
            rows.append((f"{p.stem} (weights folded)", folded(p), True))
    feed = build_data(args.model, 1, 1)[1][0]        # run.py times its first evaluation feed
    threads = [int(t) for t in args.threads.split(",")]
    sessions = {(name, t): session(m, t, qdq_fusion=fuse) for name, m, fuse in rows for t in threads}
    times: dict = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    for _ in range(args.rounds):
        for k, s in sessions.items():
            for _ in range(args.runs):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
    print(f"{args.model}: median batch-1 latency in ms ({args.rounds} rounds x {args.runs} runs, interleaved)")
    print(f"{'model':34s}" + "".join(f"{f'{t} thread' + ('s' if t > 1 else ''):>12s}" for t in threads))
    for name, *_ in rows:
        print(f"{name:34s}" + "".join(f"{1000 * np.median(times[(name, t)]):12.2f}" for t in threads))


if __name__ == "__main__":
    main()
