"""Blocked scales for 2- to 4-bit Gemm/MatMul weights (--block): one scale per run of B values
along K, rounded by second-order rounding with those scales; emitted as a blocked
DequantizeLinear (generic), onnxruntime's MatMulNBits with the same blocks (ort-cpu), and run by
OpenVINO too."""

import numpy as np
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import helper, numpy_helper

import onnxq
from onnxq.algos.metrics import sqnr_db
from onnxq.algos.weights import blocked, gptq, weighted_error
from onnxq.errors import ConfigError

K, H, O = 128, 96, 64


def mlp(rng):
    """x [N, K] -> MatMul (X @ W1, W1 [K, H]) -> Relu -> Gemm (transB, W2 [O, H]); the weights'
    columns of very different size, as trained layers have."""
    w1 = rng.standard_normal((K, H)) * np.exp(rng.standard_normal((K, 1)))
    w2 = rng.standard_normal((O, H)) * np.exp(rng.standard_normal((1, H)))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="head", transB=1)]
    return make_model(nodes, [vi("x", ["N", K])], [vi("y", ["N", O])],
                      {"w1": (w1 * 0.1).astype(np.float32), "w2": (w2 * 0.1).astype(np.float32)})


def feeds(rng, n):
    return [{"x": rng.standard_normal((32, K)).astype(np.float32)} for _ in range(n)]


def test_blocked_rounding_lowers_the_layer_objective():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)) * np.exp(rng.standard_normal((1, 256)) * 0.5)
    x = rng.standard_normal((4000, 256)) * np.exp(rng.standard_normal(256) * 0.7)
    h = x.T @ x / len(x)
    per_channel = gptq(w, 4, h)
    base = weighted_error(w, per_channel.codes * per_channel.scales[:, None], h[None])
    errors = {}
    for b in (32, 64, 128):
        q = blocked("gptq", w, 4, h, b)
        assert q.scales.shape == (48, 256 // b) and q.method == "gptq"
        assert np.abs(q.codes).max() <= 7
        errors[b] = weighted_error(w, q.codes * np.repeat(q.scales, b, axis=1), h[None])
    assert errors[32] < errors[64] < errors[128] < base
    assert errors[32] < 0.7 * base


def outputs(model, fs, options=None):
    so = ort.SessionOptions()
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, v)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in fs])


def test_blocked_weights_are_emitted_as_blocked_dequantize_and_answer_closer():
    rng = np.random.default_rng(1)
    m = mlp(rng)
    cal, held = feeds(rng, 16), feeds(rng, 6)
    cfg = dict(bits=4, act_bits=32, protect=0.0)
    q_pc, _ = onnxq.convert(m, onnxq.ConvertConfig(block=0, **cfg), calib=cal)
    q_b, rep = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)       # blocks of 32: the default
    assert {l.node: l.method for l in rep.quantized} == {"up": "gptq (blocks of 32)", "head": "gptq (blocks of 32)"}
    dq = {n.name: n for n in q_b.graph.node if n.op_type == "DequantizeLinear"}
    attrs = {k: {a.name: helper.get_attribute_value(a) for a in dq[f"{k}/weight_dequantize"].attribute}
             for k in ("up", "head")}
    assert attrs["up"] == {"axis": 0, "block_size": 32}          # W1 [K, H]: blocks run down K
    assert attrs["head"] == {"axis": 1, "block_size": 32}        # W2 [O, H] (transB): blocks run along H
    inits = {t.name: numpy_helper.to_array(t) for t in q_b.graph.initializer}
    assert inits["up/weight_scale"].shape == (K // 32, H) and inits["head/weight_scale"].shape == (O, H // 32)
    ref = outputs(m, held)
    assert sqnr_db(ref, outputs(q_b, held)) > sqnr_db(ref, outputs(q_pc, held)) + 2.0


def test_ort_cpu_runs_the_same_blocks_in_matmulnbits():
    """The generic output's blocked codes and scales, packed for MatMulNBits with block_size 32:
    the same answers (the kernel's int8 rounding of its input aside)."""
    rng = np.random.default_rng(2)
    m = mlp(rng)
    cal, held = feeds(rng, 16), feeds(rng, 6)
    generic, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=32, protect=0.0, block=32), calib=cal)
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=8, protect=0.0, block=32, target="ort-cpu"),
                         calib=cal)
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert {n.name for n in nbits} == {"up", "head"}
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size")) == 32 for n in nbits)
    assert sqnr_db(outputs(generic, held), outputs(q, held)) > 30.0


def test_blocks_leave_convs_8_bit_layers_and_short_rows_per_channel():
    rng = np.random.default_rng(3)
    m = mlp(rng)
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=32, protect=0.0, block=128), calib=feeds(rng, 8))
    # K of the head is 96: no whole block of 128 fits, so one scale per channel; `up` has K = 128 = one block
    assert {l.node: l.method for l in rep.quantized} == {"up": "gptq", "head": "gptq"}
    _, rep8 = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=32, block=32), calib=feeds(rng, 8))
    assert not any("blocks" in l.method for l in rep8.quantized)


def test_a_block_size_that_is_not_offered_is_refused():
    with pytest.raises(ConfigError, match="--block"):
        onnxq.ConvertConfig(block=48)


def test_openvino_runs_blocked_weights_like_onnxruntime(tmp_path):
    ov = pytest.importorskip("openvino")
    rng = np.random.default_rng(4)
    m = mlp(rng)
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=8, block=32, target="openvino"), calib=feeds(rng, 8))
    path = tmp_path / "q.onnx"
    onnxq.save(q, path)
    x = feeds(rng, 1)[0]["x"]
    want = outputs(q, [{"x": x}], {"session.disable_quant_qdq": "1"})
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert sqnr_db(want, compiled(x)[compiled.output(0)]) > 30.0
