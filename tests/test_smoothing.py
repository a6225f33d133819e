"""Per-channel smoothing of Gemm/MatMul inputs: the rewrite is exact in float, it is chosen only
where the quantized layer outputs come closer to float, and an input with an outlier channel (as
transformers' LayerNorm outputs have) converts W8A8 closer to FP32 with it than without."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import make_model, vi
from onnx import helper

import onnxq
from onnxq.algos.smoothing import GAIN, POINTWISE_GAIN, choose_smoothing, smoothing_scales
from onnxq.graph.prepare import prepare
from onnxq.graph.smooth import apply_smoothing, smoothable
from onnxq.graph.targets import find_targets

D, H = 32, 48


def block(rng, outlier: float = 40.0, shared_weight: bool = False):
    """x -> LayerNorm (one channel's gain `outlier` times the rest) -> MatMul (X @ W) and Gemm
    (transB) -> Relu -> MatMul; the LayerNorm output also feeds a residual Add."""
    gain = np.ones(D, np.float32)
    gain[5] = outlier
    w1 = (rng.standard_normal((D, H)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "gain", "shift"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "w1"], ["a"], name="up"),
             helper.make_node("Gemm", ["n", "w2"], ["b"], name="side", transB=1),
             helper.make_node("Add", ["a", "b"], ["ab"], name="join"),
             helper.make_node("Relu", ["ab"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w3"], ["c"], name="down"),
             helper.make_node("Add", ["c", "n"], ["y"], name="residual")]
    inits = {"gain": gain, "shift": (rng.standard_normal(D) * 0.1).astype(np.float32), "w1": w1,
             "w2": (rng.standard_normal((H, D)) * 0.2).astype(np.float32),
             "w3": (rng.standard_normal((H, D)) * 0.2).astype(np.float32)}
    outputs = [vi("y", ["N", D])]
    if shared_weight:                       # a second layer reads w1 too
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["z"], name="other"))
        outputs.append(vi("z", ["N", H]))
    return make_model(nodes, [vi("x", ["N", D])], outputs, inits, opset=17)


def feeds(rng, n):
    return [{"x": rng.standard_normal((16, D)).astype(np.float32)} for _ in range(n)]


def test_the_rewrite_is_exact_and_other_readers_keep_the_input():
    rng = np.random.default_rng(0)
    m, _ = prepare(block(rng))
    targets, _ = find_targets(m, lambda name: False, True)
    groups = smoothable(m, targets)
    assert set(groups) == {"n", "r"} and {t.node for t in groups["n"]} == {"up", "side"}
    s = np.exp(rng.standard_normal(D)).astype(np.float64)
    before = ort.InferenceSession(m.SerializeToString())
    new = apply_smoothing(m, "n", groups["n"], s)
    after = ort.InferenceSession(m.SerializeToString())
    for f in feeds(rng, 3):
        np.testing.assert_allclose(after.run(None, f)[0], before.run(None, f)[0], rtol=1e-4, atol=1e-4)
    readers = {n.name: list(n.input) for n in m.graph.node}
    assert readers["up"][0] == readers["side"][0] == new != "n"
    assert readers["residual"][1] == "n"                  # the residual stream is not divided
    muls = [n for n in m.graph.node if n.op_type == "Mul"]
    assert len(muls) == 1 and list(muls[0].input)[0] == "n" and muls[0].output[0] == new


def test_a_weight_another_node_reads_is_not_smoothed():
    rng = np.random.default_rng(1)
    m, _ = prepare(block(rng, shared_weight=True))
    targets, _ = find_targets(m, lambda name: False, True)
    assert {t.node for t in targets} >= {"up", "side", "other"}
    groups = smoothable(m, targets)
    assert {t.node for t in groups["n"]} == {"side"} and "x" not in groups


def test_the_choice_smooths_an_outlier_channel_and_leaves_flat_inputs_alone():
    rng = np.random.default_rng(2)
    w = [rng.standard_normal((H, D)) * 0.2]
    flat = rng.standard_normal((1024, D))
    keep = choose_smoothing(np.abs(flat[:512]).max(0), 512, flat[512:], w, [8], 8)
    assert keep.alpha is None and keep.scales is None and keep.error_after == keep.error_before
    spiky = flat.copy()
    spiky[:, 3] *= 60.0
    chosen = choose_smoothing(np.abs(spiky[:512]).max(0), 512, spiky[512:], w, [8], 8)
    assert chosen.alpha is not None and chosen.error_after < 0.5 * chosen.error_before
    assert chosen.scales[3] == chosen.scales.max() and chosen.scales[3] > 5 * np.median(chosen.scales)
    # too few rows to know each channel's maximum: left alone however spiky
    few = choose_smoothing(np.abs(spiky[:40]).max(0), 40, spiky[40:80], w, [8], 8)
    assert few.alpha is None and few.error_after == few.error_before


def test_a_pointwise_conv_input_must_cut_the_error_five_times():
    """A modest outlier (its readers' proxy error cut 2-5 times) smooths a Gemm's input but not a
    pointwise conv's, whose gains of that size lost held-out SQNR (docs/results.md, round 24)."""
    rng = np.random.default_rng(15)
    w = [rng.standard_normal((H, D)) * 0.2]
    x = rng.standard_normal((1024, D))
    x[:, 3] *= 3.0
    args = (np.abs(x[:512]).max(0), 512, x[512:], w, [8], 8)
    gemm = choose_smoothing(*args)
    assert gemm.alpha is not None and POINTWISE_GAIN * gemm.error_before < gemm.error_after < GAIN * gemm.error_before
    assert choose_smoothing(*args, gain=POINTWISE_GAIN).alpha is None


def test_channels_that_never_fire_keep_a_unit_scale():
    amax = np.array([0.0, 1.0, 4.0, 0.0])
    s = smoothing_scales(amax, [np.ones((3, 4))], 0.5)
    assert s[0] == s[3] == 1.0 and s[2] > s[1] > 0


def sqnr(m, q, fs):
    a, b = ort.InferenceSession(m.SerializeToString()), ort.InferenceSession(q.SerializeToString())
    ref = np.concatenate([a.run(None, f)[0] for f in fs])
    out = np.concatenate([b.run(None, f)[0] for f in fs])
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))


