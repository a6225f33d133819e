"""ort-cpu: a HardSwish between two 8-bit tensors written as two integer element-wise kernels.

onnxruntime has no integer HardSwish kernel: a unit DQ -> HardSwish -> Q runs as four float passes
(it expands HardSwish into HardSigmoid and Mul), which took 3.0 of PP-LCNet's 5.4 ms under ort-cpu
(docs/results.md, round 18). With x = s (q - z) the same unit is written as

    g = Q(DQ(q; s/6, z) + 1/2; t/255, 0)         x/6 + 1/2, clipped to [0, t] by g's u8 range
    y = Q(DQ(q; s, z) * DQ(g; t/255, 0))         x * hardsigmoid(x)

which its QDQ fusion turns into QLinearAdd and QLinearMul on u8 tensors. Only standard ops are
emitted, so any runtime still reads the graph. t = min(1, x_max/6 + 1/2) is the largest gate x's
range reaches. g is rounded by t/510 at most: x * g moves by at most |x| t / 510, below half a step
of y's own rounding wherever |x| stays within y's range."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .kernels import add_initializer
from .prepare import readers_of

PREFIX = "hardswish"


def _scalar_u8(inits: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> bool:
    """A per-tensor Q/DQ on uint8 (scalar scale, uint8 zero point given as an initializer)."""
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return False
    s, z = inits[node.input[1]], inits[node.input[2]]
    return not s.dims and not z.dims and z.data_type == TensorProto.UINT8


def hard_swishes(g: onnx.GraphProto) -> tuple[dict, dict, dict, list[onnx.NodeProto]]:
    """(initializers, producer of each tensor, readers of each tensor, the main graph's standard
    HardSwish nodes whose output is not a graph output)."""
    outputs = {o.name for o in g.output}
    nodes = [n for n in g.node if n.op_type == "HardSwish" and n.domain in ("", "ai.onnx")
             and n.output[0] not in outputs]
    return ({t.name: t for t in g.initializer}, {y: n for n in g.node for y in n.output}, readers_of(g), nodes)


def _units(g: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.NodeProto]]]:
    """(HardSwish, its input's DQ, its Qs) for each HardSwish that reads a u8 DQ and is read only by u8 Qs."""
    inits, made, readers, nodes = hard_swishes(g)
    found = []
    for n in nodes:
        dq = made.get(n.input[0])
        rs = readers.get(n.output[0], [])
        if (dq is None or dq.op_type != "DequantizeLinear" or not _scalar_u8(inits, dq) or not rs
                or any(r.op_type != "QuantizeLinear" or not _scalar_u8(inits, r) for r in rs)):
            continue
        found.append((n, dq, rs))
    return found


def _constants(g: onnx.GraphProto) -> tuple[str, str, str]:
    """The names of the shared constants: 1/2 as a u8 code, its scale, zero point 0."""
    names = (f"{PREFIX}/half", f"{PREFIX}/half_scale", f"{PREFIX}/zero")
    if not any(t.name == names[0] for t in g.initializer):
        add_initializer(g, names[0], np.array(128, np.uint8))
        add_initializer(g, names[1], np.array(0.5 / 128, np.float32))
        add_initializer(g, names[2], np.array(0, np.uint8))
    return names


def _gate_scale(scale: np.ndarray, zero: onnx.TensorProto) -> np.ndarray:
    """g's step: its largest value over x's u8 range (1 once x reaches 3) in 255 steps; its
    zero point is 0, so the Q clips g at 0 below x = -3."""
    top = float(scale) * (255 - int(numpy_helper.to_array(zero)))
    return np.array(min(1.0, max(top, 0.0) / 6 + 0.5) / 255, np.float32)


def integer_hard_swish(model: onnx.ModelProto, keep_float: bool = False) -> int:
    """Rewrites, in place, each main-graph DQ -> HardSwish -> Q unit on u8 tensors as above;
    returns how many. `keep_float`: the HardSwish stays too, its output the float value the
    integer unit approximates, and only the Qs read the integer unit (for a session that measures
    what each rounding costs, graph/variants.with_act_masks: unrounding the output then undoes
    the gate's rounding as well, as keeping the tensor at 16 bits, which leaves the unit float, does)."""
    g = model.graph
    units = _units(g)
    if not units:
        return 0
    half, half_scale, zero = _constants(g)
    inits = {t.name: t for t in g.initializer}
    new: dict[str, list[onnx.NodeProto]] = {}
    for node, dq, qs in units:
        base = f"{node.name or node.output[0]}/{PREFIX}"
        out = f"{node.output[0]}/integer" if keep_float else node.output[0]
        s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        sixth = add_initializer(g, f"{base}/sixth_scale", np.array(s / np.float32(6), np.float32))
        gate_scale = add_initializer(g, f"{base}/gate_scale", _gate_scale(s, inits[dq.input[2]]))
        new[node.output[0]] = [
            helper.make_node("DequantizeLinear", [dq.input[0], sixth, dq.input[2]], [f"{base}/sixth"],
                             name=f"{base}/sixth"),
            helper.make_node("DequantizeLinear", [half, half_scale, zero], [f"{base}/half"], name=f"{base}/half"),
            helper.make_node("Add", [f"{base}/sixth", f"{base}/half"], [f"{base}/gate"], name=f"{base}/add"),
            helper.make_node("QuantizeLinear", [f"{base}/gate", gate_scale, zero], [f"{base}/gate_q"],
                             name=f"{base}/gate_quantize"),
            helper.make_node("DequantizeLinear", [f"{base}/gate_q", gate_scale, zero], [f"{base}/gate_dq"],
                             name=f"{base}/gate_dequantize"),
            helper.make_node("Mul", [node.input[0], f"{base}/gate_dq"], [out], name=f"{base}/mul")]
        if keep_float:
            new[node.output[0]].insert(0, node)
            for q in qs:
                q.input[0] = out
    order = []
    for n in g.node:
        order.extend(new[n.output[0]] if n.op_type == "HardSwish" and n.output[0] in new else [n])
    del g.node[:]
    g.node.extend(order)
    return len(units)
