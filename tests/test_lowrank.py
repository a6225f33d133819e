"""Low-rank residual branches: the math on its objective, the allocation, and emitted graphs."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxq
from onnxq.plan.rules import RULES
from onnxq.algos.lowrank import allocate_ranks, factors, spectrum
from builders import conv_zoo, make_model, vi


def hweighted(e, h):
    return float(np.einsum("ok,kl,ol->", e, h, e))


def merged_weight(q: onnx.ModelProto, node: str, shape) -> np.ndarray:
    """Q(W) + B·A of a conv with a float branch, read back from the emitted initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    wq = inits[f"{node}/weight_q"].astype(np.float32) * inits[f"{node}/weight_scale"][:, None, None, None]
    a = inits[f"{node}/residual/A_weight"].reshape(inits[f"{node}/residual/A_weight"].shape[0], -1)
    b = inits[f"{node}/residual/B_weight"][:, :, 0, 0]
    return (wq.reshape(shape[0], -1) + b @ a).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_whitened_factors_never_lose_to_plain_svd_on_output_error(seed, rank):
    rng = np.random.default_rng(seed)
    o, k = 32, 40
    x = rng.standard_normal((400, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / 3)
    h = x.T @ x / 400
    resid = rng.standard_normal((o, k)) * 0.1
    aw, bw = factors(spectrum(resid, h, 16, "whitened", damp=0.0), rank)
    ap, bp = factors(spectrum(resid, h, 16, "svd", damp=0.0), rank)
    ew, ep = hweighted(resid - bw @ aw, h), hweighted(resid - bp @ ap, h)
    assert ew <= ep * (1 + 1e-9)


def test_whitened_gain_is_exactly_the_squared_singular_value():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 12))
    h = x.T @ x / 300
    resid = rng.standard_normal((8, 12))
    sp = spectrum(resid, h, 8, "whitened", damp=0.0)
    before = hweighted(resid, h)
    for r in range(1, 5):
        a, b = factors(sp, r)
        assert hweighted(resid - b @ a, h) == pytest.approx(before - sp.gains()[:r].sum(), rel=1e-6)
        mid = a @ h @ a.T                        # middle activation: unit variance, uncorrelated
        assert np.allclose(mid, np.eye(r), atol=1e-6)


def test_error_falls_as_rank_grows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 20))
    h = x.T @ x / 200
    resid = rng.standard_normal((16, 20))
    sp = spectrum(resid, h, 16, "whitened")
    errs = [hweighted(resid - np.matmul(*factors(sp, r)[::-1]), h) for r in range(0, 9)]
    assert all(a >= b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("budget", [0, 7, 100, 1000, 10**6])
def test_allocation_respects_the_budget_exactly(budget):
    rng = np.random.default_rng(3)
    gains = [np.sort(rng.random(10))[::-1] for _ in range(6)]
    costs = [int(c) for c in rng.integers(5, 60, 6)]
    ranks = allocate_ranks(gains, costs, budget)
    spent = sum(r * c for r, c in zip(ranks, costs))
    assert spent <= budget
    assert all(0 <= r <= 10 for r in ranks)
    # nothing affordable left unchosen: every layer's next rank would overflow or is exhausted
    assert all(r == 10 or spent + c > budget for r, c in zip(ranks, costs)) or budget >= 10**6


def test_budget_zero_emits_no_branch(feeds):
    q, rep = onnxq.convert(conv_zoo(np.random.default_rng(0)), onnxq.ConvertConfig(bits=4), calib=feeds())
    assert not any("/residual/" in n.name for n in q.graph.node)
    assert all(l.branch_rank == 0 for l in rep.quantized)


@pytest.mark.parametrize("target", ["generic", "qnn"])
def test_int8_branches_are_named_valid_and_within_budget(feeds, target):
    m = conv_zoo(np.random.default_rng(0))
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=3, rank_budget=0.1, target=target), calib=feeds())
    onnx.checker.check_model(q)
    names = {n.name for n in q.graph.node}
    with_branch = [l for l in rep.quantized if l.branch_rank]
    assert with_branch
    for l in with_branch:
        assert {f"{l.node}/residual/{p}" for p in ("A", "B", "add")} <= names
        assert l.sqnr_with_branch_db > l.sqnr_db
    inits = {t.name: t for t in q.graph.initializer}
    factors = [n for n in inits if "/residual/" in n and n.endswith("_weight_q")]
    assert len(factors) == 2 * len(with_branch)
    # centred: A has a bias, int32 codes where the layer reads a quantized input, else float (the
    # 3-bit Gemms read a float input under generic: weight-only; qnn rounds every layer's input)
    for l in with_branch:
        coded = l.activation_bits < 32
        assert (f"{l.node}/residual/A_bias_q" in inits) == coded and (f"{l.node}/residual/A_bias" in inits) != coded
    assert any(l.activation_bits < 32 for l in with_branch) == (target == "qnn")
    # A reads the layer's input as a conv's / Gemm's weight: UINT8 with zero point 128 under
    # generic, like the layers' 8-bit weights (onnxruntime's fused u8 x u8 kernels do not saturate);
    # B reads the branch's int8 middle tensor
    u8 = RULES[target].u8_weights
    for n in factors:
        a = n.endswith("/A_weight_q") and u8
        assert inits[n].data_type == (onnx.TensorProto.UINT8 if a else onnx.TensorProto.INT8), n
        zero = numpy_helper.to_array(inits[n.removesuffix("_q") + "_zero"])
        assert np.all(zero == (128 if a else 0)), n
    biases = [n for n in inits if "/residual/" in n and n.endswith("A_bias_q")]
    assert all(inits[n].data_type == onnx.TensorProto.INT32 for n in biases)
    assert rep.branches.used_params <= rep.branches.budget_params
    assert sum(l.branch_params for l in rep.quantized) == rep.branches.used_params
    # one byte a factor code, plus scales, zero points and the A bias
    assert rep.branches.used_params < rep.branches.bytes < 2 * rep.branches.used_params + 2000
    none, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=3), calib=feeds())
    assert q.ByteSize() - none.ByteSize() >= rep.branches.used_params
    assert rep.fidelity.cosine > 0.98


