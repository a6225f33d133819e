"""Streaming reducers and range methods."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from onnxq.algos.ranges import RANGE_METHODS, percentile
from onnxq.calib.collectors import RangeHistogram, SecondMoment, im2col_cols, im2col_sums
from onnxq.types import ConvGeometry
from builders import make_model, vi


def test_histogram_doubling_is_exact():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal(1000) * s for s in (0.01, 0.5, 3.0, 40.0)]
    h = RangeHistogram(bins=256)
    for c in chunks:
        h.update(c)
    allv = np.concatenate(chunks)
    ref, _ = np.histogram(allv, bins=256, range=(-h.radius, h.radius))
    assert h.counts.sum() == allv.size
    assert np.abs(h.counts - ref).sum() <= 4          # float edge effects at most
    assert h.observed == (float(allv.min().astype(np.float32)), float(allv.max().astype(np.float32)))


def _hist(values):
    h = RangeHistogram()
    h.update(values)
    return h.counts, h.edges, h.observed


def test_percentile_of_gaussian_matches_quantile():
    x = np.random.default_rng(1).standard_normal(400_000)
    lo, hi = percentile(*_hist(x)[:2], 8, False, pct=99.0)
    assert lo == pytest.approx(np.quantile(x, 0.01), abs=0.02)
    assert hi == pytest.approx(np.quantile(x, 0.99), abs=0.02)


def test_mse_clips_outliers_but_minmax_does_not():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.laplace(size=200_000), [80.0, -75.0]])
    counts, edges, obs = _hist(x)
    mm = RANGE_METHODS["minmax"](counts, edges, 4, True, observed=obs)
    ms = RANGE_METHODS["mse"](counts, edges, 4, True, observed=obs)
    assert mm == obs
    # for a unit Laplace at 4 bits the MSE-optimal clip lies a few scale units out (≈ 5-8)
    assert 3.0 < ms[1] < 12.0


def test_second_moment_from_im2col_reproduces_conv_output():
    """Patches @ W^T must equal onnxruntime's convolution at the sampled positions."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    geo = ConvGeometry((3, 3), (2, 1), (1, 2), (1, 0, 1, 2), "NOTSET", 2)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 1],
                                     dilations=[1, 2], pads=[1, 0, 1, 2])],
                   [vi("x", [2, 4, 9, 11])], [vi("y", [None, None, None, None])], {"w": w})
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    cols = im2col_cols(x, geo, rows=10**6, rng=rng)          # every position
    rows = cols.transpose(2, 0, 1)                           # [S, G, K]
    assert rows.shape[0] == y.shape[0] * y.shape[2] * y.shape[3]
    wm = w.reshape(6, -1)
    out = np.concatenate([rows[:, g] @ wm[3 * g:3 * g + 3].T for g in range(2)], axis=1)
    ref = y.transpose(0, 2, 3, 1).reshape(-1, 6)
    assert np.allclose(out, ref, atol=1e-4)
    mom = SecondMoment(2, 18)
    mom.update(cols)
    assert np.allclose(mom.hessian[1], rows[:, 1].T.astype(np.float64) @ rows[:, 1] / rows.shape[0])


def test_same_upper_padding_resolves_like_onnxruntime():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 1, 7, 8)).astype(np.float32)
    w = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    geo = ConvGeometry((3, 3), (2, 2), (1, 1), (), "SAME_UPPER", 1)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")],
                   [vi("x", [1, 1, 7, 8])], [vi("y", [None, None, None, None])], {"w": w})
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    cols = im2col_cols(x, geo, rows=10**6, rng=rng)
    assert np.allclose(w.reshape(-1) @ cols[0], y.reshape(-1), atol=1e-5)


@pytest.mark.parametrize("shape, geo", [
    ((2, 6, 9, 11), ConvGeometry((3, 3), (2, 1), (1, 2), (1, 0, 2, 1), "NOTSET", 3)),     # asymmetric pads
    ((1, 8, 7, 8), ConvGeometry((3, 3), (2, 2), (1, 1), (), "SAME_UPPER", 8)),            # depthwise, auto_pad
    ((3, 4, 20), ConvGeometry((5,), (2,), (2,), (2, 2), "NOTSET", 1)),                    # 1-D, dilated
    ((1, 16, 5, 5), ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), "NOTSET", 1)),     # pointwise
])
@pytest.mark.parametrize("rows", [40, 10**6])
def test_mean_only_sums_equal_the_sampled_patches_summed(shape, geo, rows):
    """The mean-only calibration path sums the patches im2col_cols would sample, with the same
    random draws and the same order of addition as the second-moment path: equal to the last bit."""
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    cols = im2col_cols(x, geo, rows, np.random.default_rng(9))
    sums, n = im2col_sums(x, geo, rows, np.random.default_rng(9))
    assert n == cols.shape[2] == min(rows, cols.shape[2]) and sums.shape == cols.shape[:2]
    mom = SecondMoment(*cols.shape[:2])
    mom.update(cols)
    assert np.array_equal(sums, mom.s)