def test_an_outlier_channel_converts_closer_to_fp32_with_smoothing():
    """One range method for both (mse), so the comparison is of smoothing alone; under qnn, whose
    8-bit MatMuls read a quantized u8 input (generic, ort-cpu and openvino run them weight-only)."""
    rng = np.random.default_rng(3)
    m = block(rng)
    cal, held = feeds(rng, 24), feeds(rng, 12)
    cfg = dict(bits=8, act_bits=8, act_method="mse", target="qnn")
    q_on, rep_on = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)
    q_off, rep_off = onnxq.convert(m, onnxq.ConvertConfig(**cfg, smooth=False), calib=cal)
    chosen = {s.tensor: s for s in rep_on.smoothing}
    assert chosen["n"].alpha is not None and sorted(chosen["n"].readers) == ["side", "up"]
    assert chosen["n"].error_after < chosen["n"].error_before
    assert rep_off.smoothing == []
    assert any(n.op_type == "Mul" and n.input[0] == "n" for n in q_on.graph.node)
    assert not any(n.op_type == "Mul" for n in q_off.graph.node)
    assert sqnr(m, q_on, held) > sqnr(m, q_off, held) + 3.0


@pytest.mark.parametrize("cfg", [dict(bits=8, act_bits=32), dict(bits=4, act_bits=8, target="ort-cpu"),
                                 dict(bits=8, act_bits=8)])
