"""report.py: the typed report of a conversion (digits CNN shipped in models/), and its JSON form."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.calib.collectors import RangeHistogram
from onnxq.config import PROTECT
from onnxq.graph.io import load_model
from onnxq.search.choose import BEST_OF
from onnxq.graph.prepare import prepare
from onnxq.graph.targets import find_targets
from onnxq.plan.acts import act_quant
from onnxq.report import clipped_share
from onnxq.types import REPORT_SCHEMA, ActReport, ActStats, Fidelity, LayerReport, OutputMetrics, Report, SkippedReport
from builders import make_model, vi

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, CALIB = str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_calib")


def convert(**cfg):
    return onnxq.convert(DIGITS, onnxq.ConvertConfig(**cfg), calib=CALIB)


@pytest.fixture(scope="module")
def digits():
    q, rep = convert(bits=4)
    return q, rep


@pytest.fixture(scope="module")
def targets():
    return find_targets(prepare(load_model(DIGITS))[0])[0]


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_one_layer_report_per_target(digits, targets):
    _, rep = digits
    assert isinstance(rep, Report) and rep.schema == REPORT_SCHEMA == "onnxq-report/3"
    assert [l.node for l in rep.quantized] == [t.node for t in targets] and len(targets) == 7
    by_target = {t.node: t for t in targets}
    for layer in rep.quantized:
        t = by_target[layer.node]
        assert isinstance(layer, LayerReport)
        assert (layer.op, layer.graph, layer.params, layer.groups) == (t.op, "main", t.params, t.groups)
        assert layer.bits == (8 if t.depthwise or layer.node in rep.protect.protected else 4)
        assert layer.note == ("depthwise conv kept at 8 bits" if t.depthwise else
                              "protected: kept at 8 bits (the most harm to the network at 4 bits)"
                              if layer.node in rep.protect.protected else "")
        assert layer.method.split("+")[0] == ("mse" if t.depthwise or layer.node in rep.protect.protected else "gptq")
        assert number(layer.sqnr_db) and number(layer.sqnr_rtn_db) and layer.sqnr_db >= layer.sqnr_rtn_db - 1e-3
        assert layer.branch_rank == layer.branch_params == 0 and layer.sqnr_with_branch_db is None
        # every layer reads a quantized input, named by its tensor (the smoothed one where smoothed),
        # but a Gemm: weight-only under generic (4 and 8 bits), its float input said why
        if t.op == "Gemm":
            assert (layer.activation, layer.activation_bits) == (None, 32)
            assert layer.float_input_reason.startswith("weight-only under the generic target")
            continue
        read = next((s.smoothed for s in rep.smoothing if layer.node in s.readers and s.smoothed), t.act)
        wide = read in (rep.wide.widened if rep.wide else ())          # kept at 16 bits by --protect-acts
        assert (layer.activation, layer.activation_bits, layer.float_input_reason) == (read, 16 if wide else 8, "")
    assert rep.params == sum(t.params for t in targets)
    assert rep.skipped == []


def test_activation_reports_are_numbers(digits):
    _, rep = digits
    read = {l.activation for l in rep.quantized if l.activation}      # no weight-only layer's float input
    assert {a.tensor for a in rep.activations} == read and None not in read
    widened = set(rep.wide.widened if rep.wide else ())
    assert {a.tensor for a in rep.activations if a.bits == 16} == widened
    for a in rep.activations:
        assert isinstance(a, ActReport)
        if a.tensor in widened:         # --protect-acts: int16 over all calibration saw
            assert (a.method, a.bits, a.signed) == ("minmax", 16, True)
        else:
            # 'best' at 8 bits: one of its clipping methods for every tensor (which one depends on the
            # tensors the model rounds: with the Gemms weight-only, mse)
            assert (a.method, a.bits, a.signed) == (rep.ranges.chosen, 8, False) and a.method in BEST_OF
        assert len(a.range) == len(a.observed) == 2 and all(number(v) for v in a.range + a.observed)
        assert a.range[0] <= a.range[1] and a.observed[0] <= a.observed[1]
        assert a.range[1] <= a.observed[1] + 1e-4                       # a clipping method never widens
        assert number(a.clipped_fraction) and 0 <= a.clipped_fraction < 0.01
        assert number(a.scale) and a.scale > 0 and isinstance(a.zero_point, int)
        if a.signed:                    # symmetric: zero point 0, the larger end on the last code
            assert a.zero_point == 0
            assert a.scale == pytest.approx(max(abs(v) for v in a.range) / (2 ** (a.bits - 1) - 1), rel=1e-3)
        else:                           # the range with 255 steps (widened to contain 0)
            assert 0 <= a.zero_point <= 255
            assert a.scale == pytest.approx((max(a.range[1], 0) - min(a.range[0], 0)) / 255, rel=1e-3)


def test_sizes_opsets_samples_fidelity_and_timings(digits):
    q, rep = digits
    assert rep.model == DIGITS
    assert rep.size_after == q.ByteSize() and 0 < rep.size_after < rep.size_before
    assert (rep.opset_before, rep.opset_after) == (13, 21)
    assert rep.prepare["batchnorm_folded"] == 5 and rep.prepare["constants_moved"] == 0
    calib = len(list(Path(CALIB).glob("*.npz")))
    assert rep.calib_samples + rep.holdout_samples == calib and rep.holdout_samples == 4
    f = rep.fidelity
    assert isinstance(f, Fidelity) and f.samples == 4 and set(f.outputs) == {"logits"}
    out = f.outputs["logits"]
    assert isinstance(out, OutputMetrics) and out.cosine == f.cosine and f.cosine > 0.99
    assert number(f.sqnr_db) and f.sqnr_db > 15 and 0 <= f.top1_agreement <= 1 and f.kl >= 0
    assert {"load", "calibrate", "quantize", "verify", "total"} <= set(rep.seconds)
    assert all(number(v) and v >= 0 for v in rep.seconds.values())
    # the config as run: --protect unset is settled to the convnet's budget (api.protect_budget)
    assert rep.config == {**onnxq.ConvertConfig(bits=4).to_dict(), "protect": PROTECT}
    assert rep.branches is None and rep.mixed is None and rep.search is None and rep.warnings == []


def test_to_dict_is_json_with_the_schema(digits):
    _, rep = digits
    d = rep.to_dict()
    text = json.dumps(d, allow_nan=False)                 # plain JSON: no NaN, no numpy scalars
    back = json.loads(text)
    assert back["schema"] == "onnxq-report/3"
    assert back == json.loads(json.dumps(dataclasses.asdict(rep)))
    assert {f.name for f in dataclasses.fields(Report)} == set(back)
    assert len(back["quantized"]) == 7 and back["quantized"][0]["node"] == rep.quantized[0].node
    assert back["activations"][0]["range"] == rep.activations[0].range
    assert back["fidelity"]["outputs"]["logits"]["cosine"] == rep.fidelity.cosine
    assert back["config"]["weight_method"] == "gptq" and back["config"]["act_method"] == "best"


def test_excluded_layer_is_skipped_with_its_reason():
    _, rep = convert(bits=4, exclude=("/fc2/*",))
    assert [dataclasses.astuple(s) for s in rep.skipped] == [("/fc2/Gemm", "Gemm", "excluded by --exclude")]
    assert all(isinstance(s, SkippedReport) for s in rep.skipped)
    assert "/fc2/Gemm" not in [l.node for l in rep.quantized] and len(rep.quantized) == 6
    # the tensor only fc2 read is no longer quantized
    assert "/fc_relu/Relu_output_0" not in {a.tensor for a in rep.activations}
    assert json.loads(json.dumps(rep.to_dict()))["skipped"][0]["reason"] == "excluded by --exclude"


def test_weight_only_layers_say_why_their_input_stays_float():
    _, rep = convert(bits=8, act_bits=32)
    assert rep.activations == []
    assert {(l.activation, l.activation_bits, l.float_input_reason) for l in rep.quantized} == \
        {(None, 32, "weight-only conversion")}
    assert {l.bits for l in rep.quantized} == {8} and rep.opset_after == 13


def test_loop_body_layers_are_reported_weight_only_with_the_reason():
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"),
         helper.make_node("MatMul", ["s_in", "w"], ["s_out"], name="body_mm")], "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("s_in", [1, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("s_out", [1, 4])],
        [numpy_helper.from_array((0.5 * rng.standard_normal((4, 4))).astype(np.float32), "w")])
    m = make_model([helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)],
                   [vi("x", [1, 4]), vi("n", [], TensorProto.INT64)], [vi("y", [1, 4])], {}, opset=16)
    cal = [{"x": rng.standard_normal((1, 4)).astype(np.float32), "n": np.array(2, np.int64)} for _ in range(6)]
    _, rep = onnxq.convert(m, onnxq.ConvertConfig(bits=8), calib=cal)
    (layer,) = rep.quantized
    assert (layer.node, layer.graph, layer.activation, layer.activation_bits) == ("body_mm", "loop/body/", None, 32)
    assert layer.float_input_reason.startswith("inside a Loop/Scan body")
    assert rep.activations == [] and rep.fidelity.cosine > 0.99


def test_a_range_that_covers_the_observed_values_clips_nothing():
    _, rep = convert(bits=4, act_method="minmax")
    for a in rep.activations:
        assert a.range == a.observed
        assert a.clipped_fraction == 0.0, a


def test_the_report_validates_against_the_documented_schema(digits):
    import jsonschema

    from onnxq.report import report_schema
    documented = json.loads((Path(__file__).resolve().parents[1] / "docs" / "report.schema.json").read_text())
    assert documented == report_schema()           # the committed schema is the one the code derives
    _, rep = digits
    jsonschema.validate(json.loads(json.dumps(rep.to_dict())), documented)
    bad = json.loads(json.dumps(rep.to_dict()))
    bad["activations"][0]["range"] = ["uint8 [-1, 1]"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, documented)


def test_activation_histograms_cover_the_observed_values(digits):
    _, rep = digits
    for a in rep.activations:
        assert a.histogram and sum(a.histogram) > 0
        lo, hi = a.histogram_range
        assert lo <= a.observed[0] + 1e-6 and hi >= a.observed[1] - 1e-6 and hi - lo <= 2 * (a.observed[1] - a.observed[0]) + 1e-3


def test_clipped_share_counts_nothing_beyond_an_end_at_the_observed_extreme():
    """A third of the values sit on a floor (a shifted ReLU's zeros): a range whose low end is
    that floor clips none of them, though the floor shares its histogram bin with values above;
    the top end, cut at the 99th percentile, clips about 1%."""
    rng = np.random.default_rng(3)
    x = np.concatenate([np.full(100_000, -0.0628), rng.exponential(0.5, 200_000) - 0.0628]).astype(np.float32)
    h = RangeHistogram()
    h.update(x)
    st = ActStats(h.counts, h.edges, h.observed)
    hi = float(np.percentile(x, 99.0))
    share = clipped_share(act_quant(float(x.min()), hi, 8, False, "test"), st)
    assert abs(share - float(np.mean(x > hi))) < 2e-3, share
