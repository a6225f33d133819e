"""Blocked scales for 2- to 4-bit weights (--block): one scale per run of B values along K
(Gemm/MatMul) or of B input channels at each kernel tap (ungrouped convs, generic target),
rounded by second-order rounding with those scales; emitted as a blocked DequantizeLinear
(generic), onnxruntime's MatMulNBits with the same blocks (ort-cpu), and run by OpenVINO too."""

import numpy as np
import onnxruntime as ort
import pytest
from builders import make_model, vi
import onnx
from onnx import helper, numpy_helper

import onnxq
from onnxq.algos.metrics import sqnr_db
from onnxq.algos.matrix import dequantize_rows
from onnxq.algos.weights import blocked, blocked_taps, gptq, weighted_error
from onnxq.errors import ConfigError
from onnxq.graph.targets import find_targets
from onnxq.plan.layers import weight_block

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
    # one pass: the codes of each grid alone (sequential mode, on by default weight-only, would
    # code 'head' again on what 'up' leaves)
    cfg = dict(bits=4, act_bits=32, protect=0.0, sequential=False)
    q_pc, _ = onnxq.convert(m, onnxq.ConvertConfig(block=0, **cfg), calib=cal)
    q_b, rep = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)       # blocks of 32: the default
    assert {l.node: l.method for l in rep.quantized} == {"up": "gptq (blocks of 32, zero points)", "head": "gptq (blocks of 32, zero points)"}
    dq = {n.name: n for n in q_b.graph.node if n.op_type == "DequantizeLinear"}
    attrs = {k: {a.name: helper.get_attribute_value(a) for a in dq[f"{k}/weight_dequantize"].attribute}
             for k in ("up", "head")}
    assert attrs["up"] == {"axis": 0, "block_size": 32}          # W1 [K, H]: blocks run down K
    # W2 [O, H] (Gemm transB): written as MatMul on [H, O] (graph/matmuls.py), blocks run down H
    assert attrs["head"] == {"axis": 0, "block_size": 32}
    inits = {t.name: numpy_helper.to_array(t) for t in q_b.graph.initializer}
    assert inits["up/weight_scale"].shape == (K // 32, H) and inits["head/weight_scale"].shape == (H // 32, O)
    ref = outputs(m, held)
    assert sqnr_db(ref, outputs(q_b, held)) > sqnr_db(ref, outputs(q_pc, held)) + 2.0


def test_ort_cpu_runs_the_same_blocks_in_matmulnbits():
    """The generic output's blocked codes and scales, packed for MatMulNBits with block_size 32:
    the same answers (the kernel's int8 rounding of its input aside)."""
    rng = np.random.default_rng(2)
    m = mlp(rng)
    cal, held = feeds(rng, 16), feeds(rng, 6)
    # one pass in both (sequential mode, on by default in either, fits each to its own partial model)
    generic, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=32, protect=0.0, block=32, sequential=False),
                               calib=cal)
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=8, protect=0.0, block=32, target="ort-cpu",
                                                sequential=False), calib=cal)
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert {n.name for n in nbits} == {"up", "head"}
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size")) == 32 for n in nbits)
    assert sqnr_db(outputs(generic, held), outputs(q, held)) > 30.0


def test_blocks_leave_short_rows_per_channel_and_8_bit_layers_where_asked():
    rng = np.random.default_rng(3)
    m = mlp(rng)
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=32, protect=0.0, block=128), calib=feeds(rng, 8))
    # K of the head is 96: no whole block of 128 fits, so one scale per channel; `up` has K = 128 = one block
    assert {l.node: l.method for l in rep.quantized} == {"up": "gptq", "head": "gptq"}
    # 8 bits: per channel when asked; by default an all-MatMul model's weight-only layers are blocked
    # (api.block_8bit), a symmetric grid each block (8-bit codes and zero points would not fit int8)
    _, rep8 = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=32, block=32, block_8bit=False), calib=feeds(rng, 8))
    assert not any("blocks" in l.method for l in rep8.quantized)
    # every layer weight-only: the weights are the whole error, so blocks of 16 (api.fine_8bit_block)
    q8, rep8 = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=32, block=32), calib=feeds(rng, 8))
    assert all(l.method.endswith(" (blocks of 16)") for l in rep8.quantized) and len(rep8.quantized) == 2
    assert rep8.config["block8"] == 16
    assert next(o.version for o in q8.opset_import if o.domain in ("", "ai.onnx")) == 21
    _, rep8 = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=32, block8=32), calib=feeds(rng, 8))
    assert all(l.method.endswith(" (blocks of 32)") for l in rep8.quantized)


