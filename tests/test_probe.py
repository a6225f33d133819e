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

from onnxq.algos.metrics import divergence
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
    # the cached tensors own their memory, not the (dropped) session's that computed them
    assert all(v.flags.owndata for t in cut.tails for d in t.cached for v in d.values())
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


def test_a_layer_without_a_bias_is_probed_with_the_bias_its_plan_gives_it():
    """A Conv and a Gemm that read no bias get one from their plan (the mean-shift correction,
    sequential mode's fit) and the emitted model adds it: a probe fed (weight, bias) must see
    it, exactly as a model with that bias written in."""
    rng = np.random.default_rng(2)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"wc": r(4, 3, 3, 3) * 0.3, "wg": r(4 * 6 * 6, 5) * 0.1}     # logits of a few units
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"]), helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("Flatten", ["a"], ["f"]), helper.make_node("Gemm", ["f", "wg"], ["y"])]
    m, _ = prepare(make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 5])], inits))
    targets, _ = find_targets(m, ConvertConfig().excluded)
    assert sorted(t.op for t in targets) == ["Conv", "Gemm"] and not any(t.bias for t in targets)
    feeds = [{"x": r(1, 3, 8, 8)} for _ in range(2)]
    probe = Probe(m, targets, _weights(m, targets), [lambda f=f: f for f in feeds])
    conv, gemm = sorted(targets, key=lambda t: t.op)
    bc, bg = r(4), r(5)
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["c"]), *nodes[1:3],
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"])]
    with_bias = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 5])], {**inits, "bc": bc, "bg": bg})
    sess = ort.InferenceSession(with_bias.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = float(np.mean([divergence(ref.run(None, f), sess.run(None, f)) for f in feeds]))
    got = probe({conv.node: (inits["wc"], bc), gemm.node: (inits["wg"], bg)})
    assert want > 0 and got == pytest.approx(want, rel=1e-5)
    assert probe({conv.node: (inits["wc"], None)}) == 0.0      # no bias given: the zero one stays


def test_a_model_under_the_multiply_add_floor_keeps_no_tails_and_gives_the_same_file(monkeypatch):
    """Tails only pay where whole runs are costly: the digits CNN (0.09 M multiply-adds a sample)
    keeps none, and with them forced on its file is the same (they change speed, not answers)."""
    from pathlib import Path

    import onnxq
    import onnxq.search.probe as probe
    import onnxq.search.wide as wide

    models = Path(__file__).resolve().parents[1] / "models"
    kept = []

    def counted(real):
        def keep(*args, **kwargs):
            out = real(*args, **kwargs)
            kept.append(len(out))
            return out
        return keep

    monkeypatch.setattr(probe, "keep_tails", counted(probe.keep_tails))
    monkeypatch.setattr(wide, "keep_tails", counted(wide.keep_tails))
    convert = lambda: onnxq.convert(str(models / "digits_cnn.onnx"), onnxq.ConvertConfig(bits=4),   # noqa: E731
                                    calib=str(models / "digits_calib"))[0].SerializeToString()
    plain = convert()
    assert kept == [] and probe.tails_for(probe.TAIL_MIN_MACS * 0.99) == 0
    monkeypatch.setattr(probe, "TAIL_MIN_MACS", 0.0)
    assert convert() == plain and sum(kept) > 0 and probe.tails_for(0.0) == probe.TAILS
