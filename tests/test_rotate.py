"""Block rotations of the inputs of weight-only Gemm/MatMul layers, 8- and 4-bit (graph/rotate.py): the
same function in float, and in onnxruntime's fused MatMulNBits, which rounds its input to int8 per
block, closer to float where a few input channels are far larger than the rest."""

import numpy as np
import onnx
import onnxruntime as ort
from builders import make_model, vi
from onnx import helper, numpy_helper

import onnxq
from onnxq.algos.metrics import sqnr_db
from onnxq.graph.rotate import ROTATE_PREFIX, ROTATE_REASON, hadamard, rotate_inputs
from onnxq.graph.smooth import smoothable
from onnxq.graph.targets import find_targets

K, H, O = 64, 96, 48


def encoder_block(rng):
    """x [B, T, K] read by two MatMuls (a shared input, like Q and K), a Tanh, then a Gemm (transB)
    on a 2-D view: the readers a LayerNorm output and an MLP give a transformer's weights."""
    w = {"wq": rng.standard_normal((K, H)) * 0.1, "wk": rng.standard_normal((K, H)) * 0.1,
         "wo": rng.standard_normal((O, H)) * 0.1, "flat": np.array([-1, H], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
             helper.make_node("Add", ["q", "k"], ["s"], name="sum"),
             helper.make_node("Tanh", ["s"], ["t"], name="act"),
             helper.make_node("Reshape", ["t", "flat"], ["t2"], name="flatten"),
             helper.make_node("Gemm", ["t2", "wo"], ["y"], name="out", transB=1)]
    inits = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in w.items()}
    return make_model(nodes, [vi("x", ["B", "T", K])], [vi("y", ["N", O])], inits)


def conv_then_block(rng):
    """The block behind a 1-D conv (x0 [B, K, T] -> Conv k=1 -> Transpose -> x), whose input a W4A8
    conversion quantizes."""
    m = encoder_block(rng)
    w = numpy_helper.from_array((rng.standard_normal((K, K, 1)) * 0.2).astype(np.float32), "wc")
    nodes = [helper.make_node("Conv", ["x0", "wc"], ["c"], name="conv"),
             helper.make_node("Transpose", ["c"], ["x"], perm=[0, 2, 1], name="to_tokens")]
    return make_model(nodes + list(m.graph.node), [vi("x0", ["B", K, "T"])], list(m.graph.output),
                      {i.name: numpy_helper.to_array(i) for i in [w, *m.graph.initializer]})


def feeds(rng, n, loud=()):
    """Inputs with a few channels 30 times the rest, as LayerNorm outputs carry."""
    gain = np.ones(K, np.float32)
    gain[list(loud)] = 30.0
    return [{"x": rng.standard_normal((1, 16, K)).astype(np.float32) * gain} for _ in range(n)]


def run(model, fs, options=None):
    so = ort.SessionOptions()
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, v)
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [s.run(None, f) for f in fs]


def test_hadamard_is_orthonormal():
    for n in (1, 2, 16, 32):
        h = hadamard(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)


def test_rotation_is_the_same_function_in_float():
    rng = np.random.default_rng(0)
    m = encoder_block(rng)
    fs = feeds(rng, 3, loud=(3, 40))
    ref = run(m, fs)
    targets, _ = find_targets(m)
    groups = smoothable(m, targets, convs=False)
    assert sorted(groups) == ["t2", "x"] and sorted(t.node for t in groups["x"]) == ["key", "query"]
    done = rotate_inputs(m, groups, 16, seed=0)
    assert sorted(done) == ["t2", "x"]
    onnx.checker.check_model(m)
    got = run(m, fs)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-5)
    again, _ = find_targets(m)       # the rotations themselves are not layers to quantize
    assert sorted(t.node for t in again) == ["key", "out", "query"]
    assert sum(n.name.startswith(ROTATE_PREFIX) for n in m.graph.node) == 6


