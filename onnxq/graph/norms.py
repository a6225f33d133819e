"""Hand-decomposed normalisations (LayerNorm, RMSNorm, instance norm, softmax written as Reduce* /
Sub / Pow / Sqrt / Div chains): their statistics are per-row scalars, and a shared 8-bit scale for a
mean or a variance would shift or rescale every value it normalises. The nodes found here never
get Q/DQ pairs; only the normalised result may, where a quantized layer reads it."""

from __future__ import annotations

import onnx

from .walk import attr

REDUCES = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceMax"})
# element-wise ops that keep a statistic a statistic when their other inputs are constants
STAT_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Max", "Clip", "Cast"})
# ops that apply a statistic to the tensor it was taken from (centre or scale it)
APPLY_OPS = frozenset({"Sub", "Div", "Mul"})
REASON = "inside a hand-decomposed normalisation (its statistics stay float)"


def constant_names(g: onnx.GraphProto) -> set[str]:
    """Initializers and Constant nodes' outputs of g."""
    names = {t.name for t in g.initializer}
    names.update(o for n in g.node if n.op_type == "Constant" for o in n.output)
    return names


def _squares(node: onnx.NodeProto | None) -> bool:
    """Pow(x, 2) or Mul(x, x): the square a variance is the mean of."""
    if node is None:
        return False
    return node.op_type == "Pow" or (node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1])


def normalisation_nodes(g: onnx.GraphProto) -> set[str]:
    """Names of the nodes of every decomposed normalisation in `g`: the reductions, the chain that
    turns them into a statistic (eps, square root, reciprocal), the squares they average, and the
    Sub/Div/Mul that apply a statistic to a full tensor. A reduction whose result never meets a
    full tensor again (a global pool feeding a layer) is not one."""
    consts = constant_names(g)
    producer = {o: n for n in g.node for o in n.output if o}
    stat: dict[str, set[str]] = {}      # statistic tensor -> the nodes that made it
    found: set[str] = set()
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type in REDUCES and attr(node, "keepdims", 1) and ins:
            made = {node.name}
            src = producer.get(ins[0])
            if _squares(src):
                made.add(src.name)
            stat[node.output[0]] = made
            continue
        stats = [i for i in ins if i in stat]
        if not stats:
            continue
        if node.op_type in STAT_OPS and all(i in stat or i in consts for i in ins):
            stat[node.output[0]] = set().union(*(stat[i] for i in stats)) | {node.name}
        elif node.op_type in APPLY_OPS and len(ins) == 2 and len(stats) == 1:
            found |= stat[stats[0]] | {node.name}
    return found