def test_float_branch_block_equals_conv_with_corrected_weight():
    """QConv(x) + B(A(x)) == Conv(x, Q(W) + B·A) when nothing else is quantized."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])],
                   [vi("x", [1, 4, 9, 9])], [vi("y", [1, 8, 5, 5])], {"w": w})
    cal = [{"x": rng.standard_normal((1, 4, 9, 9)).astype(np.float32)} for _ in range(16)]
    cfg = onnxq.ConvertConfig(bits=3, act_bits=32, rank_budget=0.5, branch_bits=32, bias_correction=False)
    q, rep = onnxq.convert(m, cfg, calib=cal)
    assert rep.quantized[0].branch_rank > 0
    merged = merged_weight(q, rep.quantized[0].node, w.shape)
    ref = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])],
                     [vi("x", [1, 4, 9, 9])], [vi("y", [1, 8, 5, 5])], {"w": merged})
    x = cal[0]
    got = ort.InferenceSession(q.SerializeToString()).run(None, x)[0]
    want = ort.InferenceSession(ref.SerializeToString()).run(None, x)[0]
    assert np.allclose(got, want, atol=1e-4)


def test_centred_branch_block_equals_conv_with_corrected_weight_and_bias():
    """With bias correction the branch is centred: QConv(x) + B(A(x) + c) equals
    Conv(x, Q(W) + B·A, bias + B·c), and A(x) + c is zero-mean on the calibration data while
    its spread stays (the middle range is set on that spread)."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    m = make_model([conv], [vi("x", [1, 4, 9, 9])], [vi("y", [1, 8, 9, 9])], {"w": w})
    cal = [{"x": (rng.standard_normal((1, 4, 9, 9)) + 6.0).astype(np.float32)} for _ in range(16)]
    cfg = onnxq.ConvertConfig(bits=3, act_bits=32, rank_budget=0.5, branch_bits=32)
    q, rep = onnxq.convert(m, cfg, calib=cal)
    node = rep.quantized[0].node
    assert rep.quantized[0].branch_rank > 0
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    c = inits[f"{node}/residual/A_bias"]
    bias = inits[f"{node}/bias"] + inits[f"{node}/residual/B_weight"][:, :, 0, 0] @ c
    ref = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
                     [vi("x", [1, 4, 9, 9])], [vi("y", [1, 8, 9, 9])],
                     {"w": merged_weight(q, node, w.shape), "b": bias.astype(np.float32)})
    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    probe.graph.output.append(helper.make_tensor_value_info(f"{node}/residual/A_out", onnx.TensorProto.FLOAT, None))
    sess, want = ort.InferenceSession(probe.SerializeToString()), ort.InferenceSession(ref.SerializeToString())
    mids = []
    for x in cal:
        got, mid = sess.run(None, x)
        assert np.allclose(got, want.run(None, x)[0], atol=1e-4)
        mids.append(mid)
    mids = np.concatenate(mids)
    mean, sd = mids.mean(axis=(0, 2, 3)), mids.std(axis=(0, 2, 3))
    assert np.all(np.abs(mean) < 0.05 * sd)
    assert np.max(np.abs(c)) > np.max(sd)     # uncentred, the input's mean (6) would stretch the range