def test_no_smoothing_where_the_input_stays_float(cfg):
    """Weight-only conversions, 4-bit MatMuls under ort-cpu (MatMulNBits reads a float input)
    and MatMuls under generic (weight-only at 4 and 8 bits) have no activation grid for
    smoothing to help."""
    rng = np.random.default_rng(4)
    m = block(rng)
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(protect=0.0, **cfg), calib=feeds(rng, 16))
    assert not any(s.tensor == "n" and s.alpha is not None for s in rep.smoothing)
    assert not any(n.op_type == "Mul" and n.input[0] == "n" for n in q.graph.node)


def test_saved_statistics_bring_their_smoothing_along(tmp_path):
    """Statistics saved by a smoothed conversion name the smoothed tensors; reused with other
    calibration data (or none) they apply the same smoothing, and give the same model."""
    rng = np.random.default_rng(5)
    m = block(rng)
    cfg = onnxq.ConvertConfig(bits=8, act_bits=8, act_method="mse", target="tensorrt")   # MatMuls read 8 bits
    path = str(tmp_path / "stats.npz")
    a, rep_a = onnxq.convert(m, cfg, calib=feeds(rng, 24), save_stats=path)
    assert any(s.alpha is not None for s in rep_a.smoothing)
    b, rep_b = onnxq.convert(m, cfg, calib=feeds(np.random.default_rng(6), 4), stats=path)
    assert [(s.tensor, s.alpha, s.smoothed) for s in rep_b.smoothing] == \
        [(s.tensor, s.alpha, s.smoothed) for s in rep_a.smoothing if s.alpha is not None]
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


C = 8


