"""ort-cpu: a learnt scale and shift after an activation, read only by convs, is folded into those
convs (graph/forward.py; a padding conv reads an explicit Pad), and a Pad between tensors of one
8-bit grid runs on the codes (graph/pads.py). Real onnxruntime sessions."""

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import TensorProto, helper
from test_target_rules import optimized_ops

import onnxq
import onnxq.plan.rules as rules_module
from onnxq.algos.metrics import sqnr_db
from onnxq.graph.forward import fold_affine_into_readers
from onnxq.graph.pads import pads_on_codes


def affine_net(rng, shift: np.ndarray | float = 0.4) -> onnx.ModelProto:
    """conv -> HardSwish -> Mul(a) -> Add(b) -> {1x1 conv, padded depthwise conv} -> Add -> ..."""
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w0": r(16, 8, 3, 3), "b0": r(16), "a": np.array(0.7, np.float32),
             "b": np.asarray(shift, np.float32), "w1": r(16, 16, 1, 1), "b1": r(16), "w2": r(16, 1, 3, 3),
             "w3": r(8, 16, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("HardSwish", ["c0"], ["h"], name="hs"),
             helper.make_node("Mul", ["h", "a"], ["ha"], name="scale"),
             helper.make_node("Add", ["ha", "b"], ["y"], name="shift"),
             helper.make_node("Conv", ["y", "w1", "b1"], ["c1"], name="pw"),
             helper.make_node("Conv", ["y", "w2"], ["c2"], pads=[1] * 4, group=16, name="dw"),
             helper.make_node("Add", ["c1", "c2"], ["s"], name="sum"),
             helper.make_node("Conv", ["s", "w3"], ["out"], name="head")]
    return make_model(nodes, [vi("x", ["N", 8, 12, 12])], [vi("out", ["N", 8, 12, 12])], inits, opset=14)


def run(m: onnx.ModelProto, feeds) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def test_a_scalar_scale_and_shift_folds_into_its_convs_exactly():
    rng = np.random.default_rng(0)
    m = affine_net(rng)
    folded = copy(m)
    assert fold_affine_into_readers(folded) == 2
    onnx.checker.check_model(folded)
    ops = [n.op_type for n in folded.graph.node]
    assert "Mul" not in ops and ops.count("Add") == 1 and ops.count("Pad") == 1, ops
    dw = next(n for n in folded.graph.node if n.name == "dw")
    assert dw.input[0] == next(n for n in folded.graph.node if n.op_type == "Pad").output[0]
    assert next(n for n in folded.graph.node if n.name == "pw").input[0] == "h"
    feeds = [{"x": rng.standard_normal((2, 8, 12, 12)).astype(np.float32) * 2} for _ in range(3)]
    want, got = run(m, feeds), run(folded, feeds)
    assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max(), np.abs(want - got).max()


def test_a_per_channel_shift_ahead_of_a_padding_conv_is_left_in_place():
    rng = np.random.default_rng(1)
    m = affine_net(rng, shift=np.linspace(-0.5, 0.5, 16, dtype=np.float32).reshape(1, 16, 1, 1))
    before = [n.op_type for n in m.graph.node]
    assert fold_affine_into_readers(m) == 0           # no one pad value gives zero after the shift
    assert [n.op_type for n in m.graph.node] == before


def pad_unit(value: float, scale: float = 0.05, zero: int = 20) -> onnx.ModelProto:
    """u8 codes -> DQ -> Pad(value) -> Q on the same grid -> u8 codes."""
    inits = {"s": np.array(scale, np.float32), "z": np.array(zero, np.uint8),
             "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "v": np.array(value, np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq"),
             helper.make_node("Pad", ["x", "pads", "v"], ["p"], name="pad", mode="constant"),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["y"], name="quant")]
    return make_model(nodes, [vi("q", [1, 3, 5, 5], TensorProto.UINT8)], [vi("y", [1, 3, 8, 8], TensorProto.UINT8)],
                      inits, opset=14)


@pytest.mark.parametrize("value", [0.0, 0.31, -0.4, 50.0, -7.0])
def test_a_pad_on_codes_gives_the_codes_of_the_float_unit(value):
    m = pad_unit(value)
    rewritten = copy(m)
    assert pads_on_codes(rewritten) == 1
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["Pad"]
    codes = {"q": np.random.default_rng(2).integers(0, 256, (1, 3, 5, 5)).astype(np.uint8)}
    a = ort.InferenceSession(m.SerializeToString()).run(None, codes)[0]
    b = ort.InferenceSession(rewritten.SerializeToString()).run(None, codes)[0]
    assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)


def test_a_pad_onto_another_grid_stays_float():
    m = pad_unit(0.2)
    other = next(t for t in m.graph.initializer if t.name == "z")
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(30, np.uint8), "z_out"))
    m.graph.node[2].input[2] = "z_out"
    assert other.name == "z" and pads_on_codes(m) == 0


def test_ort_cpu_runs_the_folded_block_on_integer_kernels_as_faithfully(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    m = affine_net(rng)
    feeds = [{"x": (rng.standard_normal((1, 8, 12, 12)) * 2).astype(np.float32)} for _ in range(28)]
    cfg = onnxq.ConvertConfig(bits=8, target="ort-cpu", protect_acts=0)
    q, report = onnxq.convert(m, cfg, calib=feeds[:20])
    ops = optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Mul"] + ops["HardSwish"] + ops["HardSigmoid"] == 0, ops
    assert ops["Conv"] == 1, ops          # the first conv reads the model's float input (plan.rules.ORT_INPUT_CONVS)
    pad = next(n for n in q.graph.node if n.op_type == "Pad")
    types = {t.name: t.data_type for t in q.graph.initializer}
    assert types[pad.input[2]] == TensorProto.UINT8
    rules = rules_module.RULES["ort-cpu"]
    monkeypatch.setitem(rules_module.RULES, "ort-cpu", dataclasses.replace(rules, fold_into_readers=False, int_pad=False))
    before, _ = onnxq.convert(m, cfg, calib=feeds[:20])
    assert [n for n in before.graph.node if n.op_type == "Pad"] == []
    want = run(m, feeds[20:])
    now, then = sqnr_db(want, run(q, feeds[20:])), sqnr_db(want, run(before, feeds[20:]))
    assert now > 30.0 and now > then - 1.0, (now, then)
