"""Calibration through If branches: onnxruntime cannot return a value computed inside a
subgraph, so for calibration each sample runs a copy of the model in which every If it meets is
replaced by the branch its condition selects. Node and tensor names are kept, so statistics
gathered there belong to the layers of the original subgraphs."""

from __future__ import annotations

import onnx
from onnx import helper

from .walk import attr


def inline_ifs(model: onnx.ModelProto, choose: dict[str, bool]) -> onnx.ModelProto:
    """A copy where each main-graph If named in `choose` is replaced by its chosen branch,
    repeatedly, so Ifs exposed by an inlined branch are inlined too when named."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    while True:
        pos = next((i for i, n in enumerate(g.node) if n.op_type == "If" and n.name in choose), None)
        if pos is None:
            return m
        node = g.node[pos]
        branch = attr(node, "then_branch" if choose[node.name] else "else_branch")
        new = list(branch.node)
        for i, (src, dst) in enumerate(zip(branch.output, node.output)):
            if dst:
                new.append(helper.make_node("Identity", [src.name], [dst], name=f"{node.name}/out{i}"))
        g.initializer.extend(branch.initializer)
        rest = list(g.node[pos + 1:])
        del g.node[pos:]
        g.node.extend(new + rest)


def open_ifs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "If"]


def main_graph_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {i.name for i in g.input} | {t.name for t in g.initializer}
    for n in g.node:
        names.update(o for o in n.output if o)
    return names
