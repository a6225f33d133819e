"""Output-side tensors under full node units: their ranges stop where every reader saturates,
and the range choice and the 16-bit protection see them like the layers' inputs."""

import math

import numpy as np
import onnx
import onnxruntime as ort
from builders import make_model, vi
from onnx import helper, numpy_helper

import onnxq
from onnxq.algos.metrics import sqnr_db
from onnxq.graph.placement import plan_placement
from onnxq.graph.targets import find_targets
from onnxq.plan.acts import method_range, saturate
from onnxq.plan.rules import RULES
from onnxq.types import ActStats
from test_target_rules import relu_net


def hardswish_net(rng) -> onnx.ModelProto:
    """conv0 (a bias that pushes most of its output far below -3) -> HardSwish -> conv1; conv1 ->
    Clip(-1, 2) and HardSigmoid, added, -> conv2: the first two convs' outputs are read only by
    saturating ops."""
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    inits = {"w0": r(8, 8, 3, 3), "b0": np.linspace(-12, 2, 8).astype(np.float32), "w1": r(8, 8, 1, 1), "w2": r(8, 8, 1, 1),
             "lo": np.array(-1, np.float32), "hi": np.array(2, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("HardSwish", ["c0"], ["h0"]),
             helper.make_node("Conv", ["h0", "w1"], ["c1"], name="conv1"),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["k1"]),
             helper.make_node("HardSigmoid", ["c1"], ["s1"], alpha=0.25, beta=0.5),
             helper.make_node("Add", ["k1", "s1"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    # 8 input channels: under ort-cpu a stem on a <= 4-channel input stays float (tests/test_target_rules.py)
    return make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 8, 8, 8])], inits, opset=14)


def test_placement_bounds_tensors_whose_every_reader_saturates():
    m = hardswish_net(np.random.default_rng(0))
    p = plan_placement(m, find_targets(m)[0], RULES["ort-cpu"])
    assert p.bounds["c0"] == (-3.0, math.inf)
    # Clip flat outside [-1, 2], HardSigmoid outside [-2, 2]: both read c1, and between -2 and -1
    # the HardSigmoid still moves, so [-2, 2]
    assert p.bounds["c1"] == (-2.0, 2.0)
    assert plan_placement(m, find_targets(m)[0], RULES["generic"]).bounds == {}


def silu_net(rng) -> onnx.ModelProto:
    """conv0 -> x * sigmoid(x) -> conv1 -> Tanh and Sigmoid, added -> conv2; conv1's output is
    also read by a HardSigmoid gate's Mul (hard-swish written out) whose product feeds conv3."""
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    inits = {k: r(8, 8, 1, 1) for k in ("w0", "w1", "w2", "w3")}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("Sigmoid", ["c0"], ["g0"]),
             helper.make_node("Mul", ["g0", "c0"], ["s0"]),
             helper.make_node("Conv", ["s0", "w1"], ["c1"], name="conv1"),
             helper.make_node("Tanh", ["c1"], ["t1"]),
             helper.make_node("Sigmoid", ["c1"], ["g1"]),
             helper.make_node("Add", ["t1", "g1"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["c2"], name="conv2"),
             helper.make_node("HardSigmoid", ["c2"], ["h2"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["c2", "h2"], ["s2"]),
             helper.make_node("Conv", ["s2", "w3"], ["y"], name="conv3")]
    return make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 8, 8, 8])], inits, opset=14)


def test_placement_bounds_smooth_saturations_and_gated_products():
    m = silu_net(np.random.default_rng(5))
    b = plan_placement(m, find_targets(m)[0], RULES["ort-cpu"]).bounds
    assert b["c0"] == (-8.0, math.inf)                 # x * sigmoid(x): below -8 within 0.003 of 0
    assert b["c1"] == (-8.0, 8.0)                      # Tanh flat outside +-4.5, Sigmoid outside +-8
    assert b["c2"][1] == math.inf and abs(b["c2"][0] + 3.0) < 1e-6    # x * hardsigmoid(x) is 0 below -3
    assert "s0" not in b and "s2" not in b             # read by convs