def depthwise_block(rng, multiplier: int = 1, outlier: float = 40.0, producer: str = "bn"):
    """x -> a producer with one channel `outlier` times the rest -> depthwise 3x3 conv
    (`multiplier` filters a channel) -> Relu -> 1x1 conv. Producers: "bn" a BatchNormalization
    (as a reparameterised backbone's can be), "affine" conv -> HardSwish -> Mul and Add of
    constants, "relu" conv -> Relu, "hardswish" conv -> HardSwish (not foldable)."""
    gain = np.ones(C, np.float32)
    gain[3] = outlier
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"wd": r(C * multiplier, 1, 3, 3), "wp": r(4, C * multiplier, 1, 1)}
    if producer == "bn":
        inits.update(gain=gain, shift=r(C), mean=np.zeros(C, np.float32), var=np.ones(C, np.float32))
        head = [helper.make_node("BatchNormalization", ["x", "gain", "shift", "mean", "var"], ["n"], name="bn")]
    else:
        inits.update(w0=r(C, C, 1, 1) * gain[:, None, None, None], b0=r(C))
        head = [helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="conv0")]
        if producer == "affine":
            inits.update(k=np.array(1.5, np.float32), k2=r(1, C, 1, 1))
            head += [helper.make_node("HardSwish", ["h"], ["hs"]), helper.make_node("Mul", ["hs", "k"], ["hm"]),
                     helper.make_node("Add", ["hm", "k2"], ["n"])]
        elif producer == "hardswish_pad":       # the padding written out, as an affine fold leaves it
            inits.update(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
            head += [helper.make_node("HardSwish", ["h"], ["hp"]), helper.make_node("Pad", ["hp", "pads"], ["n"])]
        else:
            head += [helper.make_node("Relu" if producer == "relu" else "HardSwish", ["h"], ["n"])]
    pads = [0 if producer == "hardswish_pad" else 1] * 4
    nodes = head + [helper.make_node("Conv", ["n", "wd"], ["d"], name="dw", group=C, pads=pads),
                    helper.make_node("Relu", ["d"], ["r"], name="act"),
                    helper.make_node("Conv", ["r", "wp"], ["y"], name="pw")]
    return make_model(nodes, [vi("x", ["N", C, 10, 10])], [vi("y", ["N", 4, 10, 10])], inits, opset=14)


def image_feeds(rng, n):
    return [{"x": rng.standard_normal((2, C, 10, 10)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("multiplier, producer, folds", [(1, "bn", True), (2, "bn", True), (1, "affine", True),
                                                      (1, "relu", True), (2, "hardswish", False),
                                                      (1, "hardswish_pad", False)])
@pytest.mark.parametrize("through_hardswish", [False, True])
def test_a_depthwise_conv_input_rewrites_exactly(multiplier, producer, folds, through_hardswish):
    """Folded into the ops that make the input where exact (no new node), else a Mul; with
    `through_hardswish` a HardSwish-made input also divides the conv before it and the HardSwish
    reads that output times s (one more Mul)."""
    rng = np.random.default_rng(8)
    m, _ = prepare(depthwise_block(rng, multiplier, producer=producer))
    targets, _ = find_targets(m, lambda name: False, True)
    groups = smoothable(m, targets)
    assert [t.node for t in groups["n"]] == ["dw"] and [t.node for t in groups["r"]] == ["pw"]
    assert "n" not in smoothable(m, targets, convs=False) and "r" not in smoothable(m, targets, convs=False)
    s = np.exp(rng.standard_normal(C))
    before = ort.InferenceSession(m.SerializeToString())
    nodes = len(m.graph.node)
    conv_out = m.graph.node[0].output[0]
    new = apply_smoothing(m, "n", groups["n"], s, through_hardswish)
    after = ort.InferenceSession(m.SerializeToString())
    for f in image_feeds(rng, 2):
        np.testing.assert_allclose(after.run(None, f)[0], before.run(None, f)[0], rtol=1e-4, atol=1e-4)
    through = through_hardswish and producer.startswith("hardswish")
    padded = through and producer == "hardswish_pad"        # the Mul goes ahead of the Pad, "n" stays
    assert (new == "n" and len(m.graph.node) == nodes + 2 * padded) if folds or padded else \
        (new != "n" and len(m.graph.node) == nodes + 1 + through)
    if through:     # the conv's output is x / s: what its output rounding sees
        y = onnx.helper.make_empty_tensor_value_info(conv_out)
        probe, ref = onnx.ModelProto(), depthwise_block(np.random.default_rng(8), multiplier, producer=producer)
        probe.CopyFrom(m)
        probe.graph.output.append(y)
        ref.graph.output.append(y)
        f = image_feeds(rng, 1)[0]
        got = ort.InferenceSession(probe.SerializeToString()).run([conv_out], f)[0]
        want = ort.InferenceSession(ref.SerializeToString()).run([conv_out], f)[0]
        np.testing.assert_allclose(got * s.reshape(1, -1, 1, 1), want, rtol=1e-4, atol=1e-4)


def test_a_depthwise_input_with_an_outlier_channel_converts_closer_to_fp32_smoothed():
    """Its filters' per-channel scales absorb s, so it is smoothed fully; folded into the
    BatchNorm before it, the graph gains no node. 8-bit conversions under generic, and under
    ort-cpu where it folds (test below); openvino and 4-bit weights measured mixed or slower
    (docs/results.md, round 8)."""
    rng = np.random.default_rng(9)
    m = depthwise_block(rng)
    cal, held = image_feeds(rng, 24), image_feeds(rng, 8)
    q_on, rep_on = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8, act_method="mse"), calib=cal)
    q_off, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8, act_method="mse", smooth=False), calib=cal)
    chosen = {s.tensor: s for s in rep_on.smoothing}
    assert chosen["n"].alpha is not None and chosen["n"].readers == ["dw"] and chosen["n"].smoothed == "n"
    assert len(q_on.graph.node) == len(q_off.graph.node)
    assert sqnr(m, q_on, held) > sqnr(m, q_off, held) + 3.0
    for cfg in (dict(bits=8, target="openvino"), dict(bits=4)):
        _, rep = onnxq.convert(m, onnxq.ConvertConfig(act_bits=8, **cfg), calib=cal)
        assert not any(s.tensor == "n" for s in rep.smoothing), cfg


