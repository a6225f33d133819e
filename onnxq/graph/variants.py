"""Measurement copies of a model: extra graph outputs for calibration, weights turned into
graph inputs so one session tries many weight variants, activation QDQ without weight QDQ."""

from __future__ import annotations

from typing import Sequence

import onnx
from onnx import helper

from ..types import ActQuant
from .prepare import drop_initializers
from .rewrite import act_pairs, place
from .walk import graph_by_path


def augmented(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy that also returns the tensors `names` as graph outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


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
