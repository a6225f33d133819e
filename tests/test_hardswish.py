"""ort-cpu: a HardSwish between u8 tensors runs as onnxruntime's QLinearAdd + QLinearMul
(graph/hardswish.py), with codes within one step of the float unit's (real sessions)."""

import numpy as np
import onnx
import onnxruntime as ort
from builders import make_model, vi
from onnx import TensorProto, helper
from test_target_rules import optimized_ops

import onnxq
from onnxq.algos.metrics import sqnr_db
from onnxq.graph.hardswish import integer_hard_swish


def unit(scale: float, zero: int, out_scale: float, out_zero: int) -> onnx.ModelProto:
    """u8 codes -> DQ -> HardSwish -> Q -> u8 codes."""
    inits = {"s": np.array(scale, np.float32), "z": np.array(zero, np.uint8),
             "so": np.array(out_scale, np.float32), "zo": np.array(out_zero, np.uint8)}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq"),
             helper.make_node("HardSwish", ["x"], ["h"], name="hs"),
             helper.make_node("QuantizeLinear", ["h", "so", "zo"], ["y"], name="q")]
    return make_model(nodes, [vi("q", [1, 256], TensorProto.UINT8)], [vi("y", [1, 256], TensorProto.UINT8)],
                      inits, opset=14)


def test_every_input_code_comes_out_within_one_step_of_the_float_unit(tmp_path):
    codes = {"q": np.arange(256, dtype=np.uint8)[None]}
    # ranges of real hard-swish inputs: mostly positive, symmetric, wide and narrow
    for scale, zero, out_scale, out_zero in [(0.05, 60, 0.04, 10), (0.02, 128, 0.01, 40), (0.12, 30, 0.11, 4),
                                             (0.004, 100, 0.0025, 60)]:
        m = unit(scale, zero, out_scale, out_zero)
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(m)
        assert integer_hard_swish(rewritten) == 1
        onnx.checker.check_model(rewritten)
        ops = optimized_ops(rewritten, tmp_path)
        assert ops["QLinearAdd"] == 1 and ops["QLinearMul"] == 1, ops
        assert ops["HardSwish"] + ops["HardSigmoid"] + ops["Mul"] + ops["DequantizeLinear"] == 0, ops
        a = ort.InferenceSession(m.SerializeToString()).run(None, codes)[0].astype(int)
        b = ort.InferenceSession(rewritten.SerializeToString()).run(None, codes)[0].astype(int)
        assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.2, (scale, np.abs(a - b).max(), np.mean(a != b))


def test_units_with_float_or_int16_readers_are_left_alone():
    m = unit(0.05, 60, 0.04, 10)
    wide = onnx.ModelProto()
    wide.CopyFrom(m)
    zo = next(t for t in wide.graph.initializer if t.name == "zo")
    zo.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.int16), "zo"))
    assert integer_hard_swish(wide) == 0
    read_in_float = onnx.ModelProto()
    read_in_float.CopyFrom(m)
    read_in_float.graph.output.append(vi("h", [1, 256]))
    assert integer_hard_swish(read_in_float) == 0


def hard_swish_net(rng) -> onnx.ModelProto:
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w0": r(16, 8, 3, 3), "b0": r(16), "w1": r(16, 1, 3, 3), "w2": r(16, 16, 1, 1), "wf": r(5, 16)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("HardSwish", ["c0"], ["h0"]),
             helper.make_node("Conv", ["h0", "w1"], ["c1"], pads=[1] * 4, group=16, name="dw"),
             helper.make_node("HardSwish", ["c1"], ["h1"]),
             helper.make_node("Conv", ["h1", "w2"], ["c2"], name="pw"),
             helper.make_node("HardSwish", ["c2"], ["h2"]),
             helper.make_node("GlobalAveragePool", ["h2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [vi("x", ["N", 8, 16, 16])], [vi("y", ["N", 5])], inits, opset=14)


def test_ort_cpu_runs_a_hard_swish_convnet_on_integer_kernels_as_faithfully(tmp_path):
    rng = np.random.default_rng(3)
    m = hard_swish_net(rng)
    feeds = [{"x": (rng.standard_normal((1, 8, 16, 16)) * 2).astype(np.float32)} for _ in range(28)]
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu", protect_acts=0), calib=feeds[:20])
    ops = optimized_ops(q, tmp_path)
    # the two hard-swishes between quantized convs; the last one feeds the float pool
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 2 and ops["QLinearMul"] == 2, ops
    assert ops["HardSigmoid"] == 1, ops
    generic, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, protect_acts=0), calib=feeds[:20])
    ref = ort.InferenceSession(m.SerializeToString())
    want = np.concatenate([ref.run(None, f)[0] for f in feeds[20:]])
    got = {k: np.concatenate([ort.InferenceSession(v.SerializeToString()).run(None, f)[0] for f in feeds[20:]])
           for k, v in (("ort-cpu", q), ("generic", generic))}
    full, inputs_only = sqnr_db(want, got["ort-cpu"]), sqnr_db(want, got["generic"])
    assert full > 30.0 and full > inputs_only - 3.0, (full, inputs_only)
