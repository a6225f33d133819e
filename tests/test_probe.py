"""The network probe's tails: a single-layer trial run from a cut late in the graph gives the
same divergence as a run of the whole network, on a real detector with skip connections and
on a graph whose control-flow branch reads a tensor made before the cut."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from builders import make_model, vi
from realdata import ocr_path

from onnxq.algos.qmath import fake_quant
from onnxq.config import ConvertConfig
from onnxq.graph.prepare import prepare
from onnxq.graph.targets import find_targets
from onnxq.graph.variants import augmented, cut_names, tail
from onnxq.search.probe import Probe


def _weights(m: onnx.ModelProto, targets) -> dict[str, np.ndarray]:
    inits = {i.name: i for i in m.graph.initializer}
    return {t.node: numpy_helper.to_array(inits[t.weight]) for t in targets}


def _trials(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every layer's weight with per-tensor 3-bit rounding noise: a change the probe can see."""
    return {n: fake_quant(w, np.abs(w).max() / 3, 0, -4, 3) for n, w in weights.items()}


@pytest.fixture(scope="module")
def detector():
    m, _ = prepare(onnx.load(str(ocr_path("det"))))
    targets, _ = find_targets(m, ConvertConfig().excluded)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.random((1, 3, 64, 96), dtype=np.float32)} for _ in range(2)]
    return m, [t for t in targets if not t.graph], feeds


def test_tails_answer_single_layer_trials_as_the_whole_network_does(detector):
    m, targets, feeds = detector
    weights = _weights(m, targets)
    loaders = [lambda f=f: f for f in feeds]
    whole = Probe(m, targets, weights, loaders)
    cut = Probe(m, targets, weights, loaders, tails=8)
    assert len(cut.tails) >= 4 and not whole.tails
    assert all(t.start > 0 and t.cached for t in cut.tails)
    trials = _trials(weights)
    late = [n for n in trials if cut._tail_for([n]) is not None]
    assert len(late) > len(trials) // 2              # most layers run from a cut
    for node, w in trials.items():
        want, got = whole({node: w}), cut({node: w})
        assert want > 0
        assert got == pytest.approx(want, rel=1e-4), node
    # several layers at once run from the cut before the earliest of them
    pair = dict(list(trials.items())[-2:])
    assert cut(pair) == pytest.approx(whole(pair), rel=1e-4)
    assert cut({}) == whole({}) == 0.0


def test_a_tail_feeds_a_branch_that_reads_a_tensor_made_before_the_cut():
    """An If after the cut whose branch reads `h` (made before it): the tail takes `h` as a
    cut tensor, and its run equals the whole graph's."""
    rng = np.random.default_rng(1)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    then = helper.make_graph([helper.make_node("Add", ["h", "z"], ["o"])], "then", [],
                             [vi("o", [2, 4])])
    other = helper.make_graph([helper.make_node("Sub", ["h", "z"], ["o2"])], "else", [],
                              [vi("o2", [2, 4])])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["z"]),
             helper.make_node("ReduceSum", ["z"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])],
                   {"w1": r(4, 4), "w2": r(4, 4), "zero": np.zeros((), np.float32)})
    assert cut_names(m, 2) == ["a", "h"]
    x = r(2, 4)
    h, a, y = ort.InferenceSession(augmented(m, ["h", "a"]).SerializeToString()).run(["h", "a", "y"], {"x": x})
    t = tail(m, 2, {"h": np.float32, "a": np.float32})
    got = ort.InferenceSession(t.SerializeToString()).run(None, {"h": h, "a": a})[0]
    np.testing.assert_array_equal(got, y)