def test_int16_branches_store_int16_codes_and_run(feeds):
    m = conv_zoo(np.random.default_rng(0))
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=3, rank_budget=0.1, branch_bits=16), calib=feeds())
    onnx.checker.check_model(q)
    inits = {t.name: t for t in q.graph.initializer}
    codes = [n for n in inits if "/residual/" in n and n.endswith("_weight_q")]
    assert codes and all(inits[n].data_type == onnx.TensorProto.INT16 for n in codes)
    assert all(inits[n].data_type == onnx.TensorProto.INT16 for n in inits if n.endswith("/mid/act_zero"))
    assert rep.fidelity.cosine > 0.98


def _two_paths(rng, quiet: float) -> onnx.ModelProto:
    """y = conv1(x) + quiet * conv2(x): the same kind of layer twice, one the output barely sees."""
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y1"], pads=[1] * 4, name="loud"),
             helper.make_node("Conv", ["x", "w2"], ["y2"], pads=[1] * 4, name="quiet"),
             helper.make_node("Mul", ["y2", "k"], ["y2s"]),
             helper.make_node("Add", ["y1", "y2s"], ["y"])]
    return make_model(nodes, [vi("x", [1, 8, 10, 10])], [vi("y", [1, 16, 10, 10])],
                      {"w1": w1, "w2": w2, "k": np.array(quiet, np.float32)})


