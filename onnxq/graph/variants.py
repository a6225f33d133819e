"""Measurement copies of a model: extra graph outputs for calibration, weights turned into
graph inputs so one session tries many weight variants, activation QDQ without weight QDQ."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from ..types import ActQuant
from .kernels import add_initializer, set_bias
from .prepare import drop_initializers
from .rewrite import act_pairs, place
from .walk import graph_by_path, node_reads


def augmented(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy that also returns the tensors `names` as graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def pruned(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose graph outputs are `names` and whose main graph keeps only the nodes they
    depend on (onnxruntime runs every node of a session, whatever the run asks for)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep, _ = _upstream(model, names, {})
    del g.node[:]
    g.node.extend(keep)
    del g.output[:]
    g.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return m


def signature(model: onnx.ModelProto) -> tuple[set[bytes], dict[str, bytes]]:
    """What changed_tensors compares a later version of the model with: each main-graph node, and
    a digest of each initializer."""
    nodes = {n.SerializeToString() for n in model.graph.node}
    inits = {t.name: hashlib.blake2b(t.SerializeToString(), digest_size=16).digest() for t in model.graph.initializer}
    return nodes, inits


def changed_tensors(before: tuple[set[bytes], dict[str, bytes]], model: onnx.ModelProto,
                    now: tuple[set[bytes], dict[str, bytes]] | None = None) -> set[str]:
    """Main-graph tensors of `model` whose values may differ from those of the model `before` is the
    signature of, on the same input: initializers that differ, and the outputs of every node that
    is new, changed, or reads a changed tensor. `now`: the model's own signature, if known."""
    nodes, inits = before
    now_inits = (now or signature(model))[1]
    changed = {k for k, d in now_inits.items() if inits.get(k) != d}
    for node in model.graph.node:
        if node.SerializeToString() not in nodes or node_reads(node) & changed:
            changed.update(o for o in node.output if o)
    return changed


def cut(model: onnx.ModelProto, wanted: Sequence[str], given: dict[str, np.dtype]) -> onnx.ModelProto:
    """A model computing `wanted` with the tensors `given` (name -> dtype) fed as graph inputs of
    any shape: only the main-graph nodes between them, only the initializers those read. Tensors
    that are not given nor computed by a node come from the model's inputs and initializers. Its
    outputs: the wanted tensors, then those of its nodes' outputs that a node left out reads."""
    keep, rest = _upstream(model, wanted, given)
    reads = set().union(*(node_reads(n) for n in keep)) if keep else set()
    later = set().union(*(node_reads(n) for n in rest)) if rest else set()
    made = [o for n in keep for o in n.output if o in later and o not in wanted]
    src = model.graph
    # built from the pieces it keeps: a copy of the whole model would copy every weight each stage
    g = onnx.GraphProto(name=src.name, node=keep, value_info=src.value_info,
                        sparse_initializer=src.sparse_initializer,
                        initializer=[t for t in src.initializer if t.name in reads and t.name not in given],
                        input=[i for i in src.input if i.name in reads and i.name not in given])
    g.input.extend(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(np.dtype(d)), None)
                   for k, d in given.items() if k in reads)
    g.output.extend(helper.make_empty_tensor_value_info(w) for w in [*(w for w in wanted if w not in given), *made])
    return onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=g,
                           functions=model.functions)


def _upstream(model: onnx.ModelProto, wanted: Sequence[str], given) -> tuple[list, list]:
    """The main-graph nodes (in graph order) that `wanted` needs when the tensors `given` are
    known, and the others."""
    needed = {w for w in wanted if w not in given}
    keep, rest = [], []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= {r for r in node_reads(node) if r not in given}
        else:
            rest.append(node)
    return keep[::-1], rest[::-1]


def weights_as_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy whose main-graph initializers `names` are graph inputs instead (same name, type
    and shape), so one onnxruntime session can try many weight variants."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    wanted = set(names)
    moved = []
    for i, t in enumerate(m.graph.initializer):
        if t.name in wanted:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            moved.append(i)
    drop_initializers(m.graph, moved)
    return m


