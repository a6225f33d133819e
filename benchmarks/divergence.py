"""Where along the graph a conversion departs from FP32: the SQNR of every tensor the FP32 model
computes, read from each converted model on held-out feeds of `generalise.py`'s data sets, one
column a configuration. A tensor a conversion renames or removes reads '-'. The sessions run
without graph optimizations, so each named tensor is the value the emitted graph computes
(before its own Q/DQ, if any). Energies are summed per sample, so large inputs stream.

    python benchmarks/divergence.py --model A --set c --seed 1 --configs w8a8 \\
        'ortcpu=bits:8,act_bits:8,target:ort-cpu' --samples 12
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import generalise as gen  # noqa: E402
from checkout import require_checkout  # noqa: E402


def every_tensor_session(model: onnx.ModelProto, names: list[str]):
    """A session of `model` (unoptimized) returning each of `names` it computes; and those names."""
    have = {o for n in model.graph.node for o in n.output}
    keep = [x for x in names if x in have]
    outs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=x) for x in keep if x not in outs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]), keep


def sqnr_along(fp32: Path, converted: onnx.ModelProto, names: list[str], feeds) -> dict[str, float]:
    """{tensor: SQNR in dB against FP32 over `feeds`} for each of `names` both models compute."""
    ref, keep = every_tensor_session(onnx.load(str(fp32)), names)
    out, got = every_tensor_session(converted, keep)
    signal, noise = dict.fromkeys(got, 0.0), dict.fromkeys(got, 0.0)
    for f in feeds:
        r = dict(zip(keep, ref.run(keep, f)))
        for name, o in zip(got, out.run(got, f)):
            a = r[name].astype(np.float64)
            if a.shape != o.shape:
                signal.pop(name, None)
                continue
            if name in signal:
                signal[name] += float(np.sum(a ** 2))
                noise[name] += float(np.sum((a - o) ** 2))
    return {k: 10 * np.log10(max(signal[k], 1e-30) / max(noise[k], 1e-30)) for k in signal}


def main() -> None:
    require_checkout()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(gen.MODELS))
    ap.add_argument("--set", default="a", choices=sorted(gen.EVAL_SEED))
    ap.add_argument("--seed", type=int, default=1, help="calibration draw")
    ap.add_argument("--configs", nargs="+", default=["w8a8"], help="as in generalise.py (name=k:v,... adds one)")
    ap.add_argument("--samples", type=int, default=8, help="held-out feeds")
    a = ap.parse_args()
    configs = [gen.parse_config(c) for c in a.configs]
    spec = gen.MODELS[a.model]
    path = gen.model_path(spec)
    cache = Path(tempfile.gettempdir()) / "onnxq-gen-cache"
    ev = gen.feeds(a.model, spec, path, a.set, gen.EVAL_SEED[a.set], a.samples, "eval", cache)
    cal = gen.feeds(a.model, spec, path, a.set, a.seed, spec["counts"][0], "calib", cache)
    graph = onnx.load(str(path), load_external_data=False).graph
    order = [(o, n.op_type) for n in graph.node for o in n.output]
    cols = {}
    for name in configs:
        q, _ = onnxq.convert(str(path), onnxq.ConvertConfig(**gen.CONFIGS[name]), calib=cal)
        cols[name] = sqnr_along(path, q, [o for o, _ in order], ev)
        print(f"# {name} converted and read", flush=True)
    print(f"# {a.model} set {a.set} seed {a.seed}, {a.samples} held-out feeds; SQNR (dB) against FP32")
    print(f"{'tensor':48s} {'op':14s} " + " ".join(f"{c[:10]:>10s}" for c in configs))
    for o, op in order:
        if any(o in c for c in cols.values()):
            print(f"{o[:48]:48s} {op:14s} " + " ".join(f"{cols[c][o]:10.1f}" if o in cols[c] else f"{'-':>10s}"
                                                       for c in configs))


if __name__ == "__main__":
    main()
