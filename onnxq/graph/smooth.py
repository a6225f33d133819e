"""The graph side of smoothing (algos/smoothing.py): which Gemm/MatMul and depthwise-conv inputs
can be smoothed, and the exact rewrite x -> Mul(x, 1/s) read by those layers, whose weight
columns (a depthwise conv: its filters of channel c) are scaled by s. Other readers of x (a
residual Add) still read x."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..algos.matrix import from_matrix, to_matrix
from ..types import Target
from .large import tensor_array
from .prepare import _replace_init
from .walk import node_reads, used_names


def channel_axis(t: Target) -> int:
    """The axis of a smoothable layer's input that holds its channels."""
    return 1 if t.op == "Conv" else -1


def smoothable(model: onnx.ModelProto, targets: list[Target], convs: bool = True) -> dict[str, list[Target]]:
    """{input tensor: its readers} for main-graph layers whose weight no other node reads: Gemm
    and MatMul with the weight on the right (the input's last axis is what the weight reads),
    and with `convs` depthwise convs (channel c of the input meets only channel c's filters).
    An input read by both kinds is left out."""
    g = model.graph
    reads: dict[str, int] = defaultdict(int)
    for node in g.node:
        for name in node_reads(node):
            reads[name] += 1
    outputs = {o.name for o in g.output}
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        if (not t.graph and t.act and reads[t.weight] == 1 and t.weight not in outputs
                and ((len(t.shape) == 2 and (t.op == "Gemm" or (t.op == "MatMul" and t.weight_layout == "cols")))
                     or (convs and t.depthwise))):
            groups[t.act].append(t)
    return {a: ts for a, ts in groups.items() if len({channel_axis(t) for t in ts}) == 1}


def _unique(g: onnx.GraphProto, base: str) -> str:
    taken = used_names(g) | {n for node in g.node for n in node.output} | {i.name for i in g.initializer}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def apply_smoothing(model: onnx.ModelProto, act: str, readers: list[Target], scales: np.ndarray) -> str:
    """Insert Mul(act, 1/scales) before the first reader, point the readers at it, and scale
    their weights' input columns by `scales` [K]. -> the new tensor's name."""
    g = model.graph
    new = _unique(g, f"{act}_smooth")
    inv = _unique(g, f"{act}_smooth_inverse")
    t0 = readers[0]
    # a conv's input is [N, C, spatial...]: the scales broadcast along axis 1
    shape = (1, -1) + (1,) * (len(t0.shape) - 2) if channel_axis(t0) == 1 else (-1,)
    g.initializer.append(numpy_helper.from_array((1.0 / scales).reshape(shape).astype(np.float32), inv))
    names = {t.node: t for t in readers}
    first = min(i for i, n in enumerate(g.node) if n.name in names)
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        t = names.get(node.name)
        if t is None:
            continue
        node.input[0] = new
        w = tensor_array(inits[t.weight]).astype(np.float64)
        if channel_axis(t) == 1:     # depthwise: output channel o filters input channel o // multiplier
            per = np.repeat(scales, t.shape[0] // len(scales)).reshape((-1,) + (1,) * (len(t.shape) - 1))
            _replace_init(g, t.weight, w * per)
            continue
        m = to_matrix(w, t.weight_layout)
        _replace_init(g, t.weight, from_matrix(m * scales[None, :], t.weight_layout, t.shape))
    node_name, i = f"{act}/smooth", 1
    while any(n.name == node_name for n in g.node):
        node_name, i = f"{act}/smooth_{i}", i + 1
    g.node.insert(first, onnx.helper.make_node("Mul", [act, inv], [new], name=node_name))
    return new
