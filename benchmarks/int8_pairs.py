"""Where onnxruntime's u8 x s8 integer convs add products in int16 on this CPU, and what keeping
INT8 weights inside that range would cost (issue 18: `ort-cpu` on an x86 CPU without VNNI).

Part 1 (`pairs`) builds one QLinearConv per shape, each output channel holding two weight codes of
127 at two positions of its filter, fed 255 everywhere: a channel whose fused output differs from
the unfused graph's is a pair of positions the kernel adds in int16 (2 x 255 x 127 > 32767). It
prints whether every such pair is (2t, 2t + 1) in the filter's (ky, kx, c) order.

Part 2 (`costs`) takes a model's conv weights and, for grids whose largest code is M, the squared
error of rounding them to that grid with every such pair's same-sign sum capped at 128 (what no
activation can make saturate), over the error of plain 8-bit rounding, by kind of conv.

    python benchmarks/int8_pairs.py pairs
    python benchmarks/int8_pairs.py costs --model /tmp/onnxq-models/efficientnet_lite1.onnx
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = ((8, 1, 1, 1), (5, 1, 1, 1), (3, 3, 3, 1), (7, 3, 3, 1), (32, 3, 3, 1), (96, 1, 1, 1),
          (40, 5, 5, 1), (8, 3, 3, 2), (16, 1, 1, 4), (8, 3, 3, 8), (16, 5, 5, 16))   # C, kh, kw, group
CAP = 128          # 255 x 128 = 32640 <= 32767


def qconv(w: np.ndarray, group: int) -> onnx.ModelProto:
    """x (u8, scale 1) -> conv with INT8 weights w (scale 1) -> y (u8, scale 256)."""
    o, cg = w.shape[:2]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s1", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], group=group),
             helper.make_node("QuantizeLinear", ["y", "s256", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s256", "z"], ["out"])]
    inits = [numpy_helper.from_array(np.float32(1.0), "s1"), numpy_helper.from_array(np.float32(256.0), "s256"),
             numpy_helper.from_array(np.uint8(0), "z"), numpy_helper.from_array(w.astype(np.int8), "w"),
             numpy_helper.from_array(np.ones(o, np.float32), "ws"), numpy_helper.from_array(np.zeros(o, np.int8), "wz")]
    g = helper.make_graph(nodes, "pairs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cg * group, 6, 6])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def fused_and_exact(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        runs.append(s.run(None, {"x": x})[0])
    return runs[0], runs[1]


def saturating_pairs(c: int, kh: int, kw: int, group: int, sample: int = 3000, seed: int = 0) -> tuple[set, set, int]:
    """(pairs that saturate, pairs adjacent in (ky, kx, c) order starting at an even index; both
    as positions in that order, among the pairs tried), and how many pairs were tried."""
    cg = c // group
    k = cg * kh * kw
    hwc = lambda i: (lambda ch, y, xx: (y * kw + xx) * cg + ch)(*np.unravel_index(i, (cg, kh, kw)))  # noqa: E731
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if len(pairs) > sample:                  # a sample, and every adjacent pair
        at = {hwc(i): i for i in range(k)}
        pick = np.random.default_rng(seed).choice(len(pairs), sample, replace=False)
        pairs = [pairs[i] for i in pick] + [(at[2 * t], at[2 * t + 1]) for t in range(k // 2)]
    x = np.full((1, c, 6, 6), 255, np.float32)
    bad = set()
    for b in range(0, len(pairs), 256):
        chunk = pairs[b:b + 256]
        o = group * int(np.ceil(len(chunk) / group))
        w = np.zeros((o, cg, kh, kw), np.int8)
        flat = w.reshape(o, -1)
        for n, (i, j) in enumerate(chunk):
            flat[n, i] = flat[n, j] = 127
        fused, exact = fused_and_exact(qconv(w, group), x)
        worst = np.abs(fused - exact).reshape(o, -1).max(axis=1)
        bad |= {tuple(sorted((hwc(i), hwc(j)))) for n, (i, j) in enumerate(chunk) if worst[n] > 1.5}
    adjacent = {tuple(sorted((hwc(i), hwc(j)))) for i, j in pairs if abs(hwc(i) - hwc(j)) == 1 and min(hwc(i), hwc(j)) % 2 == 0}
    return bad, adjacent, len(pairs)


def capped_error(w: np.ndarray, top: int) -> float:
    """Squared error of w rounded per output channel to codes whose largest is `top`, with each
    (2t, 2t + 1) pair's same-sign sum cut to CAP (the excess taken from both, half each), over the
    error of plain rounding to +-127 (1/12 of a step squared a weight)."""
    o = w.shape[0]
    f = w.transpose(0, 2, 3, 1).reshape(o, -1).astype(np.float64)
    step = np.abs(f).max(axis=1, keepdims=True) / top
    step[step == 0] = 1.0
    x = f / step
    if x.shape[1] % 2:
        x = np.pad(x, ((0, 0), (0, 1)))
    q = np.clip(np.round(x), -127, 127).reshape(o, -1, 2)
    for sign in (1.0, -1.0):
        part = np.clip(q * sign, 0, None)
        excess = np.clip(part.sum(axis=-1) - CAP, 0, None)
        first = np.minimum(part[..., 0], np.ceil(excess / 2))
        q[..., 0] -= sign * first
        q[..., 1] -= sign * (excess - first)
    err = float((((q.reshape(o, -1) - x) * step) ** 2).sum())
    plain = float(((np.abs(f).max(axis=1) / 127) ** 2).sum() * f.shape[1] / 12)
    return err / max(plain, 1e-30)


def conv_kinds(model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list[np.ndarray]] = {"pointwise": [], "depthwise": [], "other": []}
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            kind = "depthwise" if w.shape[1] == 1 else "pointwise" if w.shape[2:] == (1, 1) else "other"
            out[kind].append(w)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["pairs", "costs"])
    ap.add_argument("--model", default="/tmp/onnxq-models/efficientnet_lite1.onnx")
    args = ap.parse_args()
    if args.part == "pairs":
        for c, kh, kw, group in SHAPES:
            bad, adjacent, tried = saturating_pairs(c, kh, kw, group)
            print(f"C {c:3d} {kh}x{kw} group {group:2d}: {tried:5d} pairs tried, {len(bad):3d} saturate; "
                  f"exactly the (2t, 2t+1) pairs of (ky, kx, c) order: {bad == adjacent}")
        return
    tops = (64, 72, 80, 88, 96, 112, 127)
    print(f"largest code   {' '.join(f'{t:>7d}' for t in tops)}")
    for kind, ws in conv_kinds(onnx.load(args.model)).items():
        if ws:
            print(f"{kind:10s} {len(ws):3d} " + " ".join(f"{np.mean([capped_error(w, t) for w in ws]):7.2f}" for t in tops))


if __name__ == "__main__":
    main()