def test_ort_cpu_smooths_a_conv_input_only_where_it_folds():
    """Under ort-cpu a Mul before a conv would part it from its integer unit, so an input is
    smoothed only where the division folds into the ops that make it: the BatchNorm-made input
    is (no new node, closer to FP32, run as onnxruntime runs the file); a HardSwish-made one goes
    through the conv before it (test below)."""
    rng = np.random.default_rng(9)
    m = depthwise_block(rng)
    cal, held = image_feeds(rng, 24), image_feeds(rng, 8)
    cfg = dict(bits=8, act_bits=8, target="ort-cpu", act_method="mse", protect_acts=0.0)
    q_on, rep_on = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)
    q_off, _ = onnxq.convert(m, onnxq.ConvertConfig(smooth=False, **cfg), calib=cal)
    chosen = {s.tensor: s for s in rep_on.smoothing}
    assert chosen["n"].alpha is not None and chosen["n"].smoothed == "n"
    assert len(q_on.graph.node) == len(q_off.graph.node)
    assert sqnr(m, q_on, held) > sqnr(m, q_off, held) + 3.0


def test_a_depthwise_input_that_cannot_fold_reads_a_mul():
    rng = np.random.default_rng(10)
    m = depthwise_block(rng, producer="hardswish")
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, act_bits=8), calib=image_feeds(rng, 24))
    smoothed = {s.tensor: s for s in rep.smoothing}
    assert smoothed["n"].alpha is not None and smoothed["n"].smoothed not in ("", "n")
    assert any(n.op_type == "Mul" and list(n.input)[0] == "n" for n in q.graph.node)


@pytest.mark.parametrize("producer", ["bn", "hardswish"])
def test_saved_statistics_bring_depthwise_smoothing_along(tmp_path, producer):
    """Folded (BatchNorm) or a Mul (HardSwish), reused statistics give the same model."""
    rng = np.random.default_rng(12)
    m = depthwise_block(rng, producer=producer)
    cfg = onnxq.ConvertConfig(bits=8, act_bits=8, act_method="mse")
    path = str(tmp_path / "stats.npz")
    a, rep = onnxq.convert(m, cfg, calib=image_feeds(rng, 24), save_stats=path)
    smoothed = {s.tensor: s.smoothed for s in rep.smoothing if s.alpha is not None}
    assert smoothed["n"] == ("n" if producer == "bn" else "n_smooth")
    b, _ = onnxq.convert(m, cfg, calib=image_feeds(rng, 3), stats=path)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def pointwise_block(rng, outlier: float = 40.0, producer: str = "bn"):
    """x -> BatchNormalization (one channel's gain `outlier` times the rest, its weights in
    "pw" as many times smaller), then nothing (it folds into the norm) or HardSwish (it does not) -> n -> a 1x1 conv "pw" (C -> 6) and a 3x3
    ungrouped conv "wide" (C -> 4): pointwise convs' inputs may be smoothed, a 3x3 conv's are not."""
    gain = np.ones(C, np.float32)
    gain[2] = outlier
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"gain": gain, "shift": r(C), "mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32),
             "wp": r(6, C, 1, 1), "bp": r(6), "wk": r(4, C, 3, 3)}
    inits["wp"][:, 2] /= outlier        # as trained nets do: the large channel's weights are small
    bn = "n" if producer == "bn" else "h"
    nodes = [helper.make_node("BatchNormalization", ["x", "gain", "shift", "mean", "var"], [bn], name="bn")]
    nodes += [] if producer == "bn" else [helper.make_node("HardSwish", ["h"], ["n"])]
    nodes += [helper.make_node("Conv", ["n", "wp", "bp"], ["y"], name="pw"),
              helper.make_node("Conv", ["n", "wk"], ["z"], name="wide", pads=[1] * 4)]
    return make_model(nodes, [vi("x", ["N", C, 10, 10])], [vi("y", ["N", 6, 10, 10]), vi("z", ["N", 4, 10, 10])],
                      inits, opset=14)