def test_8bit_blocks_stay_at_block_where_activations_are_rounded_too():
    """A conv (8-bit input rounding) ahead of a MatMul that holds most of the weights: the MatMul is
    blocked at --block, not at the finer 16 an all-weight-only model gets."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")]
    inits = {"cw": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
             "cb": np.zeros(8, np.float32), "shape": np.array([-1, 8 * 8 * 8], np.int64),
             "w": (rng.standard_normal((512, 64)) * 0.05).astype(np.float32)}
    m = make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 64])], inits)
    cal = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8), calib=cal)
    fc = next(l for l in rep.quantized if l.node == "fc")
    assert rep.config["block_8bit"] is True and rep.config["block8"] == 32 and fc.method.endswith(" (blocks of 32)")


def test_a_block_size_that_is_not_offered_is_refused():
    with pytest.raises(ConfigError, match="--block"):
        onnxq.ConvertConfig(block=48)
    with pytest.raises(ConfigError, match="block8"):
        onnxq.ConvertConfig(block8=8)


def test_openvino_runs_blocked_weights_like_onnxruntime(tmp_path):
    rng = np.random.default_rng(4)
    m = mlp(rng)
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=8, block=32, target="openvino"), calib=feeds(rng, 8))
    x = feeds(rng, 1)[0]["x"]
    assert openvino_sqnr(q, x, tmp_path, {"session.disable_quant_qdq": "1"}) > 30.0


def openvino_sqnr(model, x: np.ndarray, tmp_path, options=None) -> float:
    """SQNR of OpenVINO's CPU answer for input x against onnxruntime's (skips without openvino)."""
    ov = pytest.importorskip("openvino")
    path = tmp_path / "q.onnx"
    onnxq.save(model, path)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return sqnr_db(outputs(model, [{"x": x}], options), compiled(x)[compiled.output(0)])


def conv_pair(rng, c=64):
    """x [N, c, 8, 8] -> 3x3 Conv (c -> c) -> Relu -> 1x1 Conv (c -> 32); input channels of very
    different size, as trained layers see them."""
    w1 = rng.standard_normal((c, c, 3, 3)) * np.exp(rng.standard_normal((1, c, 1, 1)) * 0.7) * 0.05
    w2 = rng.standard_normal((32, c, 1, 1)) * np.exp(rng.standard_normal((1, c, 1, 1)) * 0.7) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c3", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c1")]
    return make_model(nodes, [vi("x", ["N", c, 8, 8])], [vi("y", ["N", 32, 8, 8])],
                      {"w1": w1.astype(np.float32), "w2": w2.astype(np.float32)})


def conv_feeds(rng, n, c=64):
    return [{"x": (rng.standard_normal((2, c, 8, 8)) * np.exp(rng.standard_normal((1, c, 1, 1)))).astype(np.float32)}
            for _ in range(n)]


def test_conv_blocks_run_along_input_channels_at_each_tap():
    """blocked_taps: one scale per 32 input channels at each of the 9 taps, codes in im2col's
    channel-major column order; without taps it is plain `blocked`, and it beats one scale a row."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 64 * 9)) * np.exp(rng.standard_normal((1, 64 * 9)) * 0.5)
    x = rng.standard_normal((3000, 64 * 9))
    h = x.T @ x / len(x)
    q = blocked_taps("gptq", w, 4, h, 32, 9)
    assert q.scales.shape == (16, 2, 9) and q.codes.shape == (16, 64 * 9)
    by_tap = q.codes.reshape(16, 64, 9) * np.repeat(q.scales, 32, axis=1)       # scale of (channel // 32, tap)
    np.testing.assert_array_equal(dequantize_rows(q.codes, q.scales), by_tap.reshape(16, -1))
    plain = blocked("gptq", w, 4, h, 32)
    one_tap = blocked_taps("gptq", w, 4, h, 32, 1)
    np.testing.assert_array_equal(one_tap.codes, plain.codes)
    np.testing.assert_array_equal(one_tap.scales[:, :, 0], plain.scales)
    per_channel = gptq(w, 4, h)
    assert weighted_error(w, dequantize_rows(q.codes, q.scales), h[None]) < \
        0.8 * weighted_error(w, dequantize_rows(per_channel.codes, per_channel.scales), h[None])


