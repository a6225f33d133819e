"""Applies a Plan to a model: the only place that edits the graph.

Weights become int8 / int4 initializers (8-bit ones uint8 with zero point 128 where the target
says so: Rules.u8_weights) behind a per-channel DequantizeLinear. Activations
that feed quantized layers get one QuantizeLinear -> DequantizeLinear pair, read only by those
layers; graph outputs, Concat and Add inputs are never forced onto a shared scale. Biases of
layers with quantized activations become int32 with scale s_x * s_w.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from ..algos.matrix import from_matrix
from ..algos.qmath import container_bits
from ..plan.rules import ABSORBED_OPS, RULES, SAME_SCALE_OPS, U8_WEIGHT_OPS, Rules, float_input, target_rules
from ..plan.biases import weight_only
from ..plan.hot import map_dtype
from ..types import ActQuant, CodedBiases, LayerPlan, Plan
from .hardswish import integer_hard_swish
from .hardswish_channels import integer_channel_hard_swish
from .pads import pads_on_codes
from .matmuls import gemms_as_matmuls
from .tables import lookups_on_codes
from .kernels import DOMAIN, add_initializer, declare_domain, dedupe_weights, gather_blocks, matmul_nbits, set_bias
from .prepare import prune_initializers
from .walk import deepest_first, graph_by_path


def weight_container(bits: int, op: str = "Conv", rules: Rules = RULES["generic"], unsigned: bool = False):
    """INT4 for 2-4-bit codes where the target's rules allow it, else INT8 (UINT4 / UINT8 for
    codes on affine grids, stored with their zero points added)."""
    int4 = rules.int4_conv if op in ("Conv", "ConvTranspose") else rules.int4_matmul
    if container_bits(bits) == 4 and int4:
        return ml_dtypes.uint4 if unsigned else ml_dtypes.int4
    return np.uint8 if unsigned else np.int8


U8_ZERO = 128     # the zero point of 8-bit weights stored as UINT8: codes + 128, the same values


def u8_weights(rules: Rules, op: str, bits: int, w_index: int) -> bool:
    """8-bit codes of a weight onnxruntime may run in an integer kernel, stored in UINT8 with zero
    point 128 (Rules.u8_weights). Only as the op's second input (a conv's always is): a MatMul
    weight as the first would be the kernel's activation side, whose zero point must be one value.
    The layers' weights and the low-rank branches' first factors both follow it. Blocked 8-bit
    weights do not (_weight_nodes): they are weight-only, where onnxruntime runs DequantizeLinear
    -> MatMul as MatMulNBits either way, and UINT8 would need a zero point of 128 a block
    (a 3-layer MiniLM cut W8A8 19.74 -> 19.41 MB, the same output: docs/results.md round 42)."""
    return rules.u8_weights and bits == 8 and op in U8_WEIGHT_OPS and w_index == 1


def act_container(a: ActQuant):
    """Activations below 8 bits live in 8-bit containers behind a Clip to their narrow code
    range (onnxruntime rejects uint4 activations once it fuses QDQ into integer kernels)."""
    if a.bits <= 8:
        return np.int8 if a.signed else np.uint8
    return np.int16 if a.signed else np.uint16


def _int32_names(base: str) -> list[str]:
    """Initializer names of an int32 bias (codes, scales; see _int32_dq)."""
    return [f"{base}_q", f"{base}_scale"]


def _int32_dq(g: onnx.GraphProto, base: str, coded: tuple[np.ndarray, np.ndarray]) -> tuple[str, onnx.NodeProto]:
    """An int32 bias as initializers behind a per-channel DQ -> (the float tensor's name, the node)."""
    q, s = _int32_names(base)
    add_initializer(g, q, coded[0])
    add_initializer(g, s, coded[1])
    z = add_initializer(g, f"{base}_zero", np.zeros(coded[0].shape, np.int32))
    return f"{base}_dq", helper.make_node("DequantizeLinear", [q, s, z], [f"{base}_dq"],
                                          name=f"{base}_dequantize", axis=0)


def _bias_base(lp: LayerPlan) -> str:
    return f"{lp.target.node}/bias"


def _branch_bias_base(lp: LayerPlan) -> str:
    return f"{lp.target.node}/residual/A_bias"


def bias_param_values(lp: LayerPlan, coded: CodedBiases) -> dict[str, np.ndarray]:
    """The initializers of a layer whose values follow its input's scale, by name: the int32
    biases of the layer and of its branch's A. A range search feeds these with every trial scale."""
    out: dict[str, np.ndarray] = {}
    if coded.layer is not None:
        out.update(zip(_int32_names(_bias_base(lp)), (coded.layer.bias_codes, coded.layer.bias_scales)))
    if coded.branch is not None:
        out.update(zip(_int32_names(_branch_bias_base(lp)), coded.branch))
    return out


def _weight_nodes(g: onnx.GraphProto, lp: LayerPlan, coded: CodedBiases, rules: Rules) -> list[onnx.NodeProto]:
    """Initializers and DQ nodes for one layer; rewires the layer's node. Returns new nodes."""
    t = lp.target
    node = next(n for n in g.node if n.name == t.node)
    bias, as_int32 = coded.float_bias, coded.layer
    if rules.ms_kernels and as_int32 is None and _ms_kernel(g, node, lp, bias, rules):
        return []
    affine = lp.zero_points is not None and as_int32 is None
    dt = weight_container(lp.bits, t.op, rules, affine)
    pre = t.node
    nodes = []
    codes, scales = (lp.codes, lp.scales) if as_int32 is None else (as_int32.codes, as_int32.scales)
    w_index = list(node.input).index(t.weight)
    zeros = lp.zero_points if affine else np.zeros(scales.shape, dtype=np.int8)
    if lp.block and t.weight_layout == "cols":     # scales [O, K / block] stored along the weight's [K, O]
        scales, zeros = scales.T, zeros.T
    if affine:                                     # codes are relative to their block's zero point
        codes = codes.astype(np.int16) + np.repeat(zeros, lp.block, axis=lp.axis)
    elif not lp.block and u8_weights(rules, t.op, lp.bits, w_index):  # the same values, u8 x u8 kernels
        dt, codes, zeros = np.uint8, codes.astype(np.int16) + U8_ZERO, np.full(zeros.shape, U8_ZERO, np.int16)
    q = add_initializer(g, f"{pre}/weight_q", codes.astype(dt))
    half = lp.half_scales                          # float16 scales: the DQ's output is cast to float
    s = add_initializer(g, f"{pre}/weight_scale", scales.astype(np.float16 if half else np.float32))
    ins = [q, s]
    if affine or not lp.block:     # symmetric blocks' zero points (one a block) would all be 0: left out
        ins.append(add_initializer(g, f"{pre}/weight_zero", zeros.astype(dt)))
    blocked = {"block_size": lp.block} if lp.block else {}
    dq_out = f"{pre}/weight_dq16" if half else f"{pre}/weight_dq"
    nodes.append(helper.make_node("DequantizeLinear", ins, [dq_out],
                                  name=f"{pre}/weight_dequantize", axis=lp.axis, **blocked))
    if half:
        nodes.append(helper.make_node("Cast", [dq_out], [f"{pre}/weight_dq"], name=f"{pre}/weight_cast",
                                      to=onnx.TensorProto.FLOAT))
    node.input[w_index] = f"{pre}/weight_dq"
    if bias is None:
        return nodes
    if as_int32 is not None:
        new_bias, dq = _int32_dq(g, _bias_base(lp), (as_int32.bias_codes, as_int32.bias_scales))
        nodes.append(dq)
    elif lp.bias is not None:
        new_bias = add_initializer(g, _bias_base(lp), lp.bias.astype(np.float32))
    else:
        return nodes
    set_bias(node, new_bias)
    return nodes


def _ms_kernel(g: onnx.GraphProto, node: onnx.NodeProto, lp: LayerPlan, bias, rules: Rules) -> bool:
    """onnxruntime's own kernel for a table or a float-input 4-bit Gemm/MatMul, where it fits."""
    if lp.target.op == "Gather":
        return gather_blocks(g, node, lp)
    return float_input(rules, lp.target, lp.bits) and matmul_nbits(g, node, lp, bias)


def _act_nodes(g: onnx.GraphProto, act: str, base: str, a: ActQuant) -> list[onnx.NodeProto]:
    vals = act_param_values(base, a)
    for name, v in vals.items():
        add_initializer(g, name, v)
    s, z = f"{base}/act_scale", f"{base}/act_zero"
    nodes = []
    if a.bits < 8:
        nodes.append(helper.make_node("Clip", [act, f"{base}/clip_lo", f"{base}/clip_hi"],
                                      [f"{base}/clipped"], name=f"{base}/clip"))
        act = f"{base}/clipped"
    return nodes + [helper.make_node("QuantizeLinear", [act, s, z], [f"{base}/q"], name=f"{base}/quantize"),
                    helper.make_node("DequantizeLinear", [f"{base}/q", s, z], [f"{base}/dq"],
                                     name=f"{base}/dequantize")]


def apply_plan(model: onnx.ModelProto, plan: Plan, masks: bool = False) -> onnx.ModelProto:
    """Return a new model with `plan` applied (the input model is not modified). The plan's
    biases must be coded for its activation scales (plan/biases.code_biases). `masks`: for a
    session that unrounds activations one by one (graph/variants.with_act_masks), every
    activation keeps its own DQ and its float value: DQ -> Pad -> Q units stay (the same values)
    and integer HardSwish units keep the float HardSwish beside them."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graphs = graph_by_path(m)
    rules = target_rules(plan.target, plan.u8_weights)
    before: dict[str, dict[str, list[onnx.NodeProto]]] = {}   # graph -> node -> nodes to put first
    hot = [_hot_lookup(graphs[lp.target.graph], lp) for lp in plan.layers if lp.hot is not None]
    for lp in plan.layers + hot:
        t = lp.target
        g = graphs[t.graph]
        new = _weight_nodes(g, lp, plan.biases.get(t.node, NO_BIASES), rules)
        before.setdefault(t.graph, {}).setdefault(t.node, []).extend(new)
    targets = [lp.target for lp in plan.layers if not weight_only(plan, lp)]
    if rules.all_readers:
        _shared_pairs(graphs[""], plan.acts, {t.node for t in targets if not t.graph}, rules, before)
        targets = [t for t in targets if t.graph]
    act_pairs(graphs, targets, plan.acts, before, plan.readers)
    after: dict[str, dict[str, list[onnx.NodeProto]]] = {}
    for lp in plan.layers:
        if lp.branch is not None:
            g = graphs[lp.target.graph]
            after.setdefault(lp.target.graph, {})[lp.target.node] = _branch_nodes(g, lp, plan.biases[lp.target.node], rules)
    place(graphs, before, after)
    if rules.int_hard_swish:
        integer_hard_swish(m, keep_float=masks)
        integer_channel_hard_swish(m, rules.u8_weights, keep_float=masks)
    if rules.int_pad and not masks:
        pads_on_codes(m)
    declare_domain(m, graphs)
    dedupe_weights(m)
    if rules.matmul_gemms:
        gemms_as_matmuls(m)
    if rules.table_codes:
        lookups_on_codes(m)
    prune_initializers(m)
    return m


NO_BIASES = CodedBiases(None, None)


def _hot_lookup(g: onnx.GraphProto, lp: LayerPlan) -> LayerPlan:
    """A table's hot rows (plan/hot.py): its lookup's output becomes Gather(table, ids) +
    Gather(residual, Gather(map, ids)), the nodes put right after the lookup. -> the residual
    table's plan, whose Gather is then emitted as any table's."""
    t, hot = lp.target, lp.hot
    node = next(n for n in g.node if n.name == t.node)
    pre, y, ids = f"{t.node}/hot", node.output[0], node.input[1]
    node.output[0] = f"{pre}/cold"
    index = np.zeros(t.shape[0], map_dtype(len(hot.rows)))
    index[hot.rows] = np.arange(1, len(hot.rows) + 1)
    mp = add_initializer(g, f"{pre}/map", index)
    mk = helper.make_node
    nodes = [mk("Gather", [mp, ids], [f"{pre}/index_stored"], name=f"{pre}/map_lookup", axis=0),
             mk("Cast", [f"{pre}/index_stored"], [f"{pre}/index"], name=f"{pre}/index_cast", to=onnx.TensorProto.INT64),
             mk("Gather", [hot.plan.target.weight, f"{pre}/index"], [f"{pre}/residual"], name=hot.plan.target.node,
                axis=0),
             mk("Add", [f"{pre}/cold", f"{pre}/residual"], [y], name=f"{pre}/add")]
    at = list(g.node).index(node) + 1
    for i, n in enumerate(nodes):
        g.node.insert(at + i, n)
    return hot.plan


def act_pairs(graphs, targets, acts: dict[str, ActQuant], before, extra: dict[str, list[str]] | None = None) -> None:
    """Inserts (into `before`) one Q/DQ pair per activation that quantized targets (and the
    main-graph nodes in `extra`) read, and rewires those readers."""
    readers: dict[str, dict[str, list[str]]] = {}          # graph -> node -> activations it reads
    for t in targets:
        if t.act in acts:
            readers.setdefault(t.graph, {})[t.node] = [t.act]
    for node, tensors in (extra or {}).items():
        readers.setdefault("", {}).setdefault(node, []).extend(a for a in tensors if a in acts)
    for path, by_node in readers.items():
        g = graphs[path]
        done: dict[str, str] = {}
        for node in g.node:
            for act in by_node.get(node.name, ()):
                _read_pair(g, path, node, act, acts, done, before)


def _read_pair(g, path: str, node, act: str, acts, done: dict[str, str], before) -> None:
    """`node` reads the DQ of `act` (the pair made before its first reader in this graph)."""
    if act not in done:
        # inside a subgraph the pair's names carry the reader's name: sibling branches may read
        # the same outer tensor
        base = act if not path else f"{act}/{node.name}"
        before.setdefault(path, {}).setdefault(node.name, [])[:0] = _act_nodes(g, act, base, acts[act])
        done[act] = f"{base}/dq"
    for i, inp in enumerate(node.input):
        if inp == act:
            node.input[i] = done[act]


def _shared_pairs(g: onnx.GraphProto, acts: dict[str, ActQuant], layers: set[str], rules: Rules, before) -> None:
    """One Q/DQ pair per quantized main-graph tensor, put before its first reader. Quantized
    readers (the layers; fused and data-movement ops whose own output is quantized) read the DQ;
    so does every reader of a tensor a node unit produces (its producer's only reader is then the
    Q). Other readers of a float op's output keep the float tensor (a residual stream, a Shape)."""
    unit_ops = rules.fused_ops | SAME_SCALE_OPS | ABSORBED_OPS
    reader_ops = rules.fused_ops | SAME_SCALE_OPS      # quantized readers when their output is
    produced_by_unit = {y for n in g.node for y in n.output
                        if (n.name in layers and n.op_type in rules.unit_ops) or n.op_type in unit_ops}
    done: dict[str, str] = {}
    for node in g.node:
        if node.domain == DOMAIN:       # onnxruntime's weight kernels read float
            continue
        quantized_reader = node.name in layers or (node.op_type in reader_ops
                                                   and bool(node.output) and node.output[0] in acts)
        for i, inp in enumerate(node.input):
            a = acts.get(inp)
            if a is None or not (quantized_reader or inp in produced_by_unit):
                continue
            if inp not in done:
                before.setdefault("", {}).setdefault(node.name, []).extend(_act_nodes(g, inp, inp, a))
                done[inp] = f"{inp}/dq"
            node.input[i] = done[inp]


def place(graphs, before, after) -> None:
    """Puts the new nodes of each graph right before / after the node they belong to."""
    for path in deepest_first(set(before) | set(after)):
        g = graphs[path]
        order = []
        for node in g.node:
            order.extend(before.get(path, {}).get(node.name, ()))
            order.append(node)
            order.extend(after.get(path, {}).get(node.name, ()))
        del g.node[:]
        g.node.extend(order)


def _factor(g: onnx.GraphProto, name: str, value: np.ndarray, codes, scales, axis: int,
            shape: tuple[int, ...], bits: int, u8: bool = False) -> tuple[str, list[onnx.NodeProto]]:
    """A branch factor as a float initializer, or int8/int16 codes behind a per-channel DQ
    (`u8`: the codes as UINT8 with zero point 128, as u8_weights decides for the layers)."""
    if codes is None:
        return add_initializer(g, name, value.reshape(shape).astype(np.float32)), []
    dt, zero = (np.uint8, U8_ZERO) if u8 else (np.int8 if bits <= 8 else np.int16, 0)
    q = add_initializer(g, f"{name}_q", (codes.reshape(shape).astype(np.int32) + zero).astype(dt))
    s = add_initializer(g, f"{name}_scale", scales.astype(np.float32))
    z = add_initializer(g, f"{name}_zero", np.full(scales.shape, zero, dt))
    return f"{name}_dq", [helper.make_node("DequantizeLinear", [q, s, z], [f"{name}_dq"],
                                           name=f"{name}_dequantize", axis=axis)]


def _branch_a_bias(g: onnx.GraphProto, lp: LayerPlan, coded: CodedBiases) -> tuple[str, list[onnx.NodeProto]]:
    """A centred branch's A bias: int32 codes behind a DQ when the branch is integer, else float."""
    if coded.branch is None:
        return add_initializer(g, _branch_bias_base(lp), lp.branch.a_bias.astype(np.float32)), []
    name, dq = _int32_dq(g, _branch_bias_base(lp), coded.branch)
    return name, [dq]


def _branch_nodes(g: onnx.GraphProto, lp: LayerPlan, coded: CodedBiases, rules: Rules) -> list[onnx.NodeProto]:
    """y = main(x) + B(A(x) + c): renames the layer's output and returns the branch nodes (c, the
    A bias of a centred branch, only on layers whose bias is corrected — Conv and Gemm, whose A
    is a Conv / Gemm)."""
    t, br = lp.target, lp.branch
    node = next(n for n in g.node if n.name == t.node)
    pre = f"{t.node}/residual"
    y = node.output[0]
    node.output[0] = f"{pre}/main_out"
    act_index = 1 if (t.op == "MatMul" and t.weight_layout == "rows") else 0
    x = node.input[act_index]
    u8 = u8_weights(rules, t.op, br.bits, 1)    # for the A factors that are the op's second input (not rows MatMul)
    nodes: list[onnx.NodeProto] = []
    a_bias = []
    if br.a_bias is not None:
        bias_name, nodes = _branch_a_bias(g, lp, coded)
        a_bias = [bias_name]
    r = br.rank
    o = br.b.shape[0]
    if t.op in ("Conv", "ConvTranspose"):   # A: the layer's own op C -> r, B: 1x1 Conv r -> O
        k = tuple(t.shape[2:])
        if t.op == "Conv":
            a_shape, a_axis = (r, t.shape[1]) + k, 0
            a_val, a_codes = br.a, br.a_codes
            kept = ("strides", "pads", "dilations", "auto_pad", "kernel_shape")
        else:                               # ConvTranspose weights are [C, r, *k]
            a_shape, a_axis = (t.shape[0], r) + k, 1
            a_val = from_matrix(br.a, "convT", a_shape)
            a_codes = None if br.a_codes is None else from_matrix(br.a_codes, "convT", a_shape)
            kept = tuple(a.name for a in node.attribute if a.name != "group")
        a_name, n1 = _factor(g, f"{pre}/A_weight", a_val, a_codes, br.a_scales, a_axis, a_shape, br.bits, u8)
        b_name, n2 = _factor(g, f"{pre}/B_weight", br.b, br.b_codes, br.b_scales, 0, (o, r) + (1,) * len(k), br.bits)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in kept}
        first = helper.make_node(t.op, [x, a_name] + a_bias, [f"{pre}/A_out"], name=f"{pre}/A", **attrs)
        second = lambda m: helper.make_node("Conv", [m, b_name], [f"{pre}/B_out"], name=f"{pre}/B")  # noqa: E731
    elif t.weight_layout == "rows" and t.op == "MatMul":          # Y = W @ X: B @ (A @ X)
        a_name, n1 = _factor(g, f"{pre}/A_weight", br.a, br.a_codes, br.a_scales, 0, br.a.shape, br.bits)
        b_name, n2 = _factor(g, f"{pre}/B_weight", br.b, br.b_codes, br.b_scales, 0, br.b.shape, br.bits)
        first = helper.make_node("MatMul", [a_name, x], [f"{pre}/A_out"], name=f"{pre}/A")
        second = lambda m: helper.make_node("MatMul", [b_name, m], [f"{pre}/B_out"], name=f"{pre}/B")  # noqa: E731
    else:                                                  # Y = X @ W^T: (X @ A^T) @ B^T
        a_name, n1 = _factor(g, f"{pre}/A_weight", br.a.T, None if br.a_codes is None else br.a_codes.T,
                             br.a_scales, 1, br.a.T.shape, br.bits, u8)
        b_name, n2 = _factor(g, f"{pre}/B_weight", br.b.T, None if br.b_codes is None else br.b_codes.T,
                             br.b_scales, 1, br.b.T.shape, br.bits)
        first = (helper.make_node("Gemm", [x, a_name] + a_bias, [f"{pre}/A_out"], name=f"{pre}/A")
                 if a_bias else helper.make_node("MatMul", [x, a_name], [f"{pre}/A_out"], name=f"{pre}/A"))
        second = lambda m: helper.make_node("MatMul", [m, b_name], [f"{pre}/B_out"], name=f"{pre}/B")  # noqa: E731
    nodes += n1 + n2 + [first]
    mid = f"{pre}/A_out"
    if br.mid is not None:
        nodes += _act_nodes(g, mid, f"{pre}/mid", br.mid)
        mid = f"{pre}/mid/dq"
    nodes += [second(mid), helper.make_node("Add", [f"{pre}/main_out", f"{pre}/B_out"], [y], name=f"{pre}/add")]
    return nodes


def act_param_names(act: str, a: ActQuant) -> list[str]:
    """Initializer names of one main-graph activation's QDQ parameters (see _act_nodes)."""
    names = [f"{act}/act_scale", f"{act}/act_zero"]
    return names + ([f"{act}/clip_lo", f"{act}/clip_hi"] if a.bits < 8 else [])


def act_param_values(act: str, a: ActQuant) -> dict[str, np.ndarray]:
    """The values _act_nodes would write for `a`, keyed like act_param_names."""
    dt = act_container(a)
    out = {f"{act}/act_scale": np.array(a.scale, dtype=np.float32),
           f"{act}/act_zero": np.array(a.zero_point).astype(dt)}
    if a.bits < 8:
        qmin, qmax = (-(2 ** (a.bits - 1)), 2 ** (a.bits - 1) - 1) if a.signed else (0, 2**a.bits - 1)
        out[f"{act}/clip_lo"] = np.array((qmin - a.zero_point) * a.scale, np.float32)
        out[f"{act}/clip_hi"] = np.array((qmax - a.zero_point) * a.scale, np.float32)
    return out
