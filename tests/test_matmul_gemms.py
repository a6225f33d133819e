"""generic: a 4-bit Gemm on a weight blocked along K is emitted as MatMul (+ Add), which
onnxruntime's default session fuses into MatMulNBits instead of dequantizing the weight every run
(graph/matmuls.py)."""

import collections

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph.rotate import ROTATE_PREFIX
from onnxq.algos.metrics import sqnr_db
from onnxq.graph.matmuls import gemms_as_matmuls

K, N, BLOCK = 64, 48, 16


def _run(model: onnx.ModelProto, feeds: dict, optimized: bool = False, path: str | None = None):
    so = ort.SessionOptions()
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if path:
        so.optimized_model_filepath = path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _weight(g_nodes, inits, name: str, trans_b: int, rng, zero: bool = False):
    """A DQ of 4-bit codes blocked along K: [N, K] on axis 1 (transB=1) or [K, N] on axis 0."""
    shape, axis = ((N, K), 1) if trans_b else ((K, N), 0)
    codes = rng.integers(-8, 8, shape) if not zero else rng.integers(0, 16, shape)
    s_shape = (N, K // BLOCK) if trans_b else (K // BLOCK, N)
    inits[f"{name}_q"] = codes.astype(ml_dtypes.uint4 if zero else ml_dtypes.int4)
    inits[f"{name}_s"] = (0.01 + 0.05 * rng.random(s_shape)).astype(np.float32)
    ins = [f"{name}_q", f"{name}_s"]
    if zero:
        inits[f"{name}_z"] = rng.integers(4, 12, s_shape).astype(ml_dtypes.uint4)
        ins.append(f"{name}_z")
    g_nodes.append(helper.make_node("DequantizeLinear", ins, [name], name=f"{name}_dq", axis=axis, block_size=BLOCK))


def _gemms() -> onnx.ModelProto:
    """Gemms on their own 4-bit weights: transB=1 with C [N] and with C [1, N], transB=0 with zero
    points and no C. Kept as they are: two Gemms reading one DQ, a weight a Mul reads too, and one
    an If branch reads too."""
    rng = np.random.default_rng(0)
    nodes, inits = [], {"c": (rng.standard_normal(N) / 4).astype(np.float32),
                        "c2": (rng.standard_normal((1, N)) / 4).astype(np.float32)}
    for name, trans_b, zero in (("own", 1, False), ("own2", 1, False), ("own0", 0, True), ("shared", 1, False),
                                ("also_mul", 1, False), ("also_if", 1, False)):
        _weight(nodes, inits, name, trans_b, rng, zero)
    branch = helper.make_graph([helper.make_node("Gemm", ["x", "also_if"], ["in_if"], transB=1)], "b", [],
                               [vi("in_if", [2, N])])
    nodes += [helper.make_node("Gemm", ["x", "own", "c"], ["g0"], name="g0", transB=1),
              helper.make_node("Gemm", ["x", "own2", "c2"], ["g1"], name="g1", transB=1),
              helper.make_node("Gemm", ["x", "own0"], ["g2"], name="g2"),
              helper.make_node("Gemm", ["x", "shared", "c"], ["g3"], name="g3", transB=1),
              helper.make_node("Gemm", ["x", "shared"], ["g4"], name="g4", transB=1),
              helper.make_node("Gemm", ["x", "also_mul", "c"], ["g5"], name="g5", transB=1),
              helper.make_node("Mul", ["also_mul", "also_mul"], ["sq"], name="sq"),
              helper.make_node("Gemm", ["x", "also_if"], ["g6"], name="g6", transB=1),
              helper.make_node("If", ["flag"], ["y_if"], name="if", then_branch=branch, else_branch=branch)]
    outs = ["g0", "g1", "g2", "g3", "g4", "g5", "sq", "g6", "y_if"]
    shapes = {"sq": [N, K], "y_if": [2, N]}
    return make_model(nodes, [vi("x", [2, K]), vi("flag", [], TensorProto.BOOL)],
                      [vi(o, shapes.get(o, [2, N])) for o in outs], inits, opset=21, ir=10)


def _chain(shared: bool, steps: int = 6, width: int = 64) -> onnx.ModelProto:
    """h_{k+1} = tanh(h_k W_k^T + b_k): the steps of an unrolled loop, each with its own weight or
    (`shared`) all reading one."""
    rng = np.random.default_rng(4)
    nodes, inits, h = [], {}, "x"
    for k in range(steps):
        w = "w" if shared else f"w{k}"
        inits.setdefault(w, (rng.standard_normal((width, width)) / 8).astype(np.float32))
        inits[f"b{k}"] = (rng.standard_normal(width) / 8).astype(np.float32)
        nodes += [helper.make_node("Gemm", [h, w, f"b{k}"], [f"g{k}"], name=f"step{k}", transB=1),
                  helper.make_node("Tanh", [f"g{k}"], [f"h{k}"])]
        h = f"h{k}"
    return make_model(nodes, [vi("x", [None, width])], [vi(h, [None, width])], inits)


def test_gemms_on_their_own_blocked_4bit_weights_become_matmuls_with_the_same_values():
    m = _gemms()
    q = onnx.ModelProto()
    q.CopyFrom(m)
    assert gemms_as_matmuls(q) == 3                    # g0, g1, g2
    onnx.checker.check_model(q, full_check=True)
    by_name = {n.name: n for n in q.graph.node}
    assert [by_name[f"g{i}"].op_type for i in range(7)] == ["MatMul"] * 3 + ["Gemm"] * 4
    dq = by_name["own_dq"]
    inits = {t.name: t for t in q.graph.initializer}
    assert list(inits["own_q"].dims) == [K, N] and list(inits["own_s"].dims) == [K // BLOCK, N]
    assert [(a.name, a.i) for a in dq.attribute] == [("axis", 0), ("block_size", BLOCK)]
    assert list(inits["shared_q"].dims) == [N, K]      # untouched
    assert "g2/bias_add" not in by_name and list(by_name["g0/bias_add"].input) == ["g0/matmul_out", "c"]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, K)).astype(np.float32), "flag": np.array(True)}
    for want, got in zip(_run(m, feeds), _run(q, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gemms_on_their_own_8bit_weights_with_one_scale_per_column_become_matmuls():
    """transB=1: UINT8 codes [N, K] with zero point 128 per row (axis 0) become [K, N] per column
    (axis 1); transB=0: INT8 codes [K, N] per column stay as they are."""
    rng = np.random.default_rng(2)
    inits = {"u_q": rng.integers(0, 256, (N, K)).astype(np.uint8), "u_s": (0.01 + 0.01 * rng.random(N)).astype(np.float32),
             "u_z": np.full(N, 128, np.uint8), "i_q": rng.integers(-127, 128, (K, N)).astype(np.int8),
             "i_s": (0.01 + 0.01 * rng.random(N)).astype(np.float32), "c": rng.standard_normal(N).astype(np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["u_q", "u_s", "u_z"], ["u"], name="u_dq", axis=0),
             helper.make_node("DequantizeLinear", ["i_q", "i_s"], ["i"], name="i_dq", axis=1),
             helper.make_node("Gemm", ["x", "u", "c"], ["g0"], name="g0", transB=1),
             helper.make_node("Gemm", ["x", "i"], ["g1"], name="g1")]
    m = make_model(nodes, [vi("x", [2, K])], [vi("g0", [2, N]), vi("g1", [2, N])], inits)
    q = onnx.ModelProto()
    q.CopyFrom(m)
    assert gemms_as_matmuls(q) == 2
    by_name = {n.name: n for n in q.graph.node}
    assert by_name["g0"].op_type == by_name["g1"].op_type == "MatMul"
    assert [(a.name, a.i) for a in by_name["u_dq"].attribute] == [("axis", 1)]
    assert [list(t.dims) for t in q.graph.initializer if t.name == "u_q"] == [[K, N]]
    feeds = {"x": rng.standard_normal((2, K)).astype(np.float32)}
    for want, got in zip(_run(m, feeds), _run(q, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shared", [False, True])
def test_generic_gemms_run_on_onnxruntimes_weight_only_kernel(tmp_path, shared, bits):
    """Converted to 4 or 8 bits under generic, each step with its own weight is a MatMul that
    onnxruntime's default session fuses into MatMulNBits of those bits (no weight left to
    dequantize as it runs), with the answers of the graph as written; steps that share one
    weight (stored once) keep their Gemms."""
    m = _chain(shared)
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(12)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=bits, act_bits=8), calib=feeds[:8])
    assert rep.shared_weights == (1 if shared else 0)
    # the layers' own ops (an all-weight-only 8-bit conversion adds float rotations of their inputs)
    ops = collections.Counter(n.op_type for n in q.graph.node if not n.name.startswith(ROTATE_PREFIX))
    assert (ops["Gemm"], ops["MatMul"]) == ((6, 0) if shared else (0, 6)), ops
    assert all(l.activation_bits == 32 for l in rep.quantized)        # weight-only: the kernel reads float
    assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    fused = tmp_path / "fused.onnx"
    _run(q, feeds[0], optimized=True, path=str(fused))
    runs = onnx.load(str(fused)).graph.node
    after = collections.Counter(n.op_type for n in runs)
    assert after["MatMulNBits"] == (0 if shared else 6) and after["DequantizeLinear"] == (6 if shared else 0), after
    raised = len(rep.protect.protected) if rep.protect else 0       # --protect keeps these at 8 bits
    assert sorted(a.i for n in runs if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits") == \
        sorted([bits] * (after["MatMulNBits"] - raised) + [8] * raised)
    # a default session would dequantize a shared weight every call: the model keeps the entry
    assert rep.session_options == ({"session.disable_quant_qdq": "1"} if shared else {})
    want = np.concatenate([_run(q, f)[0] for f in feeds[8:]])
    got = np.concatenate([_run(q, f, optimized=True)[0] for f in feeds[8:]])
    fp32 = np.concatenate([_run(m, f)[0] for f in feeds[8:]])
    # the fused kernel rounds its float input to int8 per block as it runs: about 40 dB here
    assert sqnr_db(want, got) > 35 and sqnr_db(fp32, want) > (12 if bits == 4 else 30)


def test_4bit_gemms_with_one_scale_per_column_run_on_onnxruntimes_kernel_too(tmp_path):
    """K = 40 holds no block of 32: the 4-bit weights keep one scale per output column, and those
    Gemms become MatMuls that the default session fuses as well."""
    m = _chain(False, width=40)
    feeds = [{"x": np.random.default_rng(s).standard_normal((4, 40)).astype(np.float32)} for s in range(10)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4, act_bits=8, protect=0), calib=feeds[:8])
    assert all(l.bits == 4 and "blocks" not in l.method for l in rep.quantized)
    assert collections.Counter(n.op_type for n in q.graph.node)["MatMul"] == 6
    fused = tmp_path / "fused.onnx"
    _run(q, feeds[0], optimized=True, path=str(fused))
    after = collections.Counter(n.op_type for n in onnx.load(str(fused)).graph.node)
    assert after["MatMulNBits"] == 6 and after["DequantizeLinear"] == 0, after
    assert rep.session_options == {}
