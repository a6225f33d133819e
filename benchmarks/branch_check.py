"""Do the low-rank branches' choices hold on data they were not fitted on? For one model and
data set of benchmarks/generalise.py (same feeds, calibration seed 1), converts each
configuration and prints the held-out answer agreement and SQNR, the divergence from FP32 on the
held-out feeds and on the first 16 calibration feeds, and what the branch planner measured on
calibration samples (divergence without branches, with all, after dropping; branches kept and
dropped).

    python benchmarks/branch_check.py effl1 a "bits=4,act_bits=8" "bits=4,act_bits=8,rank_budget=0.02"
"""

from __future__ import annotations

import argparse
import ast
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import generalise as g
import onnxq
from onnxq import runtime
from onnxq.algos.metrics import divergence


def config(text: str) -> dict:
    """'k=v,k=v' -> keyword arguments of ConvertConfig (values read as Python literals where they
    parse: 0.02, False, None; else as strings: rtn)."""
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def mean_divergence(ref_sess, sess, feeds) -> float:
    return float(np.mean([divergence(ref_sess.run(None, f), sess.run(None, f)) for f in feeds]))


def branch_line(b) -> str:
    if b is None or b.divergence_without_branches is None:
        return ""
    return (f"calibration: without {b.divergence_without_branches:.3g}, all {b.divergence_all_branches:.3g}, "
            f"final {b.divergence_final:.3g}; kept {b.layers_with_branch}, dropped {len(b.dropped)}, "
            f"{b.used_params}/{b.budget_params} parameters")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(g.MODELS))
    ap.add_argument("dataset", choices=["a", "b"])
    ap.add_argument("configs", nargs="+", help="ConvertConfig keywords, e.g. bits=4,act_bits=8,rank_budget=0.02")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/onnxq-bench-cache")
    a = ap.parse_args()
    spec = g.MODELS[a.model]
    path = Path(spec["path"]) if "path" in spec else g.tg.package_file(spec["pkg"], spec["file"])
    n_cal, n_ev = spec["counts"]
    charset = g.ocr_data.load_charset(path) if spec["kind"] == "rec" else None
    cache = Path(a.cache)
    ev = g.feeds(a.model, spec, path, a.dataset, g.EVAL_SEED[a.dataset], n_ev, "eval", cache)
    cal = g.feeds(a.model, spec, path, a.dataset, a.seed, n_cal, "calib", cache)
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = [fp32.run(None, f) for f in ev]
    for text in a.configs:
        t0 = time.perf_counter()
        q, rep = onnxq.convert(str(path), onnxq.ConvertConfig(**config(text)), calib=cal)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as t:
            dst = Path(t) / "q.onnx"
            onnxq.save(q, dst)
            sess = runtime.session(str(dst))
            outs = [sess.run(None, f) for f in ev]
            held = float(np.mean([divergence(r, o) for r, o in zip(ref, outs)]))
            fitted = mean_divergence(fp32, sess, cal[:16])
        fid = g.score(spec["kind"], outs, ref, charset)
        sqnr = float(g.tg.metrics.sqnr_db(g.tg.flat(ref), g.tg.flat(outs)))
        print(f"{a.model} {a.dataset} seed {a.seed} {text}: {fid:.3f} {sqnr:5.2f} dB, divergence held-out "
              f"{held:.3g} / calibration {fitted:.3g}, {seconds:.0f} s | {branch_line(rep.branches)}", flush=True)


if __name__ == "__main__":
    main()