def test_statistics_round_trip_and_reuse_gives_the_same_model(tmp_path):
    import onnxq
    from onnxq.types import Stats
    from builders import conv_zoo

    m = conv_zoo(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    cal = [{"x": rng.standard_normal((2, 3, 12, 12)).astype(np.float32)} for _ in range(12)]
    path = str(tmp_path / "stats.npz")
    a, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4), calib=cal, save_stats=path)
    st = Stats.load(path)
    assert st.layers and st.acts
    st.save(str(tmp_path / "again.npz"))
    again = Stats.load(str(tmp_path / "again.npz"))
    for k, v in st.layers.items():
        assert np.array_equal(v.hessian, again.layers[k].hessian) and v.rows == again.layers[k].rows
    for k, v in st.acts.items():
        assert np.array_equal(v.counts, again.acts[k].counts) and v.observed == again.acts[k].observed
    b, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=4), calib=cal, stats=path)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_convtranspose_tap_moments_give_its_exact_output_error():
    """For a 2x2 stride-2 ConvTranspose the output error of a weight error E is exactly
    tr(E H E^T) summed over input pixels, with H the per-pixel moments spread over the taps."""
    from onnxq.calib.collect import layer_cols
    from onnxq.graph.targets import find_targets
    from onnxq.config import ConvertConfig
    from onnxq.algos.matrix import to_matrix
    from onnxq.plan.layers import tap_moments
    from onnxq.types import LayerStats
    rng = np.random.default_rng(3)
    c, o = 5, 3
    e = rng.standard_normal((c, o, 2, 2)).astype(np.float32)
    m = make_model([helper.make_node("ConvTranspose", ["x", "e"], ["y"], strides=[2, 2])],
                   [vi("x", [1, c, 6, 7])], [vi("y", [1, o, 12, 14])], {"e": e})
    x = (rng.standard_normal((1, c, 6, 7)) + 1.0).astype(np.float32)
    t = find_targets(m)[0][0]
    rows = layer_cols(x, t, 10**6, rng)[0].T                      # every pixel, [42, C]
    ls = tap_moments(t, LayerStats((rows.T @ rows / len(rows))[None], rows.mean(0)[None], len(rows)))
    em = to_matrix(e.astype(np.float64), t.weight_layout)
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert ls.hessian.shape == (1, 4 * c, 4 * c)
    assert np.isclose(np.sum(y.astype(np.float64) ** 2), len(rows) * np.einsum("ok,kl,ol->", em, ls.hessian[0], em),
                      rtol=1e-4)


def _chain(ws):
    """x -> MatMul w0 -> Relu -> MatMul w1 -> Relu -> MatMul w2 -> y, with a residual Add of h0."""
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="m0"), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="m1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Add", ["r1", "h0"], ["s"]), helper.make_node("MatMul", ["s", "w2"], ["y"], name="m2")]
    return make_model(nodes, [vi("x", ["N", 6])], [vi("y", ["N", 6])], {f"w{i}": w for i, w in enumerate(ws)})


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_frontier_runs_only_what_changed_and_gives_the_whole_models_values(budget, monkeypatch):
    """Sequential mode's partial model changes one layer a stage: the tensors upstream of the change
    are kept (within a memory budget: with none, only the feeds), the ones downstream are computed
    again, and every value equals a full session's."""
    from onnxq.calib import collect
    from onnxq.calib.collect import Frontier
    monkeypatch.setattr(collect, "FRONTIER_BYTES", budget)
    from onnxq.graph.variants import augmented, changed_tensors, cut, signature
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((6, 6)).astype(np.float32) for _ in range(3)]
    first = _chain(ws)
    second = _chain([ws[0], ws[1] * 0.5, ws[2]])
    assert changed_tensors(signature(first), second) == {"w1", "h1", "r1", "s", "y"}
    assert changed_tensors(signature(first), first) == set()
    sub = cut(second, ["y"], {"r0": np.float32, "h0": np.float32})
    assert [n.name or n.op_type for n in sub.graph.node] == ["m1", "Relu", "Add", "m2"]
    assert {i.name for i in sub.graph.input} == {"r0", "h0"} and {t.name for t in sub.graph.initializer} == {"w1", "w2"}
    assert [o.name for o in cut(first, ["r0"], {"x": np.float32}).graph.output] == ["r0", "h0"]   # the Add reads h0
    feeds = [{"x": rng.standard_normal((n, 6)).astype(np.float32)} for n in (2, 3, 1)]     # any batch
    fr = Frontier(feeds)
    early = fr.run(first, ["r0"])
    # what a node not yet run reads, and the feed
    assert set(fr.values[0]) == ({"x", "h0", "r0"} if budget else {"x"})
    late = fr.run(second, ["r1", "y"])
    # a kept value owns its memory: an array onnxruntime returns may hold its session's, and kept
    # over a conversion's stages those held every stage's session memory (14 GB on an 800 x 608 detector)
    assert all(v.flags.owndata for d in fr.values for k, v in d.items() if k != "x")
    full = ort.InferenceSession(augmented(second, ["r0", "r1"]).SerializeToString())
    for f, e, l in zip(feeds, early, late):
        r0, r1, y = full.run(["r0", "r1", "y"], f)
        assert np.array_equal(e["r0"], r0) and np.array_equal(l["r1"], r1) and np.array_equal(l["y"], y)


def test_one_dimensional_patches_reproduce_conv_output():
    """A dilated, strided, padded 1-D conv: patch columns times the weight equal onnxruntime's output."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 20)).astype(np.float32)
    w = rng.standard_normal((5, 4, 5)).astype(np.float32)
    geo = ConvGeometry((5,), (2,), (2,), (2, 3), "NOTSET", 1)
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2], dilations=[2], pads=[2, 3])],
                   [vi("x", [3, 4, 20])], [vi("y", [None, None, None])], {"w": w})
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    cols = im2col_cols(x, geo, rows=10**6, rng=rng)
    assert cols.shape == (1, 20, y.shape[0] * y.shape[2])
    assert np.allclose(w.reshape(5, -1) @ cols[0], y.transpose(1, 0, 2).reshape(5, -1), atol=1e-4)
