"""End-to-end conversion of graphs that hold every structure the converter must handle."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.io import opset_of
from builders import conv_zoo, make_model, vi


def run(m, feed):
    return ort.InferenceSession(m.SerializeToString()).run(None, feed)[0]


def init_types(m):
    return {t.name: t.data_type for t in m.graph.initializer}


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("bits", [8, 4])
def test_zoo_converts_runs_and_stays_close(opset, bits, feeds):
    m = conv_zoo(np.random.default_rng(0), opset=opset)
    before = m.SerializeToString()
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=bits, protect=0), calib=feeds())
    assert m.SerializeToString() == before                       # input untouched
    onnx.checker.check_model(q)
    ops = [n.op_type for n in q.graph.node]
    assert "BatchNormalization" not in ops and "Constant" not in ops
    assert len(rep.quantized) == 8 and rep.skipped == []          # every weight layer
    # one weight DQ per layer, one Q+DQ pair per quantized activation, int32 bias DQs; the
    # Gemm/MatMul layers read a float input (weight-only under generic, 4 and 8 bits)
    float_inputs = sum(l.activation_bits == 32 for l in rep.quantized)
    assert float_inputs == sum(l.op in ("Gemm", "MatMul") for l in rep.quantized) > 0
    assert ops.count("QuantizeLinear") == len(rep.activations) == 8 - float_inputs
    w4 = [t for t in q.graph.initializer if t.name.endswith("/weight_q")]
    assert len(w4) == 8
    if bits == 4:
        assert opset_of(q) == 21
        # depthwise at 8 bits, in UINT8 with zero point 128 (u8 x u8 kernels: Rules.u8_weights)
        assert {t.data_type for t in w4} == {TensorProto.INT4, TensorProto.UINT8}
        dw = next(t for t in w4 if t.data_type == TensorProto.UINT8)
        assert dw.name.startswith("Conv_5")
    else:     # int16 Q/DQ on the activations kept at 16 bits (--protect-acts) need opset 21
        assert opset_of(q) == (21 if rep.wide.widened else max(opset, 13))
        # UINT8 with zero point 128 (u8 x u8 kernels: Rules.u8_weights), but a MatMul's weight that
        # is its first input, the kernel's activation side
        kinds = {t.name.split("/")[0]: t.data_type for t in w4}
        assert kinds.pop("MatMul_15") == TensorProto.INT8 and set(kinds.values()) == {TensorProto.UINT8}
        zeros = {t.name.split("/")[0]: numpy_helper.to_array(t) for t in q.graph.initializer
                 if t.name.endswith("/weight_zero")}
        assert all(z.dtype == np.uint8 and np.all(z == 128) for k, z in zeros.items() if k != "MatMul_15")
        assert {a.tensor for a in rep.activations if a.bits == 16} == set(rep.wide.widened)
    assert all(t.data_type == TensorProto.INT32 for t in q.graph.initializer if t.name.endswith("/bias_q"))
    x = feeds(1, seed=99)[0]
    ref, out = run(m, x), run(q, x)
    cos = float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > (0.999 if bits == 8 else 0.99)
    assert rep.fidelity.cosine > (0.999 if bits == 8 else 0.99)


def test_int4_weights_are_a_quarter_of_float_size(feeds):
    m = conv_zoo(np.random.default_rng(0))
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=32), calib=feeds(8))
    w = next(t for t in q.graph.initializer if t.name == "Conv_7/weight_q")   # 32x4x3x3
    assert len(w.raw_data) == 32 * 4 * 9 // 2
    assert "QuantizeLinear" not in [n.op_type for n in q.graph.node]      # weight-only


def test_same_seed_same_bytes_and_other_seed_may_differ(feeds):
    m = conv_zoo(np.random.default_rng(0))
    a, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, seed=3), calib=feeds())
    b, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, seed=3), calib=feeds())
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


@pytest.mark.parametrize("method", ["rtn", "mse", "gptq"])
def test_each_weight_method_by_name(method, feeds):
    m = conv_zoo(np.random.default_rng(0))
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, weight_method=method), calib=feeds(12))
    used = {l.method.split("+")[0] for l in rep.quantized if l.bits == 4 and l.op != "ConvTranspose"}
    assert used == {method}


def test_damping_reaches_every_gptq_layer(feeds):
    """--damp changes second-order rounding and nothing else: rtn/mse layers (the 8-bit
    depthwise conv) keep their codes."""
    m = conv_zoo(np.random.default_rng(0))
    # sequential mode off: its compensation would carry the gptq layers' change into the others
    runs = [onnxq.convert(m, onnxq.ConvertConfig(bits=3, damp=d, sequential=False), calib=feeds(12))
            for d in (1.0, 0.0001)]
    codes = [{t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/weight_q")}
             for q, _ in runs]
    methods = {l.node: l.method for l in runs[0][1].quantized}
    assert runs[0][1].config["damp"] == 1.0 and runs[1][1].config["damp"] == 0.0001
    for name, c in codes[0].items():
        same = np.array_equal(c, codes[1][name])
        node = name[:-len("/weight_q")]
        assert same == (methods[node] != "gptq"), node


def test_gptq_layers_beat_rtn_estimate(feeds):
    m = conv_zoo(np.random.default_rng(0))
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, sequential=False), calib=feeds())
    for layer in rep.quantized:
        if layer.method == "gptq":
            assert layer.sqnr_db >= layer.sqnr_rtn_db - 1e-6


def detector_head():
    """Boxes in 0..320 and class scores in 0..1 concatenated into one output, as YOLOv8 does."""
    rng = np.random.default_rng(5)
    inits = {"wb": (rng.standard_normal((4, 8, 1, 1)) * 0.5).astype(np.float32),
             "ws": (rng.standard_normal((3, 8, 1, 1)) * 0.5).astype(np.float32),
             "k": np.array(160.0, np.float32), "shape": np.array([1, -1, 64], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["b"]),
        helper.make_node("Sigmoid", ["b"], ["bs"]),
        helper.make_node("Mul", ["bs", "k"], ["boxes"]),          # pixel coordinates 0..160+
        helper.make_node("Conv", ["x", "ws"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["scores"]),          # 0..1
        helper.make_node("Concat", ["boxes", "scores"], ["cat"], axis=1),
        helper.make_node("Reshape", ["cat", "shape"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 7, 64])], inits)


def test_detector_head_keeps_small_scores_alive():
    m = detector_head()
    rng = np.random.default_rng(6)
    cal = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(16)]
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8), calib=cal)
    ref, out = run(m, cal[0]), run(q, cal[0])
    scores_ref, scores_q = ref[0, 4:], out[0, 4:]
    assert np.abs(scores_q - scores_ref).max() < 0.02            # not rounded to zero
    assert np.all(scores_q[scores_ref > 0.55] > 0.5)              # confident detections survive
    consumers = {i for n in q.graph.node if n.op_type == "Concat" for i in n.input}
    producers = {n.output[0]: n.op_type for n in q.graph.node}
    assert all(producers[c] != "DequantizeLinear" for c in consumers)


def test_subgraph_weights_are_quantized_weight_only():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((4, 4)) * 0.5).astype(np.float32)

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"o_{name}"])], name, [],
                                 [vi(f"o_{name}", [1, 4])], [numpy_helper.from_array(w, f"w_{name}")])

    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                   [vi("x", [1, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", [1, 4])], {}, opset=16)
    cal = [{"x": rng.standard_normal((1, 4)).astype(np.float32), "c": np.array(True)} for _ in range(4)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8), calib=cal)
    assert len(rep.quantized) == 2 and all(l.graph != "main" for l in rep.quantized)
    sub = q.graph.node[-1].attribute[0].g
    assert "DequantizeLinear" in [n.op_type for n in sub.node]
    f = {"x": cal[0]["x"], "c": np.array(False)}
    assert np.allclose(run(m, f), run(q, f), atol=0.05)


def test_sequential_compensates_stage_first_layers_and_stays_close(feeds):
    m = conv_zoo(np.random.default_rng(0))
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, sequential=True, stages=4), calib=feeds())
    methods = [l.method for l in rep.quantized]
    assert any("+compensated" in x for x in methods)
    assert "+compensated" in methods[0]       # stage 0: fitted to its own input's QDQ
    convt = next(l for l in rep.quantized if l.op == "ConvTranspose")
    assert convt.method == "gptq"          # rounded on its FP32 statistics spread over the taps
    assert rep.fidelity.cosine > 0.99


def test_sequential_stages_are_whole_levels_of_layers_that_never_read_each_other():
    """a -> (b, c in parallel) -> add -> d: b and c share a level; with as many stages as levels
    every layer starts its own stage; with fewer, whole levels are merged."""
    from onnxq.graph.targets import find_targets, target_ancestors
    from onnxq.search.sequential import levels, stages
    rng = np.random.default_rng(0)
    inits = {f"w_{k}": (rng.standard_normal((8, 8)) * 0.3).astype(np.float32) for k in "abcd"}
    m = make_model([helper.make_node("MatMul", ["x", "w_a"], ["ya"], name="a"),
                    helper.make_node("MatMul", ["ya", "w_b"], ["yb"], name="b"),
                    helper.make_node("MatMul", ["ya", "w_c"], ["yc"], name="c"),
                    helper.make_node("Add", ["yb", "yc"], ["s"], name="add"),
                    helper.make_node("MatMul", ["s", "w_d"], ["y"], name="d")],
                   [vi("x", ["N", 8])], [vi("y", ["N", 8])], inits)
    targets, _ = find_targets(m)
    ancestors = target_ancestors(m, targets)
    assert levels(targets, ancestors) == {"a": 0, "b": 1, "c": 1, "d": 2}
    as_names = lambda groups: [[t.node for t in g] for g in groups]    # noqa: E731
    assert as_names(stages(targets, ancestors, 16)) == [["a"], ["b", "c"], ["d"]]
    assert as_names(stages(targets, ancestors, 2)) == [["a", "b", "c"], ["d"]]
    assert as_names(stages(targets, ancestors, 1)) == [["a", "b", "c", "d"]]


def test_branches_are_fitted_after_sequential_mode(feeds):
    """Sequential mode runs with branches asked for (by default at W4A8), and the branches are
    fitted to its codes: a compensated layer can carry one."""
    m = conv_zoo(np.random.default_rng(0))
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, stages=4, rank_budget=0.3, protect=0, branch_weighting="layer"),
                           calib=feeds())
    assert rep.config["sequential"] is True
    assert not any("sequential" in w for w in rep.warnings)
    compensated = [l for l in rep.quantized if "+compensated" in l.method]
    assert compensated and any(l.branch_rank > 0 for l in compensated)


def test_sequential_compensates_only_layers_with_enough_rows_for_their_inputs():
    """V = W C Hq^-1 needs rows well beyond the layer's inputs K (search/sequential.FIT_ROWS): with
    80 one-row samples the K = 64 layer keeps its one-pass codes, the K = 16 layer is fitted."""
    from onnxq.search.sequential import FIT_ROWS
    rng = np.random.default_rng(0)
    inits = {"w1": (rng.standard_normal((64, 16)) * 0.2).astype(np.float32),
             "w2": (rng.standard_normal((16, 8)) * 0.3).astype(np.float32)}
    m = make_model([helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                    helper.make_node("Gemm", ["r", "w2"], ["y"])],
                   [vi("x", ["N", 64])], [vi("y", ["N", 8])], inits)
    cal = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(80)]
    assert 16 * FIT_ROWS <= 80 < 64 * FIT_ROWS
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, sequential=True, stages=2, protect=0), calib=cal)
    first, second = rep.quantized
    assert "+compensated" not in first.method and "+compensated" in second.method


@pytest.mark.parametrize("abits", [4, 6])
def test_low_bit_activations_use_narrow_codes_in_8_bit_containers(abits, feeds):
    m = conv_zoo(np.random.default_rng(0))
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=abits), calib=feeds())
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            clip = next(c for c in q.graph.node if c.output[0] == n.input[0])
            assert clip.op_type == "Clip"
            scale, zp = float(inits[n.input[1]]), int(inits[n.input[2]])
            assert inits[n.input[2]].dtype == np.uint8
            lo, hi = float(inits[clip.input[1]]), float(inits[clip.input[2]])
            assert round(lo / scale) + zp == 0 and round(hi / scale) + zp == 2**abits - 1
    assert rep.fidelity.cosine > (0.95 if abits == 4 else 0.98)


@pytest.mark.parametrize("abits", [8, 16])
def test_bias_of_a_channel_with_near_zero_weights_survives(abits, feeds):
    # a channel whose weights all but died in training still adds its bias; its int32 bias code
    # round(b / (s_x s_w)) would overflow with s_w taken from those tiny weights
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    w[1] = 1e-9 * rng.standard_normal((3, 3, 3)).astype(np.float32)
    b = np.array([0.1, 2.0, -0.3, 0.5], np.float32)
    m = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
                   [vi("x", ["N", 3, 12, 12])], [vi("y", ["N", 4, 12, 12])], {"w": w, "b": b})
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=abits), calib=feeds(8))
    bias_q = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("/bias_q"))
    assert np.abs(bias_q.astype(np.int64)).max() <= 2**30
    x = feeds(1, seed=7)[0]
    ref, out = run(m, x), run(q, x)
    np.testing.assert_allclose(out[:, 1], ref[:, 1], atol=1e-3)      # the dead channel: its bias
    cos = float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.99


def test_eight_bit_default_rounds_convs_second_order_and_gathers_only_their_moments(feeds):
    """W8A8 defaults: convs take gptq, depthwise and grouped ones too (it measured better on
    held-out data), ConvTranspose and Gemm/MatMul mse; only the gptq layers gather K x K
    moments, and the rounding beats round-to-nearest on their own objective."""
    from onnxq.api import needs_hessians
    from onnxq.graph.prepare import prepare
    from onnxq.graph.targets import find_targets
    m = conv_zoo(np.random.default_rng(0))
    targets, _ = find_targets(prepare(m)[0])
    plain = {t.node for t in targets if t.op == "Conv"}
    assert len(plain) == 4 and len(targets) > 6
    assert any(t.groups > 1 for t in targets if t.node in plain)
    cfg = onnxq.ConvertConfig(bits=8, act_bits=8)
    _, rep = onnxq.convert(m, cfg, calib=feeds(12))
    assert {l.node: l.method for l in rep.quantized} == {t.node: "gptq" if t.node in plain else "mse" for t in targets}
    for layer in rep.quantized:
        if layer.method == "gptq":
            assert layer.sqnr_db >= layer.sqnr_rtn_db - 1e-6
    assert rep.config["weight_method"] == "gptq for convs, mse for the rest"
    assert needs_hessians(cfg, targets) == plain
    assert needs_hessians(onnxq.ConvertConfig(bits=8, rank_budget=0.02), targets) is True
