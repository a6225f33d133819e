"""Tensors just ahead of a thresholded score keep min-max ranges with room beyond them: a
detector's confident detections lie in a tail that calibration seldom sees, and the searched
ranges clip it."""

import numpy as np
import onnx
import onnxruntime as ort
from builders import make_model, vi
from onnx import helper

import onnxq
from onnxq.graph.placement import score_branch
from onnxq.plan.acts import TAIL_HEADROOM


def scored_head(rng, final: str = "Sigmoid") -> onnx.ModelProto:
    """A trunk conv read by a box conv and by a class branch of three convs ending in `final`."""
    r = lambda *s: (rng.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    inits = {"w0": r(8, 3, 3, 3), "wb": r(4, 8, 1, 1), "w1": r(8, 8, 3, 3), "w2": r(8, 8, 1, 1),
             "wc": r(3, 8, 1, 1), "bc": np.full(3, -2.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "wb"], ["box"], name="box_conv"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "wc", "bc"], ["logit"], name="cls_conv"),
             helper.make_node(final, ["logit"], ["score"], **({"axis": 1} if final == "Softmax" else {})),
             helper.make_node("Concat", ["box", "score"], ["y"], axis=1)]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 7, 8, 8])], inits)


LAYERS = {"conv0", "box_conv", "conv1", "conv2", "cls_conv"}


def test_the_branch_is_the_last_two_layers_ahead_of_an_outputs_sigmoid():
    g = scored_head(np.random.default_rng(0)).graph
    # cls_conv reads r2 (one layer ahead of the score), conv2 reads r1 (two); the trunk's r0 is
    # also read by the box conv, and the logits themselves are not rounded by any target
    assert score_branch(g, LAYERS) == ["c1", "c2", "r1", "r2"]
    assert score_branch(g, LAYERS, depth=1) == ["c2", "r2"]


def test_an_argmax_over_a_softmax_has_no_branch():
    assert score_branch(scored_head(np.random.default_rng(0), "Softmax").graph, LAYERS) == []


def test_the_branch_takes_twice_the_calibration_maximum(tmp_path):
    rng = np.random.default_rng(5)
    m = scored_head(rng)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    q, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8, protect_acts=0), calib=feeds)
    methods = {a.tensor: a.method for a in rep.activations}
    assert methods["r1"] == methods["r2"] == f"minmax x{TAIL_HEADROOM:g} (score branch)" != methods["r0"], methods
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.extend([vi(t, None) for t in ("r0", "r1", "r2")])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    peak = np.max([sess.run(["r0", "r1", "r2"], f) for f in feeds], axis=0).max(axis=tuple(range(1, 5)))
    scale = {t.name: float(onnx.numpy_helper.to_array(t)) for t in q.graph.initializer if t.name.endswith("/act_scale")}
    for name, top in zip(("r1", "r2"), peak[1:]):          # u8 from 0 (Relu): the step is 2 max / 255
        assert abs(scale[f"{name}/act_scale"] * 255 - TAIL_HEADROOM * top) <= 0.02 * TAIL_HEADROOM * top, (name, top)
    assert "r0/act_scale" in scale                          # the trunk keeps whatever the search chose


def test_scores_hold_on_inputs_larger_than_calibration_saw(monkeypatch):
    """Calibrated on quiet inputs and run on inputs twice as large (photos without and with what a
    detector looks for), the scores stay closer to FP32 with the room than on the calibrated
    maximum alone (the trunk and the input clip in both)."""
    rng = np.random.default_rng(6)
    m = scored_head(rng)
    cal = [{"x": 0.5 * rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    held = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    cfg = onnxq.ConvertConfig(bits=8, protect_acts=0)
    with_room, _ = onnxq.convert(m, cfg, calib=cal)
    monkeypatch.setattr("onnxq.plan.acts.TAIL_HEADROOM", 1.0)
    without, _ = onnxq.convert(m, cfg, calib=cal)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = np.concatenate([ref.run(None, f)[0][:, 4:].ravel() for f in held])

    def error(q):
        s = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        return float(np.mean((np.concatenate([s.run(None, f)[0][:, 4:].ravel() for f in held]) - want) ** 2))
    assert error(with_room) < 0.9 * error(without)
