"""Zero points for blocked 2- to 4-bit weights (--zero-points): each block's grid spans its own
[min, max] (unsigned codes with a zero point per block, the format onnxruntime's and OpenVINO's
4-bit kernels prefer), under the generic and openvino targets; the other targets stay symmetric."""

import numpy as np
import pytest
import onnx
from onnx import numpy_helper
from test_blocks import conv_feeds, conv_pair, feeds, mlp, openvino_sqnr, outputs

import onnxq
from onnxq.plan.rules import RULES
from onnxq.algos.matrix import dequantize_rows
from onnxq.algos.metrics import sqnr_db
from onnxq.algos.qmath import affine_params, stored_bits
from onnxq.algos.weights import blocked, blocked_taps, weighted_error


def skewed(rng, o=48, k=256):
    """Rows whose blocks are lopsided (a shifted, heavy-tailed half), as trained filters often are."""
    w = rng.standard_normal((o, k)) * np.exp(rng.standard_normal((1, k)) * 0.5)
    lopsided = (rng.random((o, k // 32, 1)) < 0.5).repeat(32, axis=2).reshape(o, k)     # half the blocks
    return w + 0.8 * np.abs(rng.standard_normal((o, k))) * lopsided


def test_affine_params_cover_the_range_and_keep_zero_exact():
    s, z = affine_params(np.array([-1.0, 0.5, -3.0]), np.array([2.0, 4.0, -1.0]), 4)
    np.testing.assert_allclose(s, [3.0 / 15, 4.0 / 15, 3.0 / 15])        # ranges widened to contain 0
    np.testing.assert_array_equal(z, [5, 0, 15])
    assert np.all((z >= 0) & (z <= 15))


@pytest.mark.parametrize("method", ["rtn", "mse", "gptq"])
def test_affine_blocks_lower_the_layer_objective(method):
    """On every method the affine grid is closer on the layer objective than the symmetric one at
    the same blocks, and each code stays within its block's unsigned range once its zero point is
    added back."""
    rng = np.random.default_rng(11)
    w = skewed(rng)
    x = rng.standard_normal((4000, 256)) * np.exp(rng.standard_normal(256) * 0.5)
    h = x.T @ x / len(x)
    sym, aff = blocked(method, w, 4, h, 32), blocked(method, w, 4, h, 32, affine=True)
    assert sym.zero_points is None and aff.zero_points.shape == aff.scales.shape == (48, 8)
    stored = aff.codes + np.repeat(aff.zero_points, 32, axis=1)
    assert stored.min() >= 0 and stored.max() <= 15 and aff.codes.min() < -7     # more than the symmetric grid
    e_sym = weighted_error(w, dequantize_rows(sym.codes, sym.scales), h[None])
    e_aff = weighted_error(w, dequantize_rows(aff.codes, aff.scales), h[None])
    assert e_aff < 0.8 * e_sym


def test_conv_taps_carry_their_zero_points():
    rng = np.random.default_rng(12)
    w = skewed(rng, 16, 64 * 9)
    x = rng.standard_normal((3000, 64 * 9))
    q = blocked_taps("gptq", w, 4, x.T @ x / len(x), 32, 9, affine=True)
    assert q.zero_points.shape == q.scales.shape == (16, 2, 9)
    stored = q.codes.reshape(16, 64, 9) + np.repeat(q.zero_points, 32, axis=1)
    assert stored.min() >= 0 and stored.max() <= 15


def stored_weight(model, layer: str) -> np.ndarray:
    """The float weight a layer's DequantizeLinear makes from the file's codes, scales and zero
    points, computed in numpy (in float16 where the scales are: the DequantizeLinear's output type)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, s, z = (inits[f"{layer}/weight_{k}"] for k in ("q", "scale", "zero"))
    dq = next(n for n in model.graph.node if n.name == f"{layer}/weight_dequantize")
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    block = q.shape[axis] // s.shape[axis]
    full = lambda a: np.repeat(a.astype(s.dtype), block, axis=axis)     # noqa: E731
    return (q.astype(s.dtype) - full(z)) * full(s)


def with_weights(model, weights: dict) -> "onnx.ModelProto":
    """The FP32 model with its weight initializers replaced."""
    out = model.__class__()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    return out


def test_generic_emits_unsigned_codes_with_zero_points_that_runtimes_run(tmp_path):
    """Convs (float16 scales) and a MatMul/Gemm: UINT4 codes and zero points shaped as the
    scales; onnxruntime runs the weight (codes - zero point) * scale that numpy makes of them;
    the model is closer to FP32 than with symmetric blocks, and OpenVINO gives onnxruntime's
    answers."""
    rng = np.random.default_rng(13)
    # one pass: the two grids' own codes (sequential mode, on by default weight-only, recodes later layers)
    # the MLP is all weight-only: unrotated, so that its stored weights are the graph's own (graph/rotate.py)
    cfg = dict(bits=4, act_bits=32, protect=0.0, protect_acts=0.0, bias_correction=False, sequential=False,
               rotate=False)
    for m, cal, held in ((conv_pair(rng), conv_feeds(rng, 12), conv_feeds(rng, 4)), (mlp(rng), feeds(rng, 8), feeds(rng, 4))):
        q_sym, _ = onnxq.convert(m, onnxq.ConvertConfig(zero_points=False, **cfg), calib=cal)
        q, rep = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)
        assert all(l.method == "gptq (blocks of 32, zero points)" for l in rep.quantized)
        inits = {t.name: t for t in q.graph.initializer}
        for layer in (l.node for l in rep.quantized):
            assert inits[f"{layer}/weight_q"].data_type == inits[f"{layer}/weight_zero"].data_type == 21   # UINT4
            assert numpy_helper.to_array(inits[f"{layer}/weight_zero"]).any()
        weight_of = {n.name: n.input[1] for n in m.graph.node if len(n.input) > 1}
        shapes = {t.name: tuple(t.dims) for t in m.graph.initializer}
        stored = {weight_of[l.node]: stored_weight(q, l.node) for l in rep.quantized}
        # a Gemm (transB=1) written as MatMul under generic stores its weight as [K, N]
        same = with_weights(m, {k: w if w.shape == shapes[k] else w.T for k, w in stored.items()})
        # as the generic target runs it (weights folded at load: exact float arithmetic; onnxruntime's
        # default session runs the Gemm/MatMul on MatMulNBits, which rounds its input to int8)
        exact = RULES["generic"].session_options
        np.testing.assert_allclose(outputs(q, held, exact), outputs(same, held), rtol=1e-4, atol=1e-4)
        ref = outputs(m, held)
        assert sqnr_db(ref, outputs(q, held)) > sqnr_db(ref, outputs(q_sym, held))
    assert openvino_sqnr(q, held[0]["x"], tmp_path) > 30.0


@pytest.mark.parametrize("target", ["tensorrt", "qnn"])
def test_targets_whose_kernels_want_symmetric_weights_keep_them(target):
    rng = np.random.default_rng(14)
    q, rep = onnxq.convert(mlp(rng), onnxq.ConvertConfig(bits=4, act_bits=8, protect=0.0, target=target),
                           calib=feeds(rng, 8))
    assert not any("zero points" in l.method for l in rep.quantized)
    for t in q.graph.initializer:
        if t.name.endswith("/weight_zero"):
            assert not numpy_helper.to_array(t).astype(np.int32).any()


def test_zero_points_are_counted_in_the_bytes():
    """A zero point per scale takes its codes' container: 4 bits a block at 4 bits."""
    assert stored_bits(1024, 4, 32, 16, zero_points=True) == 1024 * 4 + 32 * (16 + 4)
    assert stored_bits(1024, 4, 32, 16) == 1024 * 4 + 32 * 16
    assert stored_bits(1024, 8, 32, 32, zero_points=True) == 1024 * 8 + 32 * (32 + 8)


def test_the_cli_flag_turns_them_off(cli_run, tmp_path):
    """--no-zero-points gives the symmetric blocks: signed codes, and no zero-point input (all
    would be 0, one a block)."""
    rng = np.random.default_rng(15)
    m = conv_pair(rng)
    src, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnxq.save(m, src)
    calib.mkdir()
    for i, f in enumerate(conv_feeds(rng, 6)):
        np.savez(calib / f"{i}.npz", x=f["x"])
    for flag, dtype in (("--zero-points", 21), ("--no-zero-points", 22)):      # UINT4, INT4
        out = tmp_path / f"{flag}.onnx"
        code, _, err = cli_run("convert", src, "--bits", "4", "--no-protect", "--calib", calib, "-o", out, flag)
        assert code == 0, err
        inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
        assert inits["c3/weight_q"].data_type == dtype
        dq = next(n for n in onnx.load(str(out)).graph.node if n.name == "c3/weight_dequantize")
        if flag == "--zero-points":
            assert inits["c3/weight_zero"].data_type == dtype and dq.input[2] == "c3/weight_zero"
        else:
            assert "c3/weight_zero" not in inits and len(dq.input) == 2