def test_saturate_moves_the_mass_beyond_a_bound_onto_it():
    edges = np.linspace(-16, 16, 33)
    counts = np.zeros(32, np.int64)
    counts[:8] = 10                       # values in [-16, -8)
    counts[16:20] = 5                     # values in [0, 4)
    st = {"t": ActStats(counts, edges, (-15.5, 3.9)), "u": ActStats(counts, edges, (-15.5, 3.9))}
    out = saturate(st, {"t": (-3.0, math.inf)})
    t = out["t"]
    assert t.counts.sum() == counts.sum() and t.observed == (-3.0, 3.9)
    assert t.counts[13] == 80 and not t.counts[:13].any()     # bin [-3, -2) holds what lay below -3
    assert out["u"] is st["u"]
    for spec in ("minmax", "percentile:99.99", "mse"):
        lo, hi = method_range(t, spec, 8, False)
        assert -3.0 - 1e-6 <= lo and hi <= 4.0, (spec, lo, hi)


def min_max_ort_cpu_grid(m: onnx.ModelProto, feeds, name: str) -> tuple[onnx.ModelProto, float, int]:
    """The W8A8 ort-cpu conversion (min-max ranges, no int16) and the scale and zero point of
    tensor `name`'s output Q."""
    q, _ = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu", act_method="minmax", protect_acts=0),
                         calib=feeds)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qn = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
    return q, float(inits[qn.input[1]]), int(inits[qn.input[2]])


def test_ort_cpu_range_of_a_pre_hardswish_tensor_ends_at_minus_three():
    rng = np.random.default_rng(1)
    m = hardswish_net(rng)
    feeds = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32) * 2} for _ in range(24)]
    extra = onnx.ModelProto()
    extra.CopyFrom(m)
    extra.graph.output.append(vi("c0", None))
    low = min(float(ort.InferenceSession(extra.SerializeToString()).run(["c0"], f)[0].min()) for f in feeds)
    assert low < -10.0
    _, scale, zp = min_max_ort_cpu_grid(m, feeds, "c0")
    assert -3.0 - scale <= -zp * scale <= -3.0 + scale, (scale, zp)


def test_ort_cpu_range_of_a_silu_input_ends_at_minus_eight():
    """A YOLOv8-style conv -> x * sigmoid(x) whose pre-activation reaches -30: its u8 grid starts
    at -8 (what lies below is read as less than 0.003), so the step is finer than min-max's."""
    rng = np.random.default_rng(6)
    m = silu_net(rng)
    bias = np.linspace(-30, 4, 8).astype(np.float32)
    m.graph.initializer.append(numpy_helper.from_array(bias, "b0"))
    m.graph.node[0].input.append("b0")
    feeds = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(24)]
    q, scale, zp = min_max_ort_cpu_grid(m, feeds, "c0")
    assert -8.0 - scale <= -zp * scale <= -8.0 + scale, (scale, zp)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, feeds[0])[0]
    out = ort.InferenceSession(q.SerializeToString()).run(None, feeds[0])[0]
    assert sqnr_db(ref, out) > 25


def test_searches_see_output_side_tensors_and_move_tied_ones_with_their_source():
    """Under ort-cpu a conv's output feeding a residual Add, the Add's and the pool's outputs
    are quantized though no layer reads them: the per-tensor range choice measures them; the
    MaxPool's output keeps its source's parameters."""
    rng = np.random.default_rng(2)
    m = relu_net(rng)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(24)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu", act_method="auto", protect_acts=0),
                           calib=feeds)
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert {"c2", "a", "g", "p"} <= quantized, quantized
    assert "f" not in quantized             # the Gemm runs as MatMulNBits (weight-only), reading float
    assert rep.ranges.tensors == len(quantized - {"p"})
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qs = {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]])) for n in q.graph.node
          if n.op_type == "QuantizeLinear" and n.input[0] in quantized}
    assert qs["p"] == qs["a"]


def test_ort_cpu_leaves_a_last_layers_output_unrounded_when_it_reaches_an_output_through_other_ops():
    """A YOLOv8 box head's last conv feeds reshapes and the box arithmetic, not another layer: an
    output Q there would clip what calibration never saw (distances of larger boxes)."""
    rng = np.random.default_rng(4)
    r = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    inits = {"w0": r(8, 8, 3, 3), "w1": r(4, 8, 1, 1), "shape": np.array([1, 4, 64], np.int64),
             "stride": np.array(8.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1"),
             helper.make_node("Reshape", ["c1", "shape"], ["flat"]),
             helper.make_node("Mul", ["flat", "stride"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 4, 64])], inits)
    feeds = [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(16)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, target="ort-cpu"), calib=feeds)
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "r0" in quantized and not quantized & {"c1", "flat"}, quantized
    notes = {layer.node: layer.note for layer in rep.quantized}
    assert "reaches an output" in notes["conv1"] and "output not rounded" not in notes["conv0"]
