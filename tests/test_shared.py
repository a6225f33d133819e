"""A weight that several layers read is quantized once and stored once."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import onnxq
from onnxq.algos.metrics import sqnr_db
from builders import make_model, vi

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((64, 64)) / 8).astype(np.float32)
CAL = [{"x": RNG.standard_normal((8, 64)).astype(np.float32)} for _ in range(24)]
HELD = {"x": RNG.standard_normal((64, 64)).astype(np.float32)}


def twice(second: str = "w") -> onnx.ModelProto:
    """y = relu(x W) W: one weight read by two MatMuls (or, with second="w2", an equal copy)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="l0"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", second], ["y"], name="l1")]
    inits = {"w": W} if second == "w" else {"w": W, second: W.copy()}
    return make_model(nodes, [vi("x", [None, 64])], [vi("y", [None, 64])], inits)


def weight_bytes(m: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in m.graph.initializer if "/weight_q" in t.name)


def answer(m: onnx.ModelProto) -> np.ndarray:
    return ort.InferenceSession(m.SerializeToString()).run(None, HELD)[0]


@pytest.mark.parametrize("bits, target", [(8, "generic"), (4, "generic"), (4, "ort-cpu"), (4, "qnn")])
def test_a_shared_weight_is_stored_once_and_costs_little(bits, target):
    cfg = onnxq.ConvertConfig(bits=bits, target=target)
    shared, rep = onnxq.convert(twice(), cfg, calib=CAL)
    apart, _ = onnxq.convert(twice("w2"), cfg, calib=CAL)         # two equal weights, each its own
    assert rep.shared_weights == 1
    assert all("stored once" in lp.note for lp in rep.quantized)
    assert weight_bytes(shared) == W.size * bits // 8              # one copy of the codes, not two
    want = answer(twice())
    # one set of codes fitted to both readers' inputs: close to each reader fitted alone
    assert sqnr_db(want, answer(shared)) > sqnr_db(want, answer(apart)) - 1.0


def test_readers_at_different_bits_keep_their_own_codes_and_say_why():
    cfg = onnxq.ConvertConfig(bits=4, bits_overrides=(("l1", 8),))
    q, rep = onnxq.convert(twice(), cfg, calib=CAL)
    assert rep.shared_weights == 0
    assert all("stored once per reader: readers take different bits" in lp.note for lp in rep.quantized)
    assert sorted(t.name for t in q.graph.initializer if t.name.endswith("/weight_q")) == ["l0/weight_q", "l1/weight_q"]
    assert sqnr_db(answer(twice()), answer(q)) > 15



def unrolled(copies: bool = False, steps: int = 6) -> onnx.ModelProto:
    """h_{k+1} = tanh(x + h_k W + b), the step weight and bias read by every step (an RNN
    unrolled by an exporter), or with `copies`, each step reading its own equal copy."""
    nodes, h, inits = [], "x", {}
    b = (np.random.default_rng(1).standard_normal(64) / 8).astype(np.float32)
    for k in range(steps):
        w, bb = (f"w{k}", f"b{k}") if copies else ("w", "b")
        inits.update({w: W.copy(), bb: b.copy()})
        nodes += [helper.make_node("Gemm", [h, w, bb], [f"g{k}"], name=f"step{k}"),
                  helper.make_node("Add", [f"g{k}", "x"], [f"s{k}"]),
                  helper.make_node("Tanh", [f"s{k}"], [f"h{k}"])]
        h = f"h{k}"
    return make_model(nodes, [vi("x", [None, 64])], [vi(h, [None, 64])], inits)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_steps_of_an_unrolled_loop_are_coded_once(monkeypatch, bits):
    import onnxq.plan.layers as layers
    coded = []
    real = layers.plan_layer
    monkeypatch.setattr(layers, "plan_layer", lambda t, *a, **k: coded.append(t.node) or real(t, *a, **k))
    # weight-only, uniform bits: the codes' own error (--protect would raise some of the copies)
    cfg = onnxq.ConvertConfig(bits=bits, act_bits=32, protect=0.0)
    q, rep = onnxq.convert(unrolled(), cfg, calib=CAL)
    assert rep.shared_weights == 1 and len(rep.quantized) == 6
    assert coded and set(coded) == {"step0"}                  # the weight is coded for one step, not six
    assert weight_bytes(q) == W.size * bits // 8
    monkeypatch.setattr(layers, "plan_layer", real)
    apart, _ = onnxq.convert(unrolled(copies=True), cfg, calib=CAL)        # six copies, each fitted alone
    want = answer(unrolled())
    assert sqnr_db(want, answer(q)) > sqnr_db(want, answer(apart)) - 1.0


def test_readers_of_one_weight_pool_their_statistics_wherever_all_of_them_gather_h():
    """An unrolled loop's steps gather one H between them (a batched product, not a rank-one
    update per step and sample) whether every layer gathers H (low bits) or only the named ones
    do (an 8-bit conversion's second-order layers); a step that gathers no H pools nothing."""
    from onnxq.calib.collect import _moments
    from onnxq.graph.targets import find_targets
    targets = find_targets(unrolled())[0]
    nodes = {t.node for t in targets}
    for hessians in (True, nodes):
        moments, pools = _moments(targets, hessians)
        assert set(pools) == nodes and len({id(p) for p in pools.values()}) == 1
        assert all(m.h is None for m in moments.values())          # the steps keep their own means only
    moments, pools = _moments(targets, nodes - {"step3"})
    assert not pools and moments["step3"].h is None and moments["step0"].h is not None
    q, rep = onnxq.convert(unrolled(), onnxq.ConvertConfig(bits=8, act_bits=8), calib=CAL)
    assert rep.shared_weights == 1 and {l.method for l in rep.quantized} == {"gptq (blocks of 16)"}