@pytest.mark.parametrize("producer, folds", [("bn", False), ("hardswish", False)])
def test_a_pointwise_conv_input_rewrites_exactly(producer, folds):
    """A 1x1 conv's weight [O, C, 1, 1] is a Gemm's over each pixel: its input channels take s.
    The 3x3 conv reading the same tensor keeps reading it undivided (so nothing folds)."""
    rng = np.random.default_rng(13)
    m, _ = prepare(pointwise_block(rng, producer=producer))
    targets, _ = find_targets(m, lambda name: False, True)
    groups = smoothable(m, targets)
    assert [t.node for t in groups["n"]] == ["pw"]
    assert "n" not in smoothable(m, targets, convs=False)
    s = np.exp(rng.standard_normal(C))
    before = ort.InferenceSession(m.SerializeToString())
    new = apply_smoothing(m, "n", groups["n"], s)
    after = ort.InferenceSession(m.SerializeToString())
    for f in image_feeds(rng, 2):
        for a, b in zip(after.run(None, f), before.run(None, f)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    readers = {n.name: list(n.input) for n in m.graph.node}
    assert readers["pw"][0] == new != "n" and readers["wide"][0] == "n"


def test_a_pointwise_input_with_an_outlier_channel_converts_closer_to_fp32_smoothed():
    """The outlier channel hands part of its range to pw's per-channel weight scales: its output
    comes closer to FP32 (W8A8, generic); other targets and 4-bit weights leave it alone."""
    rng = np.random.default_rng(14)
    m = pointwise_block(rng, producer="hardswish")
    cal, held = image_feeds(rng, 24), image_feeds(rng, 8)
    cfg = dict(bits=8, act_bits=8, act_method="mse", protect_acts=0.0)
    q_on, rep_on = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)
    q_off, _ = onnxq.convert(m, onnxq.ConvertConfig(smooth=False, **cfg), calib=cal)
    chosen = {s.tensor: s for s in rep_on.smoothing}
    assert chosen["n"].alpha is not None and chosen["n"].readers == ["pw"]
    assert chosen["n"].error_after < 0.1 * chosen["n"].error_before
    assert sqnr(m, q_on, held) > sqnr(m, q_off, held) + 10.0
    for other in (dict(bits=8, target="ort-cpu"), dict(bits=8, target="openvino"), dict(bits=4)):
        _, rep = onnxq.convert(m, onnxq.ConvertConfig(act_bits=8, **other), calib=cal)
        assert not any(s.tensor == "n" for s in rep.smoothing), other


@pytest.mark.parametrize("producer", ["hardswish", "hardswish_pad"])
def test_ort_cpu_smooths_a_hardswish_made_input_through_the_conv_before_it(tmp_path, producer):
    """The conv's output is x / s, the HardSwish between becomes a 1x1 depthwise gate conv and a
    Mul on u8 codes (graph/hardswish_channels.py): onnxruntime's optimized graph runs the block as
    integer kernels only, and it converts closer to FP32 than unsmoothed."""
    rng = np.random.default_rng(9)
    m = depthwise_block(rng, producer=producer)
    cal, held = image_feeds(rng, 24), image_feeds(rng, 8)
    cfg = dict(bits=8, act_bits=8, target="ort-cpu")
    q_on, rep_on = onnxq.convert(m, onnxq.ConvertConfig(**cfg), calib=cal)
    q_off, _ = onnxq.convert(m, onnxq.ConvertConfig(smooth=False, **cfg), calib=cal)
    chosen = {s.tensor: s for s in rep_on.smoothing}
    assert chosen["n"].alpha is not None and chosen["n"].readers == ["dw"]
    assert not any(n.op_type == "HardSwish" for n in q_on.graph.node)
    assert sqnr(m, q_on, held) > sqnr(m, q_off, held) + 3.0
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(q_on.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearMul") == 1      # gate, dw, pw; y = x' g
    assert not {"Mul", "HardSwish", "HardSigmoid", "Add"} & set(ops)
