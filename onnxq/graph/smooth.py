"""The graph side of smoothing (algos/smoothing.py): which Gemm/MatMul inputs can be smoothed,
and the exact rewrite x -> Mul(x, 1/s) read by those layers, whose weight columns are scaled
by s. Other readers of x (a residual Add) still read x."""

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


def smoothable(model: onnx.ModelProto, targets: list[Target]) -> dict[str, list[Target]]:
    """{input tensor: its Gemm/MatMul readers} for main-graph layers whose input's last axis is
    what the weight reads (Gemm, MatMul with the weight on the right) and whose weight no other
    node reads."""
    g = model.graph
    reads: dict[str, int] = defaultdict(int)
    for node in g.node:
        for name in node_reads(node):
            reads[name] += 1
    outputs = {o.name for o in g.output}
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        if (not t.graph and t.act and len(t.shape) == 2 and reads[t.weight] == 1 and t.weight not in outputs
                and (t.op == "Gemm" or (t.op == "MatMul" and t.weight_layout == "cols"))):
            groups[t.act].append(t)
    return dict(groups)


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
    g.initializer.append(numpy_helper.from_array((1.0 / scales).astype(np.float32), inv))
    names = {t.node: t for t in readers}
    first = min(i for i, n in enumerate(g.node) if n.name in names)
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        t = names.get(node.name)
        if t is None:
            continue
        node.input[0] = new
        m = to_matrix(tensor_array(inits[t.weight]).astype(np.float64), t.weight_layout)
        _replace_init(g, t.weight, from_matrix(m * scales[None, :], t.weight_layout, t.shape))
    node_name, i = f"{act}/smooth", 1
    while any(n.name == node_name for n in g.node):
        node_name, i = f"{act}/smooth_{i}", i + 1
    g.node.insert(first, onnx.helper.make_node("Mul", [act, inv], [new], name=node_name))
    return new
