"""Conversion cost on a MobileNetV2-shaped convnet of ~5M parameters at 224x224.

The network is built here with random weights (He init, BatchNorm left unfolded): only the
time and memory of the conversion are measured, never accuracy. Each conversion runs in a
child process so its wall time and peak resident memory are its own.

    python benchmarks/speed.py --samples 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from checkout import require_checkout  # noqa: E402

# (expansion, channels, repeats, stride) of MobileNetV2
BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1)]


class Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def _name(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int, group: int, act: bool) -> str:
        w = self._name("w")
        fan_in = cin // group * k * k
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / fan_in)).astype(np.float32), w))
        c = self._name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w], [c], pads=[k // 2] * 4, strides=[stride] * 2,
                                           group=group, name=c))
        bn = [self._name(p) for p in ("g", "b", "m", "v")]
        vals = [1 + 0.1 * self.rng.standard_normal(cout), 0.1 * self.rng.standard_normal(cout),
                0.1 * self.rng.standard_normal(cout), 0.5 + self.rng.random(cout)]
        self.inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(bn, vals)]
        y = self._name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [c] + bn, [y], name=y))
        if not act:
            return y
        r = self._name("relu6")
        self.nodes.append(helper.make_node("Clip", [y, "zero", "six"], [r], name=r))
        return r


def mobilenet_like(width: float = 1.4, seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    b.inits += [numpy_helper.from_array(np.array(0, np.float32), "zero"),
                numpy_helper.from_array(np.array(6, np.float32), "six")]
    ch = int(32 * width)
    x = b.conv_bn("input", 3, ch, 3, 2, 1, True)
    for t, c, n, s in BLOCKS:
        out = int(c * width)
        for i in range(n):
            h = x if t == 1 else b.conv_bn(x, ch, ch * t, 1, 1, 1, True)
            h = b.conv_bn(h, ch * t, ch * t, 3, s if i == 0 else 1, ch * t, True)
            h = b.conv_bn(h, ch * t, out, 1, 1, 1, False)
            if s == 1 and ch == out or i > 0:
                a = b._name("add")
                b.nodes.append(helper.make_node("Add", [x, h], [a], name=a))
                h = a
            x, ch = h, out
    x = b.conv_bn(x, ch, 1280, 1, 1, 1, True)
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    b.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    b.inits.append(numpy_helper.from_array(
        (b.rng.standard_normal((1000, 1280)) * 0.03).astype(np.float32), "fc_w"))
    b.inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b"))
    b.nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    g = helper.make_graph(b.nodes, "mobilenet_like",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def params(m: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) >= 2)


def peak_child(cmd: list[str]) -> tuple[float, float, int]:
    """Run cmd; wall seconds, peak RSS (MB) of that process, exit code."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> int:
    require_checkout()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.4)
    ap.add_argument("--variants", default="w8a8=--bits 8;w4a8=--bits 4;"
                                         "w4a8-seq=--bits 4 --sequential;w4a8-rank1pct=--bits 4 --rank-budget 0.01")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxq-speed-"))
    m = mobilenet_like(args.width)
    onnx.save(m, work / "model.onnx")
    cal = work / "calib"
    cal.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.samples + 16):      # the converter holds out the last few
        np.savez(cal / f"s{i:04d}.npz", input=rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
    print(f"model: {params(m) / 1e6:.2f}M weight parameters, {len(m.graph.node)} nodes; "
          f"{args.samples} calibration samples at 224x224\n")
    rows = []
    print("| variant | conversion s | peak MB | exit |\n|---|---|---|---|")
    for spec in args.variants.split(";"):
        name, opts = spec.split("=", 1)
        cmd = [sys.executable, "-m", "onnxq.cli", "convert", str(work / "model.onnx"), "-o",
               str(work / f"{name}.onnx"), "--calib", str(cal), "--calib-size", str(args.samples),
               "-q", "--report", str(work / f"{name}.json"), *opts.split()]
        secs, mb, code = peak_child(cmd)
        rep = json.loads((work / f"{name}.json").read_text()) if code == 0 else {}
        rows.append({"variant": name, "seconds": secs, "peak_mb": mb, "exit": code,
                     "stages": rep.get("seconds", {})})
        print(f"| {name} | {secs:.1f} | {mb:.0f} | {code} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