def test_w8a8_rotated_inputs_are_closer_to_float_in_a_default_session():
    """W8A8 of the block (every layer weight-only, blocked): the readers run as MatMulNBits in a
    default session either way; held out, the rotated conversion is closer to float. The report
    names the rotated inputs and the rotations' nodes as float ops with their reason; the same seed
    gives the same bytes."""
    rng = np.random.default_rng(1)
    m = encoder_block(rng)
    cal, held = feeds(rng, 16, loud=(3, 40)), feeds(rng, 8, loud=(3, 40))
    ref = run(m, held)
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8), calib=cal)
    q0, rep0 = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8, rotate=False), calib=cal)
    assert sorted(rep.rotated) == ["t2", "x"] and rep0.rotated == []
    assert rep.session_options == {} == rep0.session_options     # meant for a default session
    assert {f.reason for f in rep.float_ops if f.node.startswith(ROTATE_PREFIX)} == {ROTATE_REASON}
    for model in (q, q0):
        fused = onnx.load_from_string(onnxq.runtime.default_session_graph(model))
        assert sum(n.op_type == "MatMulNBits" for n in fused.graph.node) == 3
    db, db0 = (sqnr_db(ref, run(x, held)) for x in (q, q0))
    assert db > db0 + 3.0, (db, db0)
    q2, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8), calib=cal)
    assert q2.SerializeToString() == q.SerializeToString()


def test_w4a8_rotated_inputs_are_closer_to_float_in_a_default_session():
    """W4A8 of the block: every layer weight-only at 4 bits, fused into 4-bit MatMulNBits in a
    default session, which rounds the inputs to int8 per block too; held out, the rotated
    conversion is closer to float."""
    rng = np.random.default_rng(4)
    m = encoder_block(rng)
    cal, held = feeds(rng, 16, loud=(3, 40)), feeds(rng, 8, loud=(3, 40))
    ref = run(m, held)
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=4), calib=cal)
    q0, rep0 = onnxq.convert(m, onnxq.ConvertConfig(bits=4, rotate=False), calib=cal)
    assert sorted(rep.rotated) == ["t2", "x"] and rep0.rotated == []
    assert {x.bits for x in rep.quantized} == {4} and all(x.activation_bits >= 32 for x in rep.quantized)
    for model in (q, q0):
        fused = onnx.load_from_string(onnxq.runtime.default_session_graph(model))
        assert sum(n.op_type == "MatMulNBits" for n in fused.graph.node) == 3
    db, db0 = (sqnr_db(ref, run(x, held)) for x in (q, q0))
    assert db > db0 + 1.0, (db, db0)


def test_no_rotation_where_the_inputs_stay_float_or_are_quantized():
    """--exact-matmuls keeps the inputs float (nothing to rotate for); openvino runs its
    weight-only layers on float inputs; a conv's input is quantized at W4A8."""
    rng = np.random.default_rng(2)
    m = encoder_block(rng)
    cal = feeds(rng, 8, loud=(3,))
    for cfg in (onnxq.ConvertConfig(bits=8, act_bits=8, exact_matmuls=True),
                onnxq.ConvertConfig(bits=4, exact_matmuls=True),
                onnxq.ConvertConfig(bits=8, target="openvino"), onnxq.ConvertConfig(bits=4, target="openvino")):
        _, rep = onnxq.convert(m, cfg, calib=cal)
        assert rep.rotated == [], cfg
    _, rep = onnxq.convert(conv_then_block(rng), onnxq.ConvertConfig(bits=4),
                           calib=[{"x0": f["x"].transpose(0, 2, 1).copy()} for f in cal])
    assert rep.rotated == [] and any(q.node == "conv" and q.activation_bits == 8 for q in rep.quantized)
    assert sum(q.activation_bits >= 32 for q in rep.quantized) == 3      # the block's readers: candidates


def test_loaded_statistics_bring_the_rotations_they_were_collected_under(tmp_path):
    """Second moments are in the basis they were collected in: statistics saved by a rotated
    conversion rotate a conversion that loads them the same way (same bytes), and statistics saved
    without rotations leave the inputs as they are, with a warning, as --no-rotate would."""
    rng = np.random.default_rng(3)
    m = encoder_block(rng)
    cal = feeds(rng, 12, loud=(3, 40))
    cfg, plain = onnxq.ConvertConfig(bits=8, act_bits=8), onnxq.ConvertConfig(bits=8, act_bits=8, rotate=False)
    q, rep = onnxq.convert(m, cfg, calib=cal, save_stats=str(tmp_path / "rotated.npz"))
    q0, _ = onnxq.convert(m, plain, calib=cal, save_stats=str(tmp_path / "plain.npz"))
    again, rep1 = onnxq.convert(m, cfg, calib=cal, stats=str(tmp_path / "rotated.npz"))
    assert rep1.rotated == rep.rotated == ["t2", "x"] and not rep1.warnings
    assert again.SerializeToString() == q.SerializeToString()
    kept, rep2 = onnxq.convert(m, cfg, calib=cal, stats=str(tmp_path / "plain.npz"))
    assert rep2.rotated == [] and any("not rotated" in w for w in rep2.warnings)
    assert kept.SerializeToString() == q0.SerializeToString()
