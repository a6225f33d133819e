"""ort-cpu: a HardSwish whose input was smoothed through the conv before it (x' = x / s, then
Mul by s, HardSwish, Mul by 1/s) runs as onnxruntime's QLinearConv (a 1x1 depthwise gate) and
QLinearMul (graph/hardswish_channels.py), within one step of the float chain (real sessions)."""

import numpy as np
import onnx
import onnxruntime as ort
from builders import make_model, vi
from onnx import TensorProto, helper
from test_target_rules import optimized_ops

from onnxq.graph.hardswish_channels import integer_channel_hard_swish

S = np.array([0.05, 1.0, 4.0, 30.0], np.float32)       # channels 600 times apart, as PP-PicoDet's


def chain(scale: float, zero: int, out_scale: float, out_zero: int, s: np.ndarray = S) -> onnx.ModelProto:
    """u8 codes [1, C, 1, 256] -> DQ -> Mul(s) -> HardSwish -> Mul(1/s) -> Q -> u8 codes."""
    inits = {"sc": np.array(scale, np.float32), "z": np.array(zero, np.uint8),
             "so": np.array(out_scale, np.float32), "zo": np.array(out_zero, np.uint8),
             "times": s.reshape(1, -1, 1, 1), "inv": (1 / s).reshape(1, -1, 1, 1)}
    nodes = [helper.make_node("DequantizeLinear", ["q", "sc", "z"], ["x"], name="dq"),
             helper.make_node("Mul", ["x", "times"], ["xs"], name="times"),
             helper.make_node("HardSwish", ["xs"], ["h"], name="hs"),
             helper.make_node("Mul", ["h", "inv"], ["hy"], name="inv"),
             helper.make_node("QuantizeLinear", ["hy", "so", "zo"], ["y"], name="q")]
    shape = [1, S.size, 1, 256]
    return make_model(nodes, [vi("q", shape, TensorProto.UINT8)], [vi("y", shape, TensorProto.UINT8)], inits,
                      opset=14)


def codes() -> dict[str, np.ndarray]:
    return {"q": np.broadcast_to(np.arange(256, dtype=np.uint8), (1, S.size, 1, 256)).copy()}


def test_every_code_of_every_channel_comes_out_within_one_step_of_the_float_chain(tmp_path):
    for scale, zero, out_scale, out_zero, u8 in [(0.05, 60, 0.04, 10, False), (0.02, 128, 0.01, 40, True),
                                                 (0.004, 100, 0.0025, 60, False)]:
        m = chain(scale, zero, out_scale, out_zero)
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(m)
        assert integer_channel_hard_swish(rewritten, u8_weights=u8) == 1
        onnx.checker.check_model(rewritten)
        ops = optimized_ops(rewritten, tmp_path)
        assert ops["QLinearConv"] == 1 and ops["QLinearMul"] == 1, ops
        assert ops["HardSwish"] + ops["Mul"] + ops["Conv"] + ops["DequantizeLinear"] == 0, ops
        a = ort.InferenceSession(m.SerializeToString()).run(None, codes())[0].astype(int)
        b = ort.InferenceSession(rewritten.SerializeToString()).run(None, codes())[0].astype(int)
        assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.2, (scale, np.abs(a - b).max(), np.mean(a != b))


def test_keep_float_leaves_the_chain_and_points_the_q_at_the_unit():
    m = chain(0.05, 60, 0.04, 10)
    assert integer_channel_hard_swish(m, keep_float=True) == 1
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("HardSwish") == 1 and ops.count("Conv") == 1
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == "y")
    assert q.input[0] == "hy/integer"
    floats = helper.make_empty_tensor_value_info("hy")
    m.graph.output.append(floats)
    y, hy = ort.InferenceSession(m.SerializeToString()).run(["y", "hy"], codes())
    ref = ort.InferenceSession(chain(0.05, 60, 0.04, 10).SerializeToString()).run(None, codes())[0]
    assert np.abs(y.astype(int) - ref.astype(int)).max() <= 1 and hy.shape == y.shape


def test_a_chain_with_a_float_reader_or_a_scalar_scale_is_left_alone():
    m = chain(0.05, 60, 0.04, 10)
    m.graph.node[-1].op_type = "Relu"          # the output Mul read by a float op, not a u8 Q
    del m.graph.node[-1].input[1:]
    assert integer_channel_hard_swish(m) == 0
    m = chain(0.05, 60, 0.04, 10)
    t = next(t for t in m.graph.initializer if t.name == "times")
    t.CopyFrom(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "times"))
    assert integer_channel_hard_swish(m) == 0


def test_channels_whose_bias_would_overflow_int32_take_fewer_weight_steps():
    """A channel smoothing shrank a millionfold (its slope below 2^-23 over the range: gate 1/2) and
    one a thousandfold (the bias 1/2 needs more than 2^31 steps at code 127) stay within one step."""
    s = np.array([1e-7, 2e-4, 1.0, 30.0], np.float32)
    m = chain(0.004, 100, 0.0025, 60, s)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(m)
    assert integer_channel_hard_swish(rewritten) == 1
    bias = next(t for t in rewritten.graph.initializer if t.name.endswith("/bias_q"))
    assert np.all(onnx.numpy_helper.to_array(bias) > 0)
    a = ort.InferenceSession(m.SerializeToString()).run(None, codes())[0].astype(int)
    b = ort.InferenceSession(rewritten.SerializeToString()).run(None, codes())[0].astype(int)
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max(axis=-1)
