"""The weight algorithms are tested on their own objective."""

import numpy as np
import pytest

from onnxq.algos.qmath import channel_scales, weight_qmax
from onnxq.algos import weights as weights_mod
from onnxq.algos.rounding import DEFAULT_DAMP, gptq_round
from onnxq.algos.weights import (CLIP_GRID, hessian_scales, layer_floor, mse, quantize_weight, row_errors, rtn,
                                 weighted_error)


def correlated_inputs(rng, n, k):
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((n, k)) @ (np.eye(k) + 2 * mix)
    return x.T @ x / n                      # [K, K]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(4))
def test_gptq_never_loses_to_rtn_with_same_scales(bits, seed):
    rng = np.random.default_rng(seed)
    o, k = 24, 48
    w = rng.standard_normal((o, k))
    h = correlated_inputs(rng, 512, k)
    s = hessian_scales(w, bits, h)
    qm = weight_qmax(bits)
    near = np.clip(np.rint(w / s[:, None]), -qm, qm) * s[:, None]
    codes = gptq_round(w, s, bits, h)
    assert np.abs(codes).max() <= qm
    e_gptq = weighted_error(w, codes * s[:, None], h[None])
    e_rtn = weighted_error(w, near, h[None])
    assert e_gptq <= e_rtn * 1.0001


def test_gptq_handles_dead_inputs_and_singular_h():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 16))
    x = rng.standard_normal((4, 16))
    x[:, 3] = 0.0                            # an input channel that never fires
    h = x.T @ x                              # rank 4: singular
    s = channel_scales(w, 4)
    codes = gptq_round(w, s, 4, h)
    assert codes.shape == w.shape and np.isfinite(codes).all()
    # calibration says nothing about a dead input: its weights are rounded to nearest, not zeroed
    # (zeroed, a channel that fires on other data loses its whole contribution), and take no
    # part in the error compensation of the others
    np.testing.assert_array_equal(codes[:, 3], np.clip(np.rint(w[:, 3] / s), -7, 7))
    assert np.any(codes[:, 3] != 0)


def test_mse_clipping_beats_minmax_on_weight_error():
    rng = np.random.default_rng(1)
    w = rng.laplace(size=(32, 256))          # heavy tails: min-max wastes codes
    a, b = rtn(w, 4), mse(w, 4)
    err = lambda q: np.sum((w - q.codes * q.scales[:, None]) ** 2)  # noqa: E731
    assert err(b) < 0.8 * err(a)


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_skips_only_clip_ratios_that_cannot_win(bits):
    """The search skips ratios whose clipping of the largest weight alone costs more than the
    row's whole error at ratio 1, and searches rows in chunks: every row's scale and codes are
    those of trying every ratio on the whole matrix (an all-zero row, a lone outlier, heavy tails)."""
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, (300, 2048)) * 0.02
    w[5] = 0.0
    w[7] = 0.0
    w[7, 11] = 3.0
    w[9] = rng.uniform(-1, 1, 2048)
    qm = weight_qmax(bits)
    amax = np.abs(w).max(axis=1)
    best, best_s = np.full(len(w), np.inf), None
    for r in CLIP_GRID:
        s = np.where(amax * r / qm > 0, amax * r / qm, 1.0)
        e = w - np.clip(np.rint(w / s[:, None]), -qm, qm) * s[:, None]
        loss = np.einsum("ok,ok->o", e, e)
        better = loss < best
        best, best_s = np.where(better, loss, best), np.where(better, s, best_s if best_s is not None else s)
    got = mse(w.T.copy().T, bits)          # a strided view, as a MatMul's transposed weight is
    np.testing.assert_array_equal(got.scales, best_s)
    np.testing.assert_array_equal(got.codes, np.clip(np.rint(w / best_s[:, None]), -qm, qm))


def test_hessian_clipping_beats_plain_mse_on_layer_objective():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 32))
    h = correlated_inputs(rng, 256, 32)
    plain, aware = mse(w, 3), quantize_weight("gptq", w, 3, h[None])
    e = lambda q: weighted_error(w, q.codes * q.scales[:, None], h[None])  # noqa: E731
    assert e(aware) < e(plain)


def test_grouped_quantization_uses_each_groups_statistics():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 9))
    hs = np.stack([correlated_inputs(rng, 64, 9) for _ in range(4)])
    q = quantize_weight("gptq", w, 4, hs, groups=4)
    assert q.codes.shape == (8, 9) and q.scales.shape == (8,)
    alone = quantize_weight("gptq", w[2:4], 4, layer_floor(hs, DEFAULT_DAMP)[1:2], groups=1)
    assert np.array_equal(q.codes[2:4], alone.codes)


def _patches(rng, n, k, corr=0.9):
    """n patches of k taps of a smooth image: neighbouring taps correlated by `corr`."""
    cov = corr ** np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
    return rng.standard_normal((n, k)) @ np.linalg.cholesky(cov).T