def test_generic_convs_take_float16_blocked_scales_that_onnxruntime_and_openvino_run(tmp_path):
    """Blocks of 32 input channels at each tap: a DequantizeLinear blocked along axis 1 with
    float16 scales [O, C / 32, kh, kw], cast to float; closer to FP32 than one scale a channel,
    and OpenVINO gives onnxruntime's answers."""
    rng = np.random.default_rng(6)
    m = conv_pair(rng)
    cal, held = conv_feeds(rng, 12), conv_feeds(rng, 4)
    cfg = dict(bits=4, act_bits=8, protect=0.0, protect_acts=0.0, sequential=False)
    q_pc, _ = onnxq.convert(m, onnxq.ConvertConfig(block=0, **cfg), calib=cal)
    q_b, rep = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)
    assert {l.node: l.method for l in rep.quantized} == {"c3": "gptq (blocks of 32, zero points)", "c1": "gptq (blocks of 32, zero points)"}
    inits = {t.name: numpy_helper.to_array(t) for t in q_b.graph.initializer}
    assert inits["c3/weight_scale"].shape == (64, 2, 3, 3) and inits["c1/weight_scale"].shape == (32, 2, 1, 1)
    assert inits["c3/weight_scale"].dtype == np.float16 and inits["c3/weight_scale"].nbytes == 64 * 2 * 9 * 2
    nodes = {n.name: n for n in q_b.graph.node}
    for layer in ("c3", "c1"):
        dq = nodes[f"{layer}/weight_dequantize"]
        assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1, "block_size": 32}
        cast = nodes[f"{layer}/weight_cast"]
        assert list(cast.input) == list(dq.output) and list(cast.output) == [f"{layer}/weight_dq"]
        assert nodes[layer].input[1] == f"{layer}/weight_dq"
    ref = outputs(m, held)
    assert sqnr_db(ref, outputs(q_b, held)) > sqnr_db(ref, outputs(q_pc, held)) + 1.0
    assert openvino_sqnr(q_b, held[0]["x"], tmp_path) > 30.0


def test_protect_budget_pays_for_the_blocks_it_keeps():
    """--protect bounds the weights' growth over one scale per channel: the budget is that share of
    the per-channel bytes, and what it buys (blocked scales and their zero points, a 16-bit scale
    and a 4-bit zero point per 32 weights: +15.6% at 4 bits; layers at 8 bits) stays within it."""
    rng = np.random.default_rng(8)
    m, cal = conv_pair(rng), conv_feeds(rng, 16)
    for protect in (0.15, 0.5):
        q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=8, protect=protect, protect_acts=0.0), calib=cal)
        per_channel = (64 * 64 * 9 + 32 * 64) / 2 + (64 + 32) * 4
        blocks = (64 * 2 * 9 + 32 * 2) * (2 + 0.5) - (64 + 32) * 4
        assert rep.protect.budget_bytes == pytest.approx(protect * per_channel)
        assert blocks < rep.protect.budget_bytes and rep.protect.used_bytes <= rep.protect.budget_bytes
    # Gemm/MatMul blocks are bought from the same budget: 32-bit scales and 4-bit zero points, 4 a
    # column of W1 [128, 96] and 3 a row of W2 [64, 96], against one scale a channel
    _, rep = onnxq.convert(mlp(rng), onnxq.ConvertConfig(bits=4, act_bits=32, protect=0.5), calib=feeds(rng, 8))
    per_channel = (K * H + O * H) / 2 + (H + O) * 4
    blocks = (4 * H + 3 * O) * (4 + 0.5) - (H + O) * 4
    assert rep.protect.budget_bytes == pytest.approx(0.5 * per_channel)
    assert blocks < rep.protect.budget_bytes and rep.protect.used_bytes <= rep.protect.budget_bytes