def with_zero_biases(model: onnx.ModelProto, biases: dict[str, tuple[str, int]]) -> onnx.ModelProto:
    """A copy in which the main-graph nodes of `biases` (node name -> (bias name, output
    channels)), Conv/ConvTranspose/Gemm that read no bias, read a zero bias initializer of that
    name: a probe can then feed the bias a layer's plan gives them (the emitted model adds it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.name in biases:
            name, channels = biases[node.name]
            set_bias(node, add_initializer(m.graph, name, np.zeros(channels, np.float32)))
    return m


def with_act_qdq(model: onnx.ModelProto, targets, acts: dict[str, ActQuant]) -> onnx.ModelProto:
    """A new model with only the activation QDQ pairs the targets read; weights stay float
    initializers (so a probe can still feed them as inputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graphs = graph_by_path(m)
    before: dict[str, dict[str, list[onnx.NodeProto]]] = {}
    act_pairs(graphs, targets, acts, before)
    place(graphs, before, {})
    return m


def cut_names(model: onnx.ModelProto, start: int) -> list[str]:
    """The tensors made by the main graph's nodes before `start` that nodes from `start` on
    read: what a tail from `start` needs fed besides the graph's own inputs."""
    g = model.graph
    before = {o for n in g.node[:start] for o in n.output if o}
    reads = set().union(*(node_reads(n) for n in g.node[start:]))
    return sorted(before & reads)


def tail(model: onnx.ModelProto, start: int, cut: dict) -> onnx.ModelProto:
    """The main graph from node `start` on as a model of its own: its inputs are the graph
    inputs it reads and the cut tensors (`cut`: cut_names -> numpy dtype), it keeps the
    initializers it reads and returns the graph outputs it computes."""
    g = model.graph
    nodes = g.node[start:]
    reads = set().union(*(node_reads(n) for n in nodes))
    made = {o for n in nodes for o in n.output if o}
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    t = m.graph
    t.name = g.name
    t.node.extend(nodes)
    t.input.extend(i for i in g.input if i.name in reads)
    t.input.extend(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(d)), None)
                   for n, d in cut.items())
    t.initializer.extend(i for i in g.initializer if i.name in reads)
    t.sparse_initializer.extend(i for i in g.sparse_initializer if i.values.name in reads)
    t.output.extend(o for o in g.output if o.name in made)
    t.value_info.extend(v for v in g.value_info if v.name in made)
    return m


def mask_name(act: str) -> str:
    return f"{act}/mask"


def with_act_masks(model: onnx.ModelProto, acts: Sequence[str]) -> onnx.ModelProto:
    """A copy of a quantized model in which each main-graph activation of `acts` that has a Q/DQ
    pair is read as x + m * (DQ(Q(x)) - x), m a scalar graph input (mask_name): 1 is the model
    as emitted, 0 the tensor left unrounded. One session then measures the network with any
    subset of its activations unrounded."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    wanted = {f"{a}/dq": a for a in acts}
    nodes = []
    for node in g.node:
        nodes.append(node)
        act = wanted.get(node.output[0]) if node.op_type == "DequantizeLinear" and node.output else None
        if act is None:
            continue
        node.output[0] = f"{act}/dq_rounded"
        g.input.append(helper.make_tensor_value_info(mask_name(act), onnx.TensorProto.FLOAT, []))
        nodes += [helper.make_node("Sub", [f"{act}/dq_rounded", act], [f"{act}/dq_error"], name=f"{act}/mask_sub"),
                  helper.make_node("Mul", [f"{act}/dq_error", mask_name(act)], [f"{act}/dq_kept"],
                                   name=f"{act}/mask_mul"),
                  helper.make_node("Add", [act, f"{act}/dq_kept"], [f"{act}/dq"], name=f"{act}/mask_add")]
    del g.node[:]
    g.node.extend(nodes)
    return m
