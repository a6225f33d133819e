"""Every node a conversion leaves running in float, with the reason, for the report: what the
user sees when they ask why part of the model did not get smaller or faster."""

from __future__ import annotations

import onnx

from ..plan.rules import SAME_SCALE_OPS, Rules
from .norms import REASON as NORM_REASON
from .norms import constant_names, normalisation_nodes
from .rotate import ROTATE_PREFIX, ROTATE_REASON
from .walk import graphs

SHAPE_OPS = frozenset({"Shape", "Size", "Range", "ConstantOfShape", "NonZero"})
KEPT_FLOAT = frozenset({"LayerNormalization", "InstanceNormalization", "Softmax", "LogSoftmax", "Erf", "Gelu"})


def _reason(node: onnx.NodeProto, rules: Rules, ins: list[str], quantized: set[str], outputs: set[str]) -> str:
    all_in = bool(ins) and all(i in quantized for i in ins)
    if node.op_type in KEPT_FLOAT and node.op_type not in rules.fused_ops:
        return "normalisation, softmax or GELU: kept float (quantized layers read its result through Q/DQ)"
    if not rules.output_units:
        if all_in and rules.add_inputs and node.op_type == "Add":
            return "reads Q/DQ inputs and adds in float (the runtime fuses it into the layer before it)"
        return f"no weights: the {rules.name} target quantizes the inputs of weight layers only"
    if node.op_type in SAME_SCALE_OPS:
        return "data movement on a float tensor"
    if node.op_type not in rules.fused_ops:
        return f"no quantized kernel for {node.op_type} under the {rules.name} target"
    if all_in and set(node.output) & outputs:
        return "its output is a graph output, kept float"
    return "not every activation input is quantized"


def float_nodes(model: onnx.ModelProto, done: set[str], quantized: set[str], rules: Rules
                ) -> list[tuple[str, str, str]]:
    """(node, op, reason) for each node of every graph that is neither in `done` (quantized or
    skipped layers, reported on their own) nor runs between quantized tensors (all its
    activation inputs and its output in `quantized`)."""
    out = []
    for _, g in graphs(model):
        consts = constant_names(g)
        norms = normalisation_nodes(g)
        outputs = {o.name for o in g.output}
        shapes: set[str] = set()
        for n in g.node:
            if n.name in done:
                continue
            ins = [i for i in n.input if i and i not in consts]
            if n.op_type == "Constant":
                continue                                         # a value, not a computation
            if n.name.startswith(ROTATE_PREFIX):
                out.append((n.name, n.op_type, ROTATE_REASON))
                continue
            if n.op_type in SHAPE_OPS or (ins and all(i in shapes for i in ins)):
                shapes.update(n.output)
                out.append((n.name, n.op_type, "shape or index arithmetic"))
                continue
            if ins and all(i in quantized for i in ins) and n.output and n.output[0] in quantized:
                continue                                         # runs on quantized tensors
            why = NORM_REASON if n.name in norms else _reason(n, rules, ins, quantized, outputs)
            out.append((n.name, n.op_type, why))
    return out
