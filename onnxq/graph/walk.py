"""Walking a model's main graph and every control-flow subgraph (If / Loop / Scan bodies)."""

from __future__ import annotations

from typing import Iterator

import onnx


def graphs(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(path, graph) for the main graph ("") and every nested subgraph, parents first."""
    return graphs_in(model.graph)


def graphs_in(root: onnx.GraphProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(path, graph) for `root` ("") and every subgraph nested in it, parents first."""
    stack: list[tuple[str, onnx.GraphProto]] = [("", root)]
    while stack:
        path, g = stack.pop(0)
        yield path, g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((f"{path}{node.name}/{attr.name}/", attr.g))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for i, sub in enumerate(attr.graphs):
                        stack.append((f"{path}{node.name}/{attr.name}[{i}]/", sub))


LOOP_OPS = ("Loop", "Scan")


def loop_scopes(model: onnx.ModelProto) -> set[str]:
    """Paths of the subgraphs that run inside a Loop or Scan body (at any depth)."""
    out: set[str] = set()
    stack: list[tuple[onnx.GraphProto, str, bool]] = [(model.graph, "", False)]
    while stack:
        g, path, inside = stack.pop()
        if inside:
            out.add(path)
        for node in g.node:
            loop = inside or node.op_type in LOOP_OPS
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((attr.g, f"{path}{node.name}/{attr.name}/", loop))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for i, sub in enumerate(attr.graphs):
                        stack.append((sub, f"{path}{node.name}/{attr.name}[{i}]/", loop))
    return out


def graph_by_path(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    return dict(graphs(model))


def deepest_first(paths) -> list[str]:
    """Graph paths with subgraphs before their parents: rewriting a graph's node list copies the
    If/Loop nodes it holds, and with them their subgraphs, so a subgraph rewritten after its
    parent would be a detached copy."""
    return sorted(paths, key=lambda p: (-len(p), p))


def used_names(g: onnx.GraphProto) -> set[str]:
    """Every tensor name read inside g, its subgraphs included (outer-scope references)."""
    names: set[str] = {o.name for o in g.output}
    for node in g.node:
        names |= node_reads(node)
    return names


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node reads, outer-scope names read by its subgraphs included."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            names |= used_names(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for sub in a.graphs:
                names |= used_names(sub)
    return names


def fixed_names(g: onnx.GraphProto) -> set[str]:
    """Names a rewrite of g must keep: its outputs and what its nodes' subgraphs read from it."""
    return {o.name for o in g.output} | {x for n in g.node for x in node_reads(n) if x not in n.input}


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def initializer_bytes(model: onnx.ModelProto, marker: str) -> int:
    """Serialized bytes of every initializer whose name contains `marker`, in every graph."""
    return sum(t.ByteSize() for _, g in graphs(model) for t in g.initializer if marker in t.name)


def _inferred_values(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Main-graph value infos after shape inference (best effort: a model it fails on, e.g. one
    over the protobuf limit, gives the inputs' and outputs' only)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    return list(g.value_info) + list(g.input) + list(g.output)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every main-graph tensor that shape inference can type."""
    return {v.name: v.type.tensor_type.elem_type for v in _inferred_values(model)}


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every main-graph tensor whose rank shape inference knows."""
    return {v.name: len(v.type.tensor_type.shape.dim) for v in _inferred_values(model)
            if v.type.tensor_type.HasField("shape")}