@pytest.mark.parametrize("weighting", ["network", "layer"])
def test_network_weighting_spends_the_budget_where_the_output_feels_it(weighting):
    rng = np.random.default_rng(7)
    m = _two_paths(rng, 1e-3)
    cal = [{"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)} for _ in range(16)]
    cfg = onnxq.ConvertConfig(bits=2, act_bits=32, rank_budget=0.3, branch_weighting=weighting)
    _, rep = onnxq.convert(m, cfg, calib=cal)
    ranks = {l.node: l.branch_rank for l in rep.quantized}
    if weighting == "network":
        assert ranks["quiet"] == 0 and ranks["loud"] > 0
        assert rep.branches.divergence_final < rep.branches.divergence_without_branches
    else:   # on layer error alone the two look alike and share the budget
        assert ranks["quiet"] > 0 and ranks["loud"] > 0


def test_end_to_end_check_keeps_only_branches_that_help_on_the_shipped_model():
    cal = sorted(Path(__file__).parents[1].joinpath("models", "digits_calib").glob("*.npz"))
    # protect at 0.10: a larger budget keeps all but one of this small net's 3-bit layers at 8 bits,
    # which leaves the branches nothing to compensate
    cfg = onnxq.ConvertConfig(bits=3, rank_budget=0.05, protect=0.10)
    q, rep = onnxq.convert(str(Path(__file__).parents[1] / "models" / "digits_cnn.onnx"), cfg,
                           calib=str(cal[0].parent))
    b = rep.branches
    assert b.layers_with_branch > 0
    assert b.divergence_final <= b.divergence_all_branches
    assert b.divergence_final < b.divergence_without_branches
    kept = {l.node for l in rep.quantized if l.branch_rank}
    assert not kept & set(b.dropped)


def test_branches_are_judged_on_calibration_samples_kept_out_of_their_statistics(feeds):
    """With enough calibration samples, one in six (16 at most) is kept out of the statistics the
    branches are fitted on and judges them; with few, the fitted samples judge and the report says so."""
    from onnxq.api import BRANCH_CHECK_FRACTION, BRANCH_CHECK_MIN
    m = conv_zoo(np.random.default_rng(0))
    cfg = onnxq.ConvertConfig(bits=4, rank_budget=0.3, protect=0)
    _, many = onnxq.convert(m, cfg, calib=feeds(48))
    kept_out = (48 - many.holdout_samples) // BRANCH_CHECK_FRACTION
    assert kept_out > 0 and many.branches.check_samples == kept_out and not many.branches.check_fitted
    assert many.calib_samples == 48 - many.holdout_samples - kept_out
    _, few = onnxq.convert(m, cfg, calib=feeds(12))
    assert few.calib_samples + few.holdout_samples == 12 and few.calib_samples < BRANCH_CHECK_MIN
    assert few.branches.check_fitted and few.branches.check_samples == few.calib_samples


def test_int8_factors_are_rounded_on_their_input_statistics():
    """A's input is x (second moment H), B's is A x: rounding each factor on its own input keeps
    the branch's output error below plain per-row rounding of the same factors."""
    from onnxq.algos.weights import rtn
    from onnxq.plan.branches import build_branch
    rng = np.random.default_rng(3)
    k, o, r = 48, 32, 6
    mix = rng.standard_normal((k, k)) * np.exp(rng.uniform(-3, 1, k))[:, None]
    x = rng.standard_normal((4000, k)) @ mix          # correlated inputs of very uneven energy
    h = x.T @ x / len(x)
    resid = rng.standard_normal((o, k)) * 0.05
    a, b = factors(spectrum(resid, h, r, "whitened"), r)
    br = build_branch(a, b, h, onnxq.ConvertConfig(bits=3, rank_budget=0.1), "whitened")
    plain = (lambda qa, qb: (qb.codes * qb.scales[:, None]) @ (qa.codes * qa.scales[:, None]))(rtn(a, 8), rtn(b, 8))
    exact = b @ a
    assert hweighted(exact - br.b @ br.a, h) < hweighted(exact - plain, h)


@pytest.mark.parametrize("seed", range(3))
def test_joint_refinement_never_raises_the_layer_objective(seed):
    """Re-rounding W - B·A and refitting the branch ends at or below the first fit."""
    from onnxq.plan.branches import refine
    from onnxq.plan.layers import plan_layer
    from onnxq.types import Branch, LayerStats, Target
    rng = np.random.default_rng(seed)
    o, k = 24, 36
    x = rng.standard_normal((2000, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / 2)
    h = x.T @ x / len(x)
    w = rng.standard_normal((o, k)) * 0.2
    t = Target("n", "Gemm", "", "w", "x", None, "rows", (o, k))
    cfg = onnxq.ConvertConfig(bits=3)
    lp = plan_layer(t, w, None, LayerStats(h[None], x.mean(0)[None], len(x)), cfg)
    hf = lp.fit_hessian[0]
    q0 = lp.codes * lp.scales[:, None]
    a, b = factors(spectrum(w - q0, hf, 4, "whitened"), 4)
    lp.branch = Branch(4, 32, a, b)
    first = hweighted(w - q0 - b @ a, hf)
    before = refine(lp, w, hf, cfg, 3)
    after = hweighted(w - lp.codes * lp.scales[:, None] - lp.branch.b @ lp.branch.a, hf)
    assert after <= first
    assert lp.branch.rank == 4 and np.abs(lp.codes).max() <= 3
    if before is not None:                   # the unrefined rounding is handed back intact
        assert np.array_equal(before[0] * before[1][:, None], q0)


def test_refined_branches_still_equal_conv_with_corrected_weight():
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                   [vi("x", [1, 4, 7, 7])], [vi("y", [1, 8, 7, 7])], {"w": w})
    cal = [{"x": rng.standard_normal((1, 4, 7, 7)).astype(np.float32)} for _ in range(16)]
    cfg = onnxq.ConvertConfig(bits=3, act_bits=32, rank_budget=0.5, branch_bits=32,
                              bias_correction=False, branch_refine=2, branch_weighting="layer")
    q, rep = onnxq.convert(m, cfg, calib=cal)
    assert rep.branches.refined_layers == 1
    merged = merged_weight(q, rep.quantized[0].node, w.shape)
    ref = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                     [vi("x", [1, 4, 7, 7])], [vi("y", [1, 8, 7, 7])], {"w": merged})
    got = ort.InferenceSession(q.SerializeToString()).run(None, cal[0])[0]
    want = ort.InferenceSession(ref.SerializeToString()).run(None, cal[0])[0]
    assert np.allclose(got, want, atol=1e-4)
    err = lambda ww: float(np.mean((ort.InferenceSession(ww.SerializeToString()).run(None, cal[1])[0]  # noqa: E731
                                    - ort.InferenceSession(m.SerializeToString()).run(None, cal[1])[0]) ** 2))
    assert err(q) < err(onnxq.convert(m, onnxq.ConvertConfig(bits=3, act_bits=32, bias_correction=False), calib=cal)[0])


def test_probe_with_activation_qdq_measures_the_model_with_those_pairs():
    """The branch probe carries the activation QDQ of the emitted model: at float weights its
    divergence is that of the activation-quantized model from FP32, run directly."""
    from onnxq.calib.collect import collect
    from onnxq.graph.prepare import prepare
    from onnxq.graph.variants import with_act_qdq
    from onnxq.graph.targets import find_targets
    from onnxq.plan.acts import plan_acts
    from onnxq.search.probe import Probe
    from onnxq.algos.metrics import divergence
    rng = np.random.default_rng(5)
    m, _ = prepare(conv_zoo(rng))
    cal = [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    loaders = [lambda f=f: f for f in cal]
    cfg = onnxq.ConvertConfig(bits=4, act_bits=4)
    targets, _ = find_targets(m, cfg.excluded)
    st = collect(m, targets, loaders, hessians=False, rows_per_sample=64, seed=0)
    acts = plan_acts(st.acts, cfg)
    weights = {t.node: numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == t.weight))
               for t in targets}
    probe = Probe(m, targets, weights, loaders, acts=acts)
    so = ort.SessionOptions()        # the plain arithmetic of the graph (no constant-weight fusions)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp, qa = ort.InferenceSession(m.SerializeToString(), so), \
        ort.InferenceSession(with_act_qdq(m, targets, acts).SerializeToString(), so)
    direct = float(np.mean([divergence(fp.run(None, f), qa.run(None, f)) for f in cal]))
    assert direct > 0
    assert probe({}) == pytest.approx(direct, rel=1e-5)
    assert Probe(m, targets, weights, loaders)({}) == 0.0          # float probe: FP32 itself


