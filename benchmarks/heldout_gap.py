"""How much of a configuration's fidelity carries past the calibration data: FP32 agreement and
SQNR on the calibration samples themselves ("fit"), on other samples drawn from the same source
pool ("same pool": other crops of the same photos, other lines of the same generator) and on the
held-out pool generalise.py judges on ("held out": other photos, other texts). A method whose gain
shows on the first two columns and not on the third fits the calibration content, not the model.

    python benchmarks/heldout_gap.py --model effl1 --sets a b --configs gptq mse rtn
    python benchmarks/heldout_gap.py --model M --configs w4a8 \
        'w4a8-tables8=bits:4,act_bits:8,bits_overrides:[["/positions/*",8],["/types/*",8]]'

A configuration is a name from CONFIGS (or generalise.py's), or a one-off `name=k:v,k:v` as
generalise.py reads it (generalise.parse_config).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

import onnxq
from onnxq import runtime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import generalise as g  # noqa: E402
from checkout import require_checkout  # noqa: E402

ONE_PASS = dict(sequential=False)           # the first plan alone (no sequential refit)
CONFIGS = {
    "rtn": dict(bits=4, act_bits=32, weight_method="rtn", **ONE_PASS),
    "mse": dict(bits=4, act_bits=32, weight_method="mse", **ONE_PASS),
    "gptq": dict(bits=4, act_bits=32, weight_method="gptq", **ONE_PASS),
    "w4": dict(bits=4, act_bits=32),
    "w8": dict(bits=8, act_bits=32),
}
SAME_POOL_SEED = 7


def measure(key: str, dataset: str, seed: int, configs: list[str], cache: Path) -> None:
    spec = g.MODELS[key]
    path = g.model_path(spec)
    n_cal, n_ev = spec["counts"]
    pools = {"fit": g.feeds(key, spec, path, dataset, seed, n_cal, "calib", cache),
             "same pool": g.feeds(key, spec, path, dataset, SAME_POOL_SEED, n_cal, "calib", cache),
             "held out": g.feeds(key, spec, path, dataset, g.EVAL_SEED[dataset], n_ev, "eval", cache)}
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    refs = {k: [fp32.run(None, f) for f in v] for k, v in pools.items()}
    charset = g.ocr_data.load_charset(path) if spec["kind"] == "rec" else None
    for name in configs:
        t0 = time.perf_counter()
        q, _ = onnxq.convert(str(path), onnxq.ConvertConfig(**g.CONFIGS[name]), calib=pools["fit"])
        cells = []
        with tempfile.TemporaryDirectory(prefix="gap.") as d:
            onnxq.save(q, Path(d) / "q.onnx")
            sess = runtime.session(str(Path(d) / "q.onnx"))
            for k, feeds in pools.items():
                fidelity, db = g.judge(sess, feeds, refs[k], spec["kind"], charset)
                cells.append(f"{k} {fidelity:.3f} {db:5.1f} dB")
        print(f"{key} {dataset}{seed} {name:>14}: " + " | ".join(cells)
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    require_checkout()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=list(g.MODELS))
    ap.add_argument("--configs", nargs="+", default=["rtn", "mse", "gptq"])
    ap.add_argument("--sets", nargs="+", default=["a"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/onnxq-bench-cache")
    a = ap.parse_args()
    g.CONFIGS.update(CONFIGS)
    configs = [g.parse_config(c) for c in a.configs]
    for ds in a.sets:
        measure(a.model, ds, a.seed, configs, Path(a.cache))


if __name__ == "__main__":
    main()
