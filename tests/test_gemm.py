"""Every Gemm attribute combination converts to a model that onnxruntime runs with the same
answers: alpha folded into B, beta into a constant C, a C that is an activation left alone."""

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import helper

import onnxq
from onnxq.algos.metrics import sqnr_db


def _gemm(rng, trans_b: int, alpha: float, beta: float, c: str):
    w = rng.standard_normal((6, 8) if trans_b else (8, 6)).astype(np.float32)
    inits, ins, inputs = {"w": w}, ["x", "w"], [vi("x", ["N", 8])]
    if c == "[O]":
        inits["c"] = rng.standard_normal(6).astype(np.float32)
    elif c == "[1,O]":
        inits["c"] = rng.standard_normal((1, 6)).astype(np.float32)
    elif c == "activation":
        inputs.append(vi("c", ["N", 6]))
    if c != "none":
        ins.append("c")
    node = helper.make_node("Gemm", ins, ["y"], transB=trans_b, alpha=alpha, beta=beta)
    m = make_model([node], inputs, [vi("y", ["N", 6])], inits)
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32),
              **({"c": rng.standard_normal((4, 6)).astype(np.float32)} if c == "activation" else {})}
             for _ in range(12)]
    return m, feeds


@pytest.mark.parametrize("c", ["none", "[O]", "[1,O]", "activation"])
def test_every_gemm_attribute_combination_keeps_its_answer(c):
    rng = np.random.default_rng(0)
    worst = {}
    for trans_b, alpha, beta in itertools.product([0, 1], [1.0, 0.5, 2.0], [0.0, 0.5, 1.0, 2.0]):
        m, feeds = _gemm(rng, trans_b, alpha, beta, c)
        ref = ort.InferenceSession(m.SerializeToString())
        for act_bits in (32, 8):
            q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=act_bits), calib=feeds[:-2])
            got = ort.InferenceSession(q.SerializeToString())
            db = min(sqnr_db(ref.run(None, f)[0], got.run(None, f)[0]) for f in feeds[-2:])
            worst[(trans_b, alpha, beta, act_bits)] = db
    weight_only = min(v for k, v in worst.items() if k[3] == 32)
    assert weight_only > 35, {k: round(v, 1) for k, v in worst.items() if v < 35}
    assert min(worst.values()) > 18, {k: round(v, 1) for k, v in worst.items() if v < 18}


@pytest.mark.parametrize("c", ["none", "[O]", "[1,O]", "activation"])
def test_every_gemm_combination_as_matmulnbits_keeps_the_generic_answer(c):
    """ort-cpu at 4 bits emits onnxruntime's MatMulNBits (bias as its input) wherever the bias is
    constant; its answers stay those of the generic target's weight-only 4-bit model (where C is an
    activation and the Gemm keeps onnxruntime's 8-bit kernel, those of the qnn target's W4A8
    model, which rounds the Gemm's input as that kernel does: generic's, openvino's and
    tensorrt's 4-bit Gemms read float)."""
    rng = np.random.default_rng(1)
    worst = {}
    for trans_b, alpha, beta in itertools.product([0, 1], [1.0, 0.5, 2.0], [0.0, 0.5, 1.0, 2.0]):
        m, feeds = _gemm(rng, trans_b, alpha, beta, c)
        cfg = dict(bits=4, protect=0)
        q, _ = onnxq.convert(m, onnxq.ConvertConfig(**cfg, target="ort-cpu"), calib=feeds[:-2])
        ref = dict(act_bits=8, target="qnn") if c == "activation" else dict(act_bits=32)
        generic, _ = onnxq.convert(m, onnxq.ConvertConfig(**cfg, **ref), calib=feeds[:-2])
        ops = {n.op_type for n in q.graph.node}
        assert ("MatMulNBits" in ops) == (c != "activation"), ops
        a, b = ort.InferenceSession(q.SerializeToString()), ort.InferenceSession(generic.SerializeToString())
        worst[(trans_b, alpha, beta)] = min(sqnr_db(b.run(None, f)[0], a.run(None, f)[0]) for f in feeds[-2:])
    assert min(worst.values()) > 25, {k: round(v, 1) for k, v in worst.items() if v < 25}