def test_conv_blocks_only_where_the_target_runs_them():
    """ort-cpu (QLinearConv), openvino (u8 convs), qnn and tensorrt keep one scale per output
    channel; so do 8-bit layers and rows of one block."""
    rng = np.random.default_rng(7)
    m, cal = conv_pair(rng), conv_feeds(rng, 8)
    for target in ("ort-cpu", "openvino", "qnn", "tensorrt"):
        _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=8, protect=0.0, target=target), calib=cal)
        assert not any("blocks" in l.method for l in rep.quantized), target
    small = {t.node: t for t in find_targets(conv_pair(rng, c=32))[0]}   # the 1x1 row is one block; the 3x3 has 9
    cfg = onnxq.ConvertConfig(bits=4)
    assert weight_block(small["c3"], 4, cfg) == 32 and weight_block(small["c1"], 4, cfg) == 0
    assert weight_block(small["c3"], 8, cfg) == 0
    assert weight_block(small["c3"], 4, onnxq.ConvertConfig(bits=4, target="openvino")) == 0


def _opset(q) -> int:
    return next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx"))


def test_8bit_blocks_bring_a_matmul_model_closer_to_float():
    """W8A8 of an all-MatMul model (generic: weight-only kernels): blocked 8-bit weights (the
    default here) against one scale per column, in the session the model records (onnxruntime's
    fused MatMulNBits, which also rounds its input per block as it runs)."""
    rng = np.random.default_rng(5)
    m = mlp(rng)
    cal, held = feeds(rng, 16), feeds(rng, 6)
    ref = outputs(m, held)
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8), calib=cal)
    q0, rep0 = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8, block_8bit=False), calib=cal)
    assert rep.config["block_8bit"] is True and rep0.config["block_8bit"] is False
    assert _opset(q) == 21 and _opset(q0) < 21
    db, db0 = (sqnr_db(ref, outputs(x, held, r.session_options)) for x, r in ((q, rep), (q0, rep0)))
    assert db > db0 + 3.0, (db, db0)


def test_8bit_blocks_are_signed_codes_without_zero_points():
    """Blocked 8-bit weights are symmetric: INT8 codes and a DequantizeLinear without its optional
    zero-point input (a UINT8 container would store 128 a block); the model answers exactly as
    with zero points of 0 written out, in the session its report records."""
    rng = np.random.default_rng(6)
    m = mlp(rng)
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8), calib=feeds(rng, 8))
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("/weight_dequantize")]
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert len(dqs) == 2 and all(len(dq.input) == 2 and inits[dq.input[0]].dtype == np.int8 for dq in dqs)
    written = onnx.ModelProto()
    written.CopyFrom(q)
    for dq in (n for n in written.graph.node if n.name.endswith("/weight_dequantize")):
        zero = numpy_helper.from_array(np.zeros(inits[dq.input[1]].shape, np.int8), dq.name + "/zero")
        written.graph.initializer.append(zero)
        dq.input.append(zero.name)
    held = feeds(rng, 3)
    np.testing.assert_array_equal(outputs(q, held, rep.session_options), outputs(written, held, rep.session_options))