def test_grouped_rounding_of_a_channel_quiet_on_calibration_holds_when_it_comes_alive():
    """A depthwise channel whose input is constant on every calibration sample (a saturated
    ReLU6, say) has a covariance of nothing but the zero padding at the borders. Its codes must
    not be fitted to that: once the channel varies on other data its output error stays near
    plain rounding's, while the live channels keep second-order rounding's gain."""
    rng = np.random.default_rng(0)
    g, k, n = 24, 9, 4000
    x = np.stack([_patches(rng, n, k) for _ in range(g)])          # [G, N, K]
    x[0] = 3.0
    border = rng.random(n) < 0.05
    x[0, border, :3] = 0.0                                          # top row of taps in the padding
    xc = x - x.mean(1, keepdims=True)
    h = np.einsum("gnk,gnl->gkl", xc, xc) / n                       # the centred fit, as plan_layer's
    w = rng.standard_normal((g, k)) * np.linspace(0.5, 2.0, k)
    for bits in (8, 4):
        q = quantize_weight("gptq", w, bits, h, groups=g)
        near = quantize_weight("rtn", w, bits, None, groups=g)
        w_q, w_near = q.codes * q.scales[:, None], near.codes * near.scales[:, None]
        live = np.stack([_patches(rng, n, k) for _ in range(g)])
        h_live = np.einsum("gnk,gnl->gkl", live, live) / n
        err = np.einsum("gk,gkl,gl->g", w - w_q, h_live, w - w_q)
        err_near = np.einsum("gk,gkl,gl->g", w - w_near, h_live, w - w_near)
        assert err[0] < 1.5 * err_near[0]
        assert err[1:].sum() < 0.8 * err_near[1:].sum()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_gptq_method_never_above_plain_second_order_rounding(bits, seed):
    """The scale starts only ever lower each row's objective."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((20, 40))
    h = correlated_inputs(rng, 400, 40)
    s = hessian_scales(w, bits, h)
    plain = gptq_round(w, s, bits, h) * s[:, None]
    q = quantize_weight("gptq", w, bits, h[None])
    assert np.abs(q.codes).max() <= weight_qmax(bits)
    per_row = row_errors(w - q.codes * q.scales[:, None], h)
    assert np.all(per_row <= row_errors(w - plain, h) * (1 + 1e-9))
    assert weighted_error(w, q.codes * q.scales[:, None], h[None]) < weighted_error(w, plain, h[None])



@pytest.mark.parametrize("seed", range(3))
def test_with_bias_correction_rounding_fits_the_input_covariance(seed):
    """Inputs with a large mean (post-ReLU-like): when the bias cancels the mean shift, the
    rounding is fitted on Cov = H - mu mu^T, and the output error that is left (the varying
    part) ends lower than rounding fitted on H; without bias correction H is used."""
    import onnxq
    from onnxq.algos.weights import quantize_weight, regularized_hessian
    from onnxq.plan.layers import plan_layer
    from onnxq.types import LayerStats, Target
    rng = np.random.default_rng(seed)
    o, k, n = 16, 48, 4000
    x = np.abs(rng.standard_normal((n, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / 3)) + 2.0
    h, mu = x.T @ x / n, x.mean(0)
    cov = h - np.outer(mu, mu)
    w = rng.standard_normal((o, k)) * 0.2
    t = Target("n", "Gemm", "", "w", "x", None, "rows", (o, k))
    ls = LayerStats(h[None], mu[None], n)
    lp = plan_layer(t, w, np.zeros(o), ls, onnxq.ConvertConfig(bits=3))
    centered = w - lp.codes * lp.scales[:, None]
    on_h = quantize_weight("gptq", w, 3, regularized_hessian(h[None], n), 1)
    assert np.einsum("ok,kl,ol->", centered, cov, centered) < \
        np.einsum("ok,kl,ol->", w - on_h.codes * on_h.scales[:, None], cov, w - on_h.codes * on_h.scales[:, None])
    plain = plan_layer(t, w, np.zeros(o), ls, onnxq.ConvertConfig(bits=3, bias_correction=False))
    assert np.array_equal(plain.codes, on_h.codes)
    # the corrected bias takes the whole mean shift: outputs match FP32 on average
    y = x @ w.T
    y_hat = x @ (lp.codes * lp.scales[:, None]).T + lp.bias
    assert np.allclose(y_hat.mean(0), y.mean(0), atol=1e-4)


def test_compensation_with_bias_correction_leaves_a_pure_offset_to_the_bias():
    """The quantized model's input is the FP32 one shifted by a constant, x^ = x + d: with bias
    correction the covariances are fitted, so the best float weight for x^ is W itself and the
    bias takes W·d; fitted on the raw second moments, V would bend to absorb the offset."""
    import onnxq
    from onnxq.plan.layers import plan_compensated
    from onnxq.types import LayerStats, PairedStats, Target
    rng = np.random.default_rng(0)
    o, k, n = 12, 24, 5000
    x = rng.standard_normal((n, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / 3) + 1.0
    xq = x + rng.uniform(-0.5, 0.5, k)
    w = rng.standard_normal((o, k)) * 0.2
    t = Target("n", "Gemm", "", "w", "x", None, "rows", (o, k))
    ps = PairedStats(LayerStats((xq.T @ xq / n)[None], xq.mean(0)[None], n), (x.T @ xq / n)[None], x.mean(0)[None])
    lp = plan_compensated(t, w, np.zeros(o), ps, onnxq.ConvertConfig(bits=8))
    raw = plan_compensated(t, w, np.zeros(o), ps, onnxq.ConvertConfig(bits=8, bias_correction=False))
    bent = np.abs(raw.fit_target - w).max()          # 0.15 here
    assert np.abs(lp.fit_target - w).max() < 0.05 * bent    # only the solve's small ridge is left
    y_hat = xq @ (lp.codes * lp.scales[:, None]).T + lp.bias
    assert np.allclose(y_hat.mean(0), (x @ w.T).mean(0), atol=1e-3)


@pytest.mark.parametrize("groups,rows,k", [(96, 1, 9), (60, 1, 25), (8, 4, 9), (16, 2, 18)])
def test_grouped_second_order_rounding_equals_the_per_group_loop(groups, rows, k):
    """All groups at once (a depthwise layer's hundreds of 9-weight problems) give the codes and
    scales of rounding each group on its own, dead input columns included."""
    from onnxq.algos import weights as W
    rng = np.random.default_rng(groups + k)
    x = rng.standard_normal((groups, 200, k)) * rng.random((groups, 1, k)) * 3
    x[:, :, 0] *= (rng.random(groups) > 0.2)[:, None]
    h = np.einsum("gnk,gnl->gkl", x, x)
    w = (rng.standard_normal((groups * rows, k)) * 0.2).astype(np.float32)
    floored = W.layer_floor(h, W.DEFAULT_DAMP)          # the grouped path's ridge at the layer's scale
    for bits in (4, 2):
        per = [W.gptq(w[g * rows:(g + 1) * rows], bits, floored[g]) for g in range(groups)]
        q = W.quantize_weight("gptq", w, bits, h, groups=groups)
        codes, scales = q.codes, q.scales
        np.testing.assert_array_equal(codes, np.concatenate([p.codes for p in per]))
        np.testing.assert_array_equal(scales, np.concatenate([p.scales for p in per]))


def _paired_half(x, xq):
    from onnxq.types import LayerStats, PairedStats
    n = len(x)
    return PairedStats(LayerStats((xq.T @ xq / n)[None], xq.mean(0)[None], n), (x.T @ xq / n)[None], x.mean(0)[None])


@pytest.mark.parametrize("case", ["systematic", "unpredictable"])
def test_compensation_share_is_what_holds_on_the_other_half(case):
    """x^ = 0.7 x (an error the input predicts): the fit holds on the other half and is kept whole.
    x = x^ + e with e independent of x^ (nothing to predict, V = W in expectation): what a fit on
    150 rows for 40 inputs finds is noise, and the other half gives it a small share."""
    from onnxq.plan.layers import _held_out_share
    from onnxq.types import PairedStats
    rng = np.random.default_rng(0)
    o, k, n = 16, 40, 150
    w = rng.standard_normal((o, k))
    halves = []
    for _ in range(2):
        if case == "systematic":
            x = rng.standard_normal((n, k))
            xq = 0.7 * x
        else:
            xq = rng.standard_normal((n, k))
            x = xq + rng.standard_normal((n, k))
        halves.append(_paired_half(x, xq))
    share = _held_out_share(w, PairedStats.merged(*halves), False, 1)
    assert share > 0.95 if case == "systematic" else share < 0.3


@pytest.mark.parametrize("bits", [8, 4])
def test_blocked_clipping_search_skips_only_ratios_that_cannot_win(bits):
    """The H-weighted clipping search of blocked second-order rounding skips a ratio only where
    H's smallest eigenvalue times the clipped weight's own error already exceeds every block's
    loss at ratio 1: the scales and codes equal those of trying every ratio, and at 8 bits most
    ratios go."""
    rng = np.random.default_rng(4)
    w = rng.standard_t(3, (40, 128)) * 0.02
    w[3, 5] = 0.5                                     # a lone outlier: its block must still be searched
    h = correlated_inputs(rng, 2048, 128) + 0.05 * np.eye(128)
    hb = np.stack([h[i:i + 32, i:i + 32] for i in range(0, 128, 32)])
    calls = []

    def loss(e):
        calls.append(1)
        return np.einsum("obk,bkl,obl->ob", e, hb, e)
    wb = w.reshape(40, 4, 32)
    full = weights_mod._grid_search(wb, bits, loss)
    n_full = len(calls)
    calls.clear()
    least = np.linalg.eigvalsh(hb)[:, 0] * (1 - 1e-6)
    pruned = weights_mod._grid_search(wb, bits, loss, bound=np.broadcast_to(least, (40, 4)))
    np.testing.assert_array_equal(pruned, full)
    assert n_full == len(CLIP_GRID)
    assert len(calls) < (n_full / 2 if bits == 8 else n_full + 1), (len(calls), n_full)