def test_convtranspose_branch_block_equals_convtranspose_with_corrected_weight():
    """A ConvTranspose takes a branch too (A: ConvTranspose C -> r with the layer's geometry,
    B: 1x1 Conv r -> O): the block equals ConvTranspose(x, Q(W) + B·A)."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((8, 6, 2, 2)) * 0.3).astype(np.float32)
    node = lambda ws: helper.make_node("ConvTranspose", ["x", ws], ["y"], strides=[2, 2])  # noqa: E731
    m = make_model([node("w")], [vi("x", [1, 8, 5, 5])], [vi("y", [1, 6, 10, 10])], {"w": w})
    cal = [{"x": rng.standard_normal((1, 8, 5, 5)).astype(np.float32)} for _ in range(16)]
    cfg = onnxq.ConvertConfig(bits=3, act_bits=32, rank_budget=0.5, branch_bits=32)
    q, rep = onnxq.convert(m, cfg, calib=cal)
    lay = rep.quantized[0]
    assert lay.method == "gptq" and lay.branch_rank > 0
    assert lay.sqnr_with_branch_db > lay.sqnr_db
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    n = lay.node
    wq = inits[f"{n}/weight_q"].astype(np.float32) * inits[f"{n}/weight_scale"][None, :, None, None]
    a = inits[f"{n}/residual/A_weight"]                                   # [C, r, 2, 2]
    b = inits[f"{n}/residual/B_weight"][:, :, 0, 0]                       # [O, r]
    merged = (wq + np.einsum("crhw,or->cohw", a, b)).astype(np.float32)
    ref = make_model([node("w")], [vi("x", [1, 8, 5, 5])], [vi("y", [1, 6, 10, 10])], {"w": merged})
    got = ort.InferenceSession(q.SerializeToString()).run(None, cal[0])[0]
    want = ort.InferenceSession(ref.SerializeToString()).run(None, cal[0])[0]
    assert np.allclose(got, want, atol=1e-4)
    q8, rep8 = onnxq.convert(m, onnxq.ConvertConfig(bits=3, rank_budget=0.5), calib=cal)
    onnx.checker.check_model(q8)
    assert rep8.quantized[0].branch_rank > 0
    # 8-bit A codes, stored as UINT8 with zero point 128 under generic (its rules' u8_weights)
    assert numpy_helper.to_array(next(t for t in q8.graph.initializer if t.name == f"{n}/residual/A_weight_q")).dtype == np.uint8
    ort.InferenceSession(q8.SerializeToString()).run(None, cal[0])