def test_8bit_blocked_matmuls_are_rounded_second_order_and_answer_closer():
    """W8A8 of an all-MatMul model whose inputs' channels differ in size: its blocked 8-bit
    Gemm/MatMul weights are rounded second-order (their layer objective below plain rounding's on
    the same blocks), and held-out outputs in the session the model records are closer to float
    than with the blocks' clipping alone (--weight-method mse)."""
    rng = np.random.default_rng(7)
    m = mlp(rng)
    gain = np.exp(rng.standard_normal(K)).astype(np.float32)
    mix = (np.eye(K) + rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    cal, held = ([{"x": (rng.standard_normal((32, K)).astype(np.float32) @ mix) * gain} for _ in range(n)]
                 for n in (16, 6))
    ref = outputs(m, held)
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8), calib=cal)
    q0, rep0 = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8, weight_method="mse"), calib=cal)
    assert rep.config["weight_method"] == "gptq for convs and Gemm/MatMul, mse for the rest"
    assert [l.method for l in rep.quantized] == ["gptq (blocks of 16)"] * 2
    assert all(l.method.startswith("mse") for l in rep0.quantized)
    for layer in rep.quantized:
        assert layer.sqnr_db > layer.sqnr_rtn_db + 1.0, (layer.node, layer.sqnr_db, layer.sqnr_rtn_db)
    db, db0 = (sqnr_db(ref, outputs(x, held, r.session_options)) for x, r in ((q, rep), (q0, rep0)))
    assert db > db0 + 0.5, (db, db0)


def test_8bit_weights_stay_per_column_where_opset_21_is_out_of_reach(monkeypatch):
    """A model the version converter cannot raise converts as before, with a warning."""
    from onnxq import api
    from onnxq.errors import InputModelError

    def refuse(model, target):
        if target >= 21:
            raise InputModelError("cannot upgrade the model from opset 17 to 21: (test)")
        return model
    monkeypatch.setattr(api, "upgrade_opset", refuse)
    rng = np.random.default_rng(6)
    q, rep = onnxq.convert(mlp(rng), onnxq.ConvertConfig(bits=8, act_bits=8), calib=feeds(rng, 8))
    assert not any("blocks" in l.method for l in rep.quantized) and _opset(q) < 21
    assert any("8-bit weights stay per column" in w for w in rep.warnings)


def test_exact_matmuls_keep_the_inputs_float_in_onnxruntime():
    """--exact-matmuls: the same weights, recorded to run with the weights dequantized at load
    (session.disable_quant_qdq) rather than in the fused MatMulNBits that rounds its input to int8
    per block; held out, closer to float. The target that writes its own kernels refuses it.
    (onnxruntime 1.32 fuses a DequantizeLinear -> MatMul read by Tanh, not one read by Relu.)"""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((K, H)) * np.exp(rng.standard_normal((K, 1)))
    w2 = rng.standard_normal((H, O)) * np.exp(rng.standard_normal((H, 1)))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Tanh", ["h"], ["t"], name="act"),
             helper.make_node("MatMul", ["t", "w2"], ["y"], name="down")]
    m = make_model(nodes, [vi("x", ["N", K])], [vi("y", ["N", O])],
                   {"w1": (w1 * 0.05).astype(np.float32), "w2": (w2 * 0.1).astype(np.float32)})
    cal, held = feeds(rng, 16), feeds(rng, 6)
    ref = outputs(m, held)
    # unrotated, so the weights are the same (a default conversion rotates their inputs: test_rotate.py)
    fused, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8, rotate=False), calib=cal)
    exact, rep_x = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8, exact_matmuls=True), calib=cal)
    assert rep.session_options == {} and rep_x.session_options == {"session.disable_quant_qdq": "1"}
    assert rep_x.config["exact_matmuls"] is True
    w = lambda q: sorted((t.name, t.raw_data) for t in q.graph.initializer)   # noqa: E731
    assert w(fused) == w(exact)
    db, db_x = (sqnr_db(ref, outputs(q, held, r.session_options)) for q, r in ((fused, rep), (exact, rep_x)))
    assert db_x > db + 1.0, (db, db_x)
    with pytest.raises(ConfigError, match="exact-matmuls"):
        onnxq.ConvertConfig(bits=8, exact_matmuls=True, target="ort-cpu")
