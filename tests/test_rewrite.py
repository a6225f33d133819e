"""graph/rewrite.py: apply_plan on hand-made plans (known codes, scales and ranges), checked on
the emitted graph's structure and in onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.graph.rewrite import apply_plan
from onnxq.graph.targets import find_targets
from onnxq.graph.walk import graphs
from onnxq.plan.acts import act_quant
from onnxq.plan.biases import code_biases
from onnxq.types import LayerPlan, Plan
from builders import make_model, vi

AXIS = {"conv": 0, "convT": 1, "rows": 0, "cols": 1}
BITS = {"conv_a": 4, "conv_b": 8, "conv_c": 4, "fc": 8}
ACT_RANGES = {"x": (-3.0, 3.0), "r": (0.0, 6.0), "f": (-3.0, 1.0)}   # about what feed() reaches


def model() -> onnx.ModelProto:
    """x -> conv_a -> relu -> r; r read by conv_b (-> yb) and conv_c -> pool -> flatten -> f ->
    fc (Gemm, transB=0) -> y. r is a graph output too."""
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    inits = {"wa": r(4, 3, 3, 3), "ba": r(4), "wb": r(4, 4, 1, 1), "bb": r(4), "wc": r(6, 4, 3, 3),
             "wf": r(6, 5), "bf": r(5)}
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb", "bb"], ["yb"], name="conv_b"),
        helper.make_node("Conv", ["r", "wc"], ["cc"], name="conv_c", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["cc"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc"),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])],
                      [vi("y", ["N", 5]), vi("yb", ["N", 4, 8, 8]), vi("r", ["N", 4, 8, 8])],
                      inits, opset=21, ir=10)


def weights(m):
    g = m.graph if isinstance(m, onnx.ModelProto) else m
    return {t.name: numpy_helper.to_array(t) for t in g.initializer}


def codes_and_scales(w, bits, axis):
    """Symmetric per-channel codes along `axis` (the channel axis of the stored weight)."""
    qmax = 2 ** (bits - 1) - 1
    other = tuple(i for i in range(w.ndim) if i != axis)
    scales = (np.abs(w).max(axis=other) / qmax).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    codes = np.clip(np.rint(w / scales.reshape(shape)), -qmax, qmax).astype(np.int32)
    return codes, scales, shape


def make_plan(m, acts: bool, corrected: dict | None = None, bits=None, ranges=None, target="generic") -> Plan:
    """Round-to-nearest codes for every target (bits by node name), the given activation ranges."""
    targets, _ = find_targets(m)
    w = {}
    for _, g in graphs(m):
        w.update(weights(g))
    bits, ranges = bits or BITS, ranges or ACT_RANGES
    layers = []
    for t in targets:
        axis = AXIS[t.weight_layout]
        codes, scales, _ = codes_and_scales(w[t.weight], bits[t.node], axis)
        layers.append(LayerPlan(target=t, bits=bits[t.node], method="rtn", codes=codes, scales=scales,
                                axis=axis, bias=(corrected or {}).get(t.node),
                                source_bias=w[t.bias] if t.bias else None))
    a = {k: act_quant(lo, hi, 8, False, "minmax") for k, (lo, hi) in ranges.items()} if acts else {}
    return code_biases(Plan(layers=layers, acts=a, target=target))


def session(m, *taps):
    """An unoptimised session (the graph's own semantics) that also returns the tensors `taps`."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    out.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in taps)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feed(seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32)}


def nodes_by_name(m):
    return {n.name: n for n in m.graph.node}


def attr(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_apply_plan_does_not_modify_the_input_model():
    m = model()
    before = m.SerializeToString()
    q1 = apply_plan(m, make_plan(m, acts=True))
    assert m.SerializeToString() == before
    q2 = apply_plan(m, make_plan(m, acts=True))
    assert q1.SerializeToString(deterministic=True) == q2.SerializeToString(deterministic=True)


@pytest.mark.parametrize("acts", [False, True])
def test_weights_become_int4_or_int8_codes_behind_a_per_channel_dq(acts):
    m = model()
    plan = make_plan(m, acts)
    q = apply_plan(m, plan)
    onnx.checker.check_model(q)
    inits = {t.name: t for t in q.graph.initializer}
    nodes = nodes_by_name(q)
    for lp in plan.layers:
        node = lp.target.node
        # 8-bit codes in UINT8 with zero point 128 (u8 x u8 kernels, Rules.u8_weights): same values
        want, offset = (TensorProto.INT4, 0) if lp.bits == 4 else (TensorProto.UINT8, 128)
        codes, scales, zero = (inits[f"{node}/weight_{k}"] for k in ("q", "scale", "zero"))
        assert codes.data_type == want and zero.data_type == want
        assert scales.data_type == TensorProto.FLOAT
        assert tuple(codes.dims) == lp.target.shape
        assert tuple(scales.dims) == tuple(zero.dims) == (lp.target.shape[lp.axis],)
        assert np.all(numpy_helper.to_array(zero).astype(np.int32) == offset)
        dq = nodes[f"{node}/weight_dequantize"]
        assert dq.op_type == "DequantizeLinear" and attr(dq, "axis") == lp.axis
        assert list(dq.input) == [f"{node}/weight_{k}" for k in ("q", "scale", "zero")]
        assert nodes[node].input[1] == f"{node}/weight_dq"
        if not acts:      # int32 bias coding may move the scales of dead channels; here none
            np.testing.assert_array_equal(numpy_helper.to_array(codes).astype(np.int32) - offset, lp.codes)
            np.testing.assert_array_equal(numpy_helper.to_array(scales), lp.scales)
    assert not {"wa", "wb", "wc", "wf"} & set(inits)          # the float weights are gone
    # an int4 initializer packs two codes a byte
    assert len(inits["conv_a/weight_q"].raw_data) == 4 * 3 * 3 * 3 // 2


def test_weight_only_plan_computes_with_the_dequantized_weights():
    m = model()
    corrected = {"conv_a": np.array([0.5, -0.25, 0.0, 1.0], np.float32)}
    plan = make_plan(m, acts=False, corrected=corrected)
    q = apply_plan(m, plan)
    assert "QuantizeLinear" not in [n.op_type for n in q.graph.node]
    assert not any(t.data_type == TensorProto.INT32 for t in q.graph.initializer)
    nodes = nodes_by_name(q)
    assert nodes["conv_a"].input[2] == "conv_a/bias"           # the corrected bias, in float
    assert nodes["conv_b"].input[2] == "bb"                    # kept as it was
    # fc (8 bits, weight-only under generic) is written as MatMul + Add of its bias, kept as it was
    assert nodes["fc"].op_type == "MatMul" and list(nodes["fc/bias_add"].input) == ["fc/matmul_out", "bf"]
    # the reference: the float model with w = codes * scales and the corrected bias
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    for t in ref.graph.initializer:
        lp = next((lp for lp in plan.layers if lp.target.weight == t.name), None)
        if lp is not None:
            _, _, shape = codes_and_scales(numpy_helper.to_array(t), lp.bits, lp.axis)
            t.CopyFrom(numpy_helper.from_array(lp.codes.astype(np.float32) * lp.scales.reshape(shape), t.name))
        elif t.name == "ba":
            t.CopyFrom(numpy_helper.from_array(corrected["conv_a"], "ba"))
    x = feed()
    got, want = session(q).run(None, x), session(ref).run(None, x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_one_qdq_pair_per_activation_read_by_quantized_layers():
    m = model()
    q = apply_plan(m, make_plan(m, acts=True))
    onnx.checker.check_model(q)
    quant = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(n.input[0] for n in quant) == ["r", "x"]     # fc is weight-only under generic: f stays float
    readers = {}
    for n in q.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    # r feeds two quantized layers through one pair; the Relu's float r is still read by the pair
    assert sorted(readers["r/dq"]) == ["conv_b", "conv_c"] and readers["r"] == ["r/quantize"]
    assert readers["x/dq"] == ["conv_a"] and readers["f"] == ["fc"]
    for a in ("x", "r"):
        assert readers[f"{a}/q"] == [f"{a}/dequantize"]
        zero = next(t for t in q.graph.initializer if t.name == f"{a}/act_zero")
        assert zero.data_type == TensorProto.UINT8
    # the pair computes the plan's fake quantization
    taps = session(q, "x/dq", "r/dq").run(None, feed())
    for name, got in zip(["x", "r"], taps[3:]):
        a = act_quant(*ACT_RANGES[name], 8, False, "minmax")
        src = feed()["x"] if name == "x" else taps[2]
        want = (np.clip(np.rint(src / np.float32(a.scale)) + a.zero_point, 0, 255) - a.zero_point) * np.float32(a.scale)
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_graph_outputs_never_get_qdq():
    m = model()
    q = apply_plan(m, make_plan(m, acts=True))
    assert [o.name for o in q.graph.output] == ["y", "yb", "r"]
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    # y: fc's bias Add (fc, weight-only under generic, is written as MatMul + Add)
    assert producer["r"] == "Relu" and producer["y"] == "Add" and producer["yb"] == "Conv"
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "y" not in quantized and "yb" not in quantized
    # r as the user reads it is the Relu's float output, not its fake-quantized copy
    r, ca, r_dq = session(q, "ca", "r/dq").run(None, feed())[2:]
    np.testing.assert_array_equal(r, np.maximum(ca, 0))
    assert not np.array_equal(r, r_dq)


def test_int32_bias_dq_when_the_input_is_quantized():
    m = model()
    plan = make_plan(m, acts=True)
    q = apply_plan(m, plan)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    types = {t.name: t.data_type for t in q.graph.initializer}
    nodes = nodes_by_name(q)
    x_scale = {lp.target.node: plan.acts[lp.target.act].scale for lp in plan.layers}
    source = weights(m)
    for node, bias in (("conv_a", "ba"), ("conv_b", "bb")):
        assert types[f"{node}/bias_q"] == TensorProto.INT32
        dq = nodes[f"{node}/bias_dequantize"]
        assert dq.op_type == "DequantizeLinear" and attr(dq, "axis") == 0
        assert nodes[node].input[2] == dq.output[0]
        np.testing.assert_allclose(inits[f"{node}/bias_scale"], x_scale[node] * inits[f"{node}/weight_scale"],
                                   rtol=1e-6)
        step = inits[f"{node}/bias_scale"]
        assert np.all(np.abs(inits[f"{node}/bias_q"] * step - source[bias]) <= 0.5 * step + 1e-7)
    assert len(nodes["conv_c"].input) == 2                      # no bias, none added
    # fc reads a float input (weight-only under generic): its bias stays the model's float one
    assert list(nodes["fc/bias_add"].input) == ["fc/matmul_out", "bf"] and "fc/bias_q" not in inits
    # and the quantized model still computes what the float one does, roughly
    x = feed(3)
    got, want = session(q).run(None, x), session(m).run(None, x)
    for g, w in zip(got[:2], want[:2]):
        cos = float(np.sum(g * w) / np.linalg.norm(g) / np.linalg.norm(w))
        assert cos > 0.98


def main_and_branch():
    """A MatMul in the main graph and one in each branch of an If that reads the main graph's h."""
    rng = np.random.default_rng(2)
    w = {k: (0.5 * rng.standard_normal((4, 4))).astype(np.float32) for k in ("w_main", "w_then", "w_else")}
    branch = lambda name: helper.make_graph(   # noqa: E731
        [helper.make_node("MatMul", ["h", f"w_{name}"], [f"o_{name}"], name=f"{name}_mm")], name, [],
        [vi(f"o_{name}", [1, 4])], [numpy_helper.from_array(w[f"w_{name}"], f"w_{name}")])
    nodes = [helper.make_node("MatMul", ["x", "w_main"], ["h"], name="main_mm"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))]
    return make_model(nodes, [vi("x", [1, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 4])],
                      {"w_main": w["w_main"]}, opset=21, ir=10)     # int4 weights need opset 21


def test_subgraph_layers_alone_get_their_weight_dq():
    m = main_and_branch()
    plan = make_plan(m, acts=False, bits={"then_mm": 8, "else_mm": 8, "main_mm": 8})
    plan.layers = [lp for lp in plan.layers if lp.target.graph]        # only the branches' layers
    q = apply_plan(m, plan)
    onnx.checker.check_model(q)
    for path, g in graphs(q):
        if path:
            assert [n.op_type for n in g.node] == ["DequantizeLinear", "MatMul"]


@pytest.mark.parametrize("target", ["generic", "tensorrt"])
@pytest.mark.parametrize("acts", [False, True])
def test_layers_in_the_main_graph_and_in_branches_together(acts, target):
    m = main_and_branch()
    plan = make_plan(m, acts, bits={"then_mm": 8, "else_mm": 4, "main_mm": 8},
                     ranges={"x": (-3.0, 3.0), "h": (-4.0, 4.0)}, target=target)
    q = apply_plan(m, plan)
    onnx.checker.check_model(q)
    for path, g in graphs(q):
        produced = {o for n in g.node for o in n.output}
        mm = next(n for n in g.node if n.op_type == "MatMul")
        assert mm.input[1] in produced                                  # its weight DQ is in its graph
        # MatMuls read float under generic (weight-only), 4-bit ones under tensorrt
        if acts and target != "generic" and mm.name != "else_mm":
            assert mm.input[0] in produced                              # and so is its input's pair
        else:
            assert mm.input[0] in ("x", "h")
    x = {"x": np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)}
    for c in (True, False):
        got, want = session(q).run(None, {**x, "c": np.array(c)}), session(m).run(None, {**x, "c": np.array(c)})
        np.testing.assert_allclose(got[0], want[0], rtol=0.1, atol=0.1)
