"""Applies a Plan to a model: the only place that edits the graph.

Weights become int8 / int4 initializers behind a per-channel DequantizeLinear. Activations
that feed quantized layers get one QuantizeLinear -> DequantizeLinear pair, read only by those
layers; graph outputs, Concat and Add inputs are never forced onto a shared scale. Biases of
layers with quantized activations become int32 with scale s_x * s_w.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..types import ActQuant, LayerPlan, Plan
from .io import opset_of
from .prepare import prune_initializers
from .walk import graph_by_path


def needed_opset(plan: Plan) -> int:
    if any(lp.bits <= 4 for lp in plan.layers) or any(a.bits in (4, 16) for a in plan.acts.values()):
        return 21
    return 13 if plan.layers else 0


def weight_container(bits: int):
    return ml_dtypes.int4 if bits <= 4 else np.int8


def act_container(a: ActQuant):
    table = {(4, False): ml_dtypes.uint4, (4, True): ml_dtypes.int4, (8, False): np.uint8,
             (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}
    return table[(a.bits, a.signed)]


def _init(g: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _weight_nodes(g: onnx.GraphProto, lp: LayerPlan, bias_scale_x: float | None) -> list[onnx.NodeProto]:
    """Initializers and DQ nodes for one layer; rewires the layer's node. Returns new nodes."""
    t = lp.target
    node = next(n for n in g.node if n.name == t.node)
    dt = weight_container(lp.bits)
    pre = t.node
    nodes = []
    q = _init(g, f"{pre}/weight_q", lp.codes.astype(dt))
    s = _init(g, f"{pre}/weight_scale", lp.scales.astype(np.float32))
    z = _init(g, f"{pre}/weight_zero", np.zeros(lp.scales.shape, dtype=dt))
    nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [f"{pre}/weight_dq"],
                                  name=f"{pre}/weight_dequantize", axis=lp.axis))
    w_index = list(node.input).index(t.weight)
    node.input[w_index] = f"{pre}/weight_dq"
    bias = lp.bias
    if bias is None and t.bias is not None and bias_scale_x is not None:
        bias = numpy_helper.to_array(next(i for i in g.initializer if i.name == t.bias))
    if bias is None:
        return nodes
    per_channel = lp.axis == 0 and bias.shape == lp.scales.shape
    if bias_scale_x is not None and per_channel:
        bscale = (bias_scale_x * lp.scales).astype(np.float32)
        bq = np.clip(np.rint(bias.astype(np.float64) / bscale), -2**31, 2**31 - 1).astype(np.int32)
        bq_name = _init(g, f"{pre}/bias_q", bq)
        bs_name = _init(g, f"{pre}/bias_scale", bscale)
        bz_name = _init(g, f"{pre}/bias_zero", np.zeros(bq.shape, np.int32))
        nodes.append(helper.make_node("DequantizeLinear", [bq_name, bs_name, bz_name],
                                      [f"{pre}/bias_dq"], name=f"{pre}/bias_dequantize", axis=0))
        new_bias = f"{pre}/bias_dq"
    elif lp.bias is not None:
        new_bias = _init(g, f"{pre}/bias", lp.bias.astype(np.float32))
    else:
        return nodes
    if len(node.input) > 2:
        node.input[2] = new_bias
    else:
        node.input.append(new_bias)
    return nodes


def _act_nodes(g: onnx.GraphProto, act: str, base: str, a: ActQuant) -> list[onnx.NodeProto]:
    dt = act_container(a)
    s = _init(g, f"{base}/act_scale", np.array(a.scale, dtype=np.float32))
    z = _init(g, f"{base}/act_zero", np.array(a.zero_point).astype(dt))
    return [helper.make_node("QuantizeLinear", [act, s, z], [f"{base}/q"], name=f"{base}/quantize"),
            helper.make_node("DequantizeLinear", [f"{base}/q", s, z], [f"{base}/dq"],
                             name=f"{base}/dequantize")]


def apply_plan(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """Return a new model with `plan` applied (the input model is not modified)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graphs = graph_by_path(m)
    before: dict[str, dict[str, list[onnx.NodeProto]]] = {}   # graph -> node -> nodes to put first
    for lp in plan.layers:
        t = lp.target
        g = graphs[t.graph]
        a = plan.acts.get(t.act) if t.act else None
        new = _weight_nodes(g, lp, a.scale if a else None)
        before.setdefault(t.graph, {}).setdefault(t.node, []).extend(new)
    readers: dict[str, dict[str, str]] = {}          # graph -> node -> activation it reads
    for lp in plan.layers:
        if lp.target.act in plan.acts:
            readers.setdefault(lp.target.graph, {})[lp.target.node] = lp.target.act
    for path, by_node in readers.items():
        g = graphs[path]
        done: dict[str, str] = {}
        for node in g.node:
            act = by_node.get(node.name)
            if act is None:
                continue
            if act not in done:
                # inside a subgraph the pair's names carry the reader's name: sibling branches
                # may read the same outer tensor
                base = act if not path else f"{act}/{node.name}"
                before.setdefault(path, {}).setdefault(node.name, [])[:0] = \
                    _act_nodes(g, act, base, plan.acts[act])
                done[act] = f"{base}/dq"
            for i, inp in enumerate(node.input):
                if inp == act:
                    node.input[i] = done[act]
    for path, extra in before.items():
        g = graphs[path]
        order = []
        for node in g.node:
            order.extend(extra.get(node.name, ()))
            order.append(node)
        del g.node[:]
        g.node.extend(order)
    prune_initializers(m)
    return m


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Raise the default-domain opset to `target` (never lowers it)."""
    from onnx import version_converter

    from ..errors import InputModelError

    current = opset_of(model)
    if current >= target:
        return model
    try:
        out = version_converter.convert_version(model, target)
    except Exception as e:
        raise InputModelError(f"cannot upgrade the model from opset {current} to {target} "
                              f"(needed for {'int4 weights' if target >= 21 else 'per-channel QDQ'}): "
                              f"{str(e).splitlines()[0][:160]}; try --bits 8") from None
    if target >= 21:
        out.ir_version = max(out.ir_version, 10)
    return out
