"""ort-cpu: a Pad between two 8-bit tensors of one scale runs on the codes.

onnxruntime's QDQ fusion has no rule for Pad: DQ -> Pad -> Q stays three float passes over the
tensor. When the Q takes the DQ's own scale and zero point (placement ties a Pad's output to its
input, plan/rules.SAME_SCALE_OPS), the unit is the Pad of the codes themselves, its constant the
code of the float constant (rounded and clipped to the grid, as the Q would): bit-exact to the
unit it replaces. graph/forward.py puts such Pads ahead of convs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .kernels import add_initializer
from .prepare import readers_of
from .walk import attr, fixed_names

CODE_TYPES = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def _params(inits: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> tuple[float, int, int] | None:
    """(scale, zero point, zero point's type) of a per-tensor 8-bit Q/DQ, else None."""
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    s, z = inits[node.input[1]], inits[node.input[2]]
    if s.dims or z.dims or z.data_type not in CODE_TYPES:
        return None
    return float(numpy_helper.to_array(s)), int(numpy_helper.to_array(z)), z.data_type


def _unit(n: onnx.NodeProto, inits, made, readers, outputs):
    """(DQ, [Qs], their grid) around Pad n when they share one 8-bit grid, else None."""
    dq = made.get(n.input[0])
    qs = readers.get(n.output[0], [])
    if dq is None or dq.op_type != "DequantizeLinear" or not qs or n.output[0] in outputs:
        return None
    grid = _params(inits, dq)
    if grid is None or any(q.op_type != "QuantizeLinear" or _params(inits, q) != grid for q in qs):
        return None
    if sum(q.output[0] in outputs for q in qs) > 1:
        return None
    qs = sorted(qs, key=lambda q: q.output[0] not in outputs)       # a graph output's Q first: the Pad takes its name
    if len(n.input) > 2 and n.input[2] and n.input[2] not in inits:
        return None
    return dq, qs, grid


def _code(inits, n: onnx.NodeProto, grid: tuple[float, int, int]) -> np.ndarray:
    """The Pad's constant on the grid, as the Q would round and clip it."""
    value = float(numpy_helper.to_array(inits[n.input[2]])) if len(n.input) > 2 and n.input[2] else 0.0
    s, z, dtype = grid
    info = np.iinfo(CODE_TYPES[dtype])
    return np.array(np.clip(np.rint(value / s) + z, info.min, info.max), CODE_TYPES[dtype])


def pads_on_codes(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each main-graph DQ -> Pad -> Q unit on one 8-bit grid as a Pad of the
    codes; returns how many."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    made = {y: n for n in g.node for y in n.output}
    readers = readers_of(g)
    # kept as they are: graph outputs and what control-flow subgraphs read from outside
    outputs = fixed_names(g)
    rename: dict[str, str] = {}
    replaced: dict[str, onnx.NodeProto] = {}     # by the Pad's output
    drop: set[str] = set()                         # the Qs' outputs
    units_dq: set[str] = set()                     # the DQs' outputs
    for n in g.node:
        found = None if n.op_type != "Pad" or n.domain not in ("", "ai.onnx") else _unit(n, inits, made, readers,
                                                                                         outputs)
        if found is None:
            continue
        dq, qs, grid = found
        units_dq.add(dq.output[0])
        mode = attr(n, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        out = qs[0].output[0]
        ins = [dq.input[0], n.input[1]]
        if mode == "constant":
            ins.append(add_initializer(g, f"{n.name or n.output[0]}/code", _code(inits, n, grid)))
        if len(n.input) > 3:
            ins += ([""] if len(ins) == 2 else []) + [n.input[3]]
        replaced[n.output[0]] = helper.make_node("Pad", ins, [out], name=f"{n.name}/codes", mode=mode)
        for q in qs:
            rename.update({q.output[0]: out} if q is not qs[0] else {})
            drop.add(q.output[0])
    if not replaced:
        return 0
    order = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in drop:
            continue
        n = replaced.get(n.output[0], n) if n.op_type == "Pad" else n
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
        order.append(n)
    used = {x for n in order for x in n.input} | outputs
    order = [n for n in order if n.op_type != "DequantizeLinear" or n.output[0] not in units_dq
             or n.output[0] in used]
    del g.node[:]
    g.node.extend(order)
    return len(replaced)
