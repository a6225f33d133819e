"""--protect-acts: at 8-bit activations the tensors whose rounding costs the network most are kept
at 16 bits (int16 Q/DQ), at most a stated share of them, only when that helps on calibration
samples the choice was not made on."""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq import api
from onnxq.errors import ConfigError
from onnxq.graph.rewrite import apply_plan
from onnxq.graph.variants import mask_name
from onnxq.plan.biases import code_biases
from onnxq.runtime import run_as, session
from onnxq.plan.rules import ORT_WIDE_MACS, RULES
from onnxq.search.wide import MIN_SHARE, MaskSession, candidates, layer_macs, widen_acts
from onnxq.types import Plan

from builders import conv_zoo
from realdata import ocr_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ocr_data import cls_samples, rec_samples  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, CALIB = str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_calib")


def act_zero_types(model: onnx.ModelProto) -> dict[str, int]:
    """{activation: data type of its Q zero point} for every activation Q/DQ pair."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return {n.input[0].removesuffix("/clipped"): inits[n.input[2]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[2].endswith("/act_zero")}


def run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [s.run(None, f)[0] for f in feeds]


def sqnr(ref, out):
    r, o = np.concatenate([a.ravel() for a in ref]), np.concatenate([a.ravel() for a in out])
    return 10 * np.log10(np.sum(r ** 2) / np.sum((r - o) ** 2))


@pytest.fixture(scope="module")
def rec(converted):
    path = str(ocr_path("rec"))
    cal = [f for f, _ in rec_samples(32, seed=0)]
    held = [f for f, _ in rec_samples(40, seed=1)]
    ref = run(onnx.load(path), held)
    got = {}
    assert onnxq.ConvertConfig(bits=8).protect_acts == 0.25      # the default: test_real_ocr's conversion
    for frac, key in ((0.25, "rec w8 32"), (0.0, "rec w8 32 protect_acts 0")):
        q, rep = converted(key, path, cal, bits=8, protect_acts=frac)
        got[frac] = (q, rep, sqnr(ref, run(q, held)))
    return got


@pytest.mark.slow
def test_widened_activations_are_int16_within_budget_and_lift_held_out_fidelity(rec):
    q, rep, db = rec[0.25]
    q0, rep0, db0 = rec[0.0]
    w = rep.wide
    assert rep0.wide is None
    assert w.widened and len(w.widened) <= w.budget == int(0.25 * w.tensors)
    assert w.check_after < w.check_before
    assert set(w.harm) == {a.tensor for a in rep0.activations if a.bits == 8}
    # the most harmful tensor leads; every widened one costs the network a stated share alone
    assert max(w.harm, key=w.harm.get) == w.widened[0]
    assert all(w.harm[a] > MIN_SHARE * w.loss for a in w.widened)
    types = act_zero_types(q)
    assert {a for a, t in types.items() if t == onnx.TensorProto.INT16} == set(w.widened)
    assert all(t == onnx.TensorProto.UINT8 for a, t in types.items() if a not in w.widened)
    assert set(act_zero_types(q0).values()) == {onnx.TensorProto.UINT8}
    bits = {a.tensor: a.bits for a in rep.activations}
    assert all(bits[a] == 16 for a in w.widened)
    # on 40 held-out lines: 14.6 -> 22.2 dB measured (11 of 47 tensors widened)
    assert db > db0 + 3.0, (db, db0)
    assert rep.size_after <= rep0.size_after * 1.001


def _spy_plan(monkeypatch) -> dict:
    """What the conversion hands the 16-bit protection (prepared model, plan, statistics)."""
    seen = {}

    def keep(prepared, plan, stats, *args, **kwargs):
        seen.update(prepared=prepared, plan=copy.deepcopy(plan), stats=stats,
                    units=kwargs.get("units", args[4] if len(args) > 4 else None))
        return widen_acts(prepared, plan, stats, *args, **kwargs)

    monkeypatch.setattr(api, "widen_acts", keep)
    return seen


def test_mask_session_is_the_emitted_model_and_unrounds_what_it_is_told(feeds, monkeypatch):
    seen = _spy_plan(monkeypatch)
    cal = feeds(8)
    onnxq.convert(conv_zoo(np.random.default_rng(0)), onnxq.ConvertConfig(bits=8), calib=cal)
    prepared, plan = seen["prepared"], seen["plan"]
    # the sessions run as the conversion runs them (its target's options: weights folded at
    # load, so no session rounds a weight-only layer's input in a fused kernel)
    with run_as(RULES["generic"].session_options):
        _check_mask_session(prepared, plan, cal)


def _check_mask_session(prepared, plan, cal):
    names = candidates(plan, onnxq.ConvertConfig(bits=8))
    assert len(names) >= 4
    ms = MaskSession(prepared, plan, names)
    emitted = session(apply_plan(prepared, code_biases(plan)))
    weight_only = session(apply_plan(prepared, code_biases(Plan(layers=plan.layers, acts={}))))

    def out(unrounded, f):
        masks = {mask_name(a): np.array(0.0 if a in unrounded else 1.0, np.float32) for a in names}
        return ms.sess.run(None, {**f, **masks})[0]

    for f in cal[:3]:
        want, plain = emitted.run(None, f)[0], weight_only.run(None, f)[0]
        tol = 1e-5 * np.abs(want).max()
        assert np.allclose(out(set(), f), want, rtol=0, atol=tol)
        # all unrounded: the weight-only model (up to its int32 biases, coded on the 8-bit scales)
        rounding = np.abs(want - plain).max()
        assert rounding > 30 * tol and np.abs(out(set(names), f) - plain).max() < rounding / 20
        one = out({names[0]}, f)                                 # one tensor unrounded: in between
        assert not np.array_equal(one, out(set(), f)) and np.abs(one - plain).max() > rounding / 20
    # trials with one tensor rounded run from a cut after the tensors before it, same loss
    ref = [session(prepared).run(None, f) for f in cal]
    tails = MaskSession(prepared, plan, names, cache=cal, tails=4)
    last = max(names, key=tails.first.get)                     # the tensor latest in the graph
    assert tails.tails and tails._tail_for(tails.cached, [last]) is not None
    every = frozenset(names)
    for a in names:
        want = ms.loss(cal, ref, every - {a})
        assert np.isclose(tails.loss(tails.cached, ref, every - {a}), want, rtol=1e-5, atol=1e-12), a
    assert tails._tail_for(list(cal), [last]) is None              # other samples: the whole graph


def test_under_ort_cpu_only_tensors_the_model_rounds_are_weighed(feeds):
    """ort-cpu runs the zoo's Gemm/MatMul layers as MatMulNBits, which read float: their inputs
    are not rounded, so they are neither weighed nor counted in the budget."""
    q, rep = onnxq.convert(conv_zoo(np.random.default_rng(0)), onnxq.ConvertConfig(bits=8, target="ort-cpu"),
                           calib=feeds(16))
    scales = {t.name[:-len("/act_scale")] for t in q.graph.initializer if t.name.endswith("/act_scale")}
    assert any(n.op_type == "MatMulNBits" for n in q.graph.node)
    assert rep.wide is not None and rep.wide.harm and set(rep.wide.harm) <= scales
    assert rep.wide.tensors == len(rep.wide.harm) + rep.wide.over_budget
    # and the report lists the activations the model rounds, not the float input of a MatMulNBits
    assert {a.tensor for a in rep.activations} == scales


def _take_largest(ms, sets, check, summary):
    """The check always keeps the largest set the budget lets (whether a set pays depends on the
    machine's 8-bit kernels); what is tested is which tensors are weighed and ranked."""
    summary.check_before = summary.check_after = ms.loss(*check)
    return list(sets[0])


def test_under_ort_cpu_a_tensor_over_the_budget_alone_is_not_weighed_and_nothing_else_changes(monkeypatch):
    """PP-OCR cls: 34 of its 86 tensors would each take more than the budget off integer kernels."""
    from onnxq.search import wide

    monkeypatch.setattr(wide, "checked", _take_largest)
    seen = _spy_plan(monkeypatch)
    cal, model = [f for f, _ in cls_samples(16, seed=0)], str(ocr_path("cls"))
    cfg = onnxq.ConvertConfig(bits=8, target="ort-cpu")
    q, rep = onnxq.convert(model, cfg, calib=cal)
    w = rep.wide
    assert w.widened and w.over_budget > 0 and w.tensors == len(w.harm) + w.over_budget
    # each tensor left out takes more than the budget off integer kernels on its own
    taken = wide.unfused_share(seen["plan"], layer_macs(seen["plan"], seen["stats"]), seen["units"] or {})
    left = set(candidates(seen["plan"], cfg)) & set(act_zero_types(q)) - set(w.harm)     # those the model rounds
    assert len(left) == w.over_budget and all(taken([a]) > ORT_WIDE_MACS for a in left)
    assert all(taken([a]) <= ORT_WIDE_MACS for a in w.harm)
    # weighing every tensor, as before, ranks and widens the same ones: the same bytes
    monkeypatch.setattr(wide, "affordable_alone", lambda names, taken, share: list(names))
    q_all, rep_all = onnxq.convert(model, cfg, calib=cal)
    assert set(rep_all.wide.harm) == set(w.harm) | left and rep_all.wide.over_budget == 0
    assert {a: rep_all.wide.harm[a] for a in w.harm} == w.harm
    assert rep_all.wide.widened == w.widened and q_all.SerializeToString() == q.SerializeToString()


@pytest.mark.parametrize("cfg", [dict(bits=8, protect_acts=0), dict(bits=8, target="openvino"),
                                 dict(bits=8, act_bits=16), dict(bits=8, act_bits=32)])
def test_no_widening_when_off_or_where_the_target_runs_8_bit_kernels(cfg):
    q, rep = onnxq.convert(DIGITS, onnxq.ConvertConfig(**cfg), calib=CALIB)
    assert rep.wide is None
    if cfg.get("act_bits", 8) == 8:
        assert set(act_zero_types(q).values()) == {onnx.TensorProto.UINT8}


def test_layer_multiply_adds_come_from_the_input_values_seen(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_target_rules import relu_net

    seen = _spy_plan(monkeypatch)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    onnxq.convert(relu_net(rng), onnxq.ConvertConfig(bits=8), calib=feeds)
    macs = layer_macs(seen["plan"], seen["stats"])
    # per sample: 3x3 'same' convs over 16x16 and 8x8 maps, a 1x1 conv, a Gemm 8 -> 5; over the
    # samples calibration ran (one of six is held out to check the result)
    n = macs["fc"] / 40
    assert n in (5, 6)
    assert macs == pytest.approx({"conv0": n * 256 * 8 * 27, "conv1": n * 256 * 8 * 72, "conv2": n * 256 * 8 * 8,
                                  "conv3": n * 64 * 8 * 144, "fc": n * 40})


@pytest.mark.slow
def test_ort_cpu_widens_only_what_its_multiply_add_budget_lets(monkeypatch, tmp_path):
    """Under ort-cpu a unit with an int16 input or output loses its integer kernel: the widened
    tensors touch at most ORT_WIDE_MACS of the multiply-adds, every other conv still fuses.
    Whether the check keeps a widened set depends on the machine's 8-bit kernels (on a CPU with
    VNNI, onnxruntime's 8-bit rec loses less and the check declines it), so here the check
    always takes the largest set the budget lets: what is tested is the budget."""
    from onnxq.search import wide

    def take_largest(ms, sets, check, summary):
        summary.check_before = summary.check_after = ms.loss(*check)
        return list(sets[0])

    monkeypatch.setattr(wide, "checked", take_largest)
    path = str(ocr_path("rec"))
    cal = [f for f, _ in rec_samples(32, seed=0)]
    seen = _spy_plan(monkeypatch)
    # the ranges' method is not what is tested: a given one skips ort-cpu's per-tensor choice
    # (`auto`, 60 network evaluations, a third of this conversion's time)
    q, rep = onnxq.convert(path, onnxq.ConvertConfig(bits=8, target="ort-cpu", act_method="percentile"), calib=cal)
    w = rep.wide
    assert w is not None and w.widened and 0 < w.unfused <= ORT_WIDE_MACS
    types = act_zero_types(q)
    assert {a for a, t in types.items() if t == onnx.TensorProto.INT16} >= set(w.widened)
    # the ranking is by harm, skipping what the budget cannot take: nothing more harmful fits
    ranked = sorted(w.harm, key=lambda a: -w.harm[a])
    assert ranked.index(w.widened[-1]) >= len(w.widened) - 1
    macs = layer_macs(seen["plan"], seen["stats"])
    convs = [lp.target.node for lp in seen["plan"].layers if lp.target.op == "Conv"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    unfused = sum(op in ("Conv", "FusedConv") for op in ops)
    assert ops.count("QLinearConv") >= len(convs) - unfused and unfused >= 1
    assert sum(macs.values()) > 0


def test_the_share_is_checked():
    with pytest.raises(ConfigError, match="protect-acts"):
        onnxq.ConvertConfig(protect_acts=1.5)


def test_the_command_line_reports_the_widened_set_and_turns_it_off(tmp_path, cli_run):
    out = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    code, stdout, _ = cli_run("convert", DIGITS, "-o", out, "--bits", "8", "--calib", CALIB, "--report", report)
    assert code == 0 and "activations kept at 16 bits:" in stdout
    full = json.loads(report.read_text())
    wide = full["wide"]
    # every 8-bit activation the model rounds (the Gemms' inputs are float: weight-only under generic)
    assert wide["tensors"] == len(full["activations"]) == 5
    assert wide["budget"] == 1 and set(wide["harm"]) and "widened" in wide
    code, stdout, _ = cli_run("convert", DIGITS, "-o", out, "--bits", "8", "--calib", CALIB, "--no-protect-acts")
    assert code == 0 and "16 bits" not in stdout
    assert set(act_zero_types(onnx.load(out)).values()) == {onnx.TensorProto.UINT8}


def test_a_failing_harm_measurement_leaves_the_8_bit_model_and_says_why(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : a kernel this runtime lacks\nsecond line")

    monkeypatch.setattr(api, "widen_acts", broken)
    q, rep = onnxq.convert(DIGITS, onnxq.ConvertConfig(bits=8), calib=CALIB)
    assert rep.wide is None and set(act_zero_types(q).values()) == {onnx.TensorProto.UINT8}
    assert any(w.startswith("activations stay at 8 bits: measuring their harm failed") and "second line" not in w
               for w in rep.warnings)


def test_under_ort_cpu_unrounding_every_candidate_unrounds_its_tied_tensors_and_hard_swish_gates(monkeypatch):
    """A Pad tied to a HardSwish output (the folded affine block of tests/test_forward.py) and the
    integer HardSwish's gate: with every candidate unrounded the mask session is the weight-only
    model, so a candidate's harm counts all that keeping it at 16 bits would remove."""
    from test_forward import affine_net
    seen = _spy_plan(monkeypatch)
    rng = np.random.default_rng(5)
    cal = [{"x": (rng.standard_normal((1, 8, 12, 12)) * 2).astype(np.float32)} for _ in range(12)]
    cfg = onnxq.ConvertConfig(bits=8, target="ort-cpu")
    onnxq.convert(affine_net(rng), cfg, calib=cal)
    prepared, plan = seen["prepared"], seen["plan"]
    names = candidates(plan, cfg)
    assert "h" in names and plan.tied.get("dw/in_affine_padded") == "h"
    ms = MaskSession(prepared, plan, names)
    assert ms.followers == {"dw/in_affine_padded": "h"}
    emitted = session(apply_plan(prepared, code_biases(plan)))
    weight_only = session(apply_plan(prepared, code_biases(Plan(layers=plan.layers, acts={}, target="ort-cpu"))))
    for f in cal[:3]:
        want, plain = emitted.run(None, f)[0], weight_only.run(None, f)[0]
        rounding = np.abs(want - plain).max()
        assert np.allclose(ms.sess.run(None, {**f, **ms._masks(set())})[0], want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert np.abs(ms.sess.run(None, {**f, **ms._masks(set(names))})[0] - plain).max() < rounding / 20


def test_a_candidate_the_emitted_model_does_not_round_is_no_candidate_of_the_mask_session(feeds, monkeypatch):
    """Under ort-cpu the zoo's MatMulNBits inputs are candidates with no switch in the emitted model
    (they are never rounded): the mask session drops them when it is built, so a trial bounds its
    tail by the tensors it rounds (in round 48 such a name kept every trial off the tails)."""
    seen = _spy_plan(monkeypatch)
    cal = feeds(16)
    cfg = onnxq.ConvertConfig(bits=8, target="ort-cpu")
    onnxq.convert(conv_zoo(np.random.default_rng(0)), cfg, calib=cal)
    prepared, plan = seen["prepared"], seen["plan"]
    names = candidates(plan, cfg)
    ms = MaskSession(prepared, plan, names, cache=cal[:4], tails=4)
    dropped = set(names) - set(ms.names)
    nbits = {n.input[0] for n in apply_plan(prepared, code_biases(plan)).graph.node if n.op_type == "MatMulNBits"}
    assert dropped and dropped <= nbits and ms.names == [a for a in names if a in ms.first]
    last = max(ms.names, key=ms.first.get)
    assert ms.tails and ms._tail_for(ms.cached, [last]) is not None
    ref = [session(prepared).run(None, f) for f in ms.cached]
    every = frozenset(ms.names)
    # the trial rounding only `last` runs from its tail, and reads what the whole graph reads
    whole = MaskSession(prepared, plan, names)
    assert np.isclose(ms.loss(ms.cached, ref, every - {last}), whole.loss(ms.cached, ref, every - {last}), rtol=1e-5)
