"""ort-cpu: a HardSwish whose smoothing went through it into the conv before (graph/smooth.py),
written as two integer kernels.

Smoothing divides the conv's output by a positive s per channel (x' = x / s) and leaves

    DQ(x') -> Mul(x', s) -> HardSwish -> Mul(., 1/s) -> Q(y')        y' = hardswish(x) / s

which onnxruntime runs as five float passes. With the gate g = hardsigmoid(x) written on x',
g = clip(x' s / 6 + 1/2, 0, 1), and y' = x' g, the unit becomes

    g  = Q(Conv(DQ(x'), w = s/6, b = 1/2, one group a channel); 1/255, 0)     clipped to [0, 1]
    y' = Q(DQ(x') * DQ(g))

a 1x1 depthwise conv (QLinearConv: each channel's single weight is code 127 of a scale s/762,
exact; _gate_weight) and a QLinearMul, both integer kernels. The gate is rounded by 1/510 at most, so y' moves
by at most |x'| / 510, below half a step of y' wherever |x'| stays within y''s range."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .hardswish import _scalar_u8, hard_swishes
from .kernels import add_initializer

PREFIX = "hardswish_channels"
BIAS_ROOM = 2.0 ** 30          # the largest bias code used: half of int32's range


def _per_channel(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    """A positive [1, C, 1, 1] constant's C values, else None."""
    if name not in inits:
        return None
    v = numpy_helper.to_array(inits[name])
    return v.ravel().astype(np.float64) if v.ndim == 4 and v.shape[0] == 1 and v.size == v.shape[1] \
        and bool(np.all(v > 0)) else None


def _units(g: onnx.GraphProto) -> list[tuple]:
    """(DQ of x', Mul by s, HardSwish, Mul by 1/s, its Qs, s) for each such chain on u8 tensors."""
    inits, made, readers, nodes = hard_swishes(g)
    outputs = {o.name for o in g.output}
    found = []
    for hs in nodes:
        times = made.get(hs.input[0])
        after = readers.get(hs.output[0], [])
        if times is None or times.op_type != "Mul" or len(after) != 1 or after[0].op_type != "Mul":
            continue
        dq, s = made.get(times.input[0]), _per_channel(inits, times.input[1])
        inv = _per_channel(inits, after[0].input[1]) if after[0].input[0] == hs.output[0] else None
        qs = readers.get(after[0].output[0], [])
        if (dq is None or dq.op_type != "DequantizeLinear" or not _scalar_u8(inits, dq) or s is None
                or inv is None or len(readers.get(times.output[0], [])) != 1 or after[0].output[0] in outputs
                or not qs or any(q.op_type != "QuantizeLinear" or not _scalar_u8(inits, q) for q in qs)):
            continue
        found.append((dq, times, hs, after[0], qs, s))
    return found


def _gate_weight(x_scale: float, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's weight s/6 as (code, scale): code 127 of s/762, or fewer steps where the bias
    1/2 would not fit int32 in steps of x_scale * scale (a channel s shrinks a millionfold); code 0
    where even one step would not, its gate then 1/2 (the slope over x''s whole range is below 2^-23)."""
    k = np.clip(np.floor(BIAS_ROOM * x_scale * s / 3), 0, 127)
    return k, np.where(k > 0, s / 6 / np.maximum(k, 1), 0.5 / BIAS_ROOM / x_scale).astype(np.float32)


def _gate_nodes(g: onnx.GraphProto, base: str, dq: onnx.NodeProto, s: np.ndarray, u8_weights: bool) -> list:
    """The gate's nodes, reading DQ(x') and ending in `{base}/gate_dq`."""
    inits = {t.name: t for t in g.initializer}
    x_scale = float(numpy_helper.to_array(inits[dq.input[1]]))
    x_top = x_scale * (255 - int(numpy_helper.to_array(inits[dq.input[2]])))
    k, w_scale = _gate_weight(x_scale, s)
    code, zero = ((k + 128).astype(np.uint8), np.full(s.size, 128, np.uint8)) if u8_weights \
        else (k.astype(np.int8), np.zeros(s.size, np.int8))
    b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
    b_code = np.round(0.5 / b_scale.astype(np.float64)).astype(np.int32)
    top = min(1.0, max(x_top, 0.0) * float(s.max()) / 6 + 0.5)
    names = {k: add_initializer(g, f"{base}/{k}", v) for k, v in (
        ("weight_q", code.reshape(-1, 1, 1, 1)), ("weight_scale", w_scale), ("weight_zero", zero),
        ("bias_q", b_code), ("bias_scale", b_scale), ("bias_zero", np.zeros(s.size, np.int32)),
        ("gate_scale", np.array(top / 255, np.float32)), ("gate_zero", np.array(0, np.uint8)))}
    return [
        helper.make_node("DequantizeLinear", [names["weight_q"], names["weight_scale"], names["weight_zero"]],
                         [f"{base}/weight_dq"], name=f"{base}/weight_dequantize", axis=0),
        helper.make_node("DequantizeLinear", [names["bias_q"], names["bias_scale"], names["bias_zero"]],
                         [f"{base}/bias_dq"], name=f"{base}/bias_dequantize", axis=0),
        helper.make_node("Conv", [dq.output[0], f"{base}/weight_dq", f"{base}/bias_dq"], [f"{base}/gate"],
                         name=f"{base}/gate_conv", group=int(s.size), kernel_shape=[1, 1]),
        helper.make_node("QuantizeLinear", [f"{base}/gate", names["gate_scale"], names["gate_zero"]],
                         [f"{base}/gate_q"], name=f"{base}/gate_quantize"),
        helper.make_node("DequantizeLinear", [f"{base}/gate_q", names["gate_scale"], names["gate_zero"]],
                         [f"{base}/gate_dq"], name=f"{base}/gate_dequantize")]


def integer_channel_hard_swish(model: onnx.ModelProto, u8_weights: bool = False, keep_float: bool = False) -> int:
    """Rewrites, in place, each main-graph chain above; returns how many. `u8_weights`: the gate's
    weight as UINT8 code 255 with zero point 128 (as the target's 8-bit weights). `keep_float`:
    the float chain stays, its output the value the integer unit approximates, and only the Qs
    read the unit (graph/hardswish.integer_hard_swish says why)."""
    g = model.graph
    units = _units(g)
    new: dict[str, list[onnx.NodeProto]] = {}
    gone: set[int] = set()
    for dq, times, hs, after, qs, s in units:
        base = f"{hs.name or hs.output[0]}/{PREFIX}"
        out = f"{after.output[0]}/integer" if keep_float else after.output[0]
        new[after.output[0]] = _gate_nodes(g, base, dq, s, u8_weights) + [
            helper.make_node("Mul", [dq.output[0], f"{base}/gate_dq"], [out], name=f"{base}/mul")]
        if keep_float:
            new[after.output[0]] = [times, hs, after] + new[after.output[0]]
            for q in qs:
                q.input[0] = out
        gone.update({id(times), id(hs)})
    order = []
    for n in g.node:
        if id(n) not in gone:
            order.extend(new.get(n.output[0], [n]) if n.op_type == "Mul" else [n])
    del g.node[:]
    g.node.extend(order)
    return len(units)
