"""The conversion report: what was quantized, what stayed float and why, sizes, fidelity."""

from __future__ import annotations

import math

import numpy as np
from .graph.floats import float_nodes
from .graph.io import opset_of
from .graph.large import model_bytes
from .plan.biases import weight_only
from .graph.walk import initializer_bytes
from .types import ActReport, Conversion, LayerReport, Report, SkippedReport

BRANCH_SCOPE = "/residual/"    # the emitted branch nodes and initializers live under <node>/residual/


def _num(x):
    if x is None:
        return None
    return None if (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def _input_note(c: Conversion, t, act) -> tuple[int, str]:
    """(activation bits, why the input stays float or "") of a layer."""
    if act is not None:
        return act.bits, ""
    if t.op == "Gather":
        return 32, "embedding lookup: the table is quantized, the lookup reads indices"
    if t.act is None and t.graph:
        return 32, "inside a Loop/Scan body, which calibration cannot observe: weight-only"
    if t.act is None:
        return 32, "activation type unknown or not float32"
    if not c.cfg.quantize_acts:
        return 32, "weight-only conversion"
    return 32, "never reached by the calibration data: weight-only"


def _layer(c: Conversion, lp) -> LayerReport:
    t = lp.target
    act = c.plan.acts.get(t.act) if t.act and not weight_only(c.plan, lp) else None
    bits, why = _input_note(c, t, act)
    if act is None and t.act and c.cfg.quantize_acts and weight_only(c.plan, lp):
        bits, why = 32, (f"weight-only under the {c.plan.target} target (its {lp.bits}-bit kernels read a float "
                         "input and round it per block as they run)")
    return LayerReport(
        node=t.node, op=t.op, graph=t.graph or "main", bits=lp.bits, method=lp.method, params=t.params,
        groups=t.groups, sqnr_db=_num(lp.sqnr_db), sqnr_rtn_db=_num(lp.sqnr_rtn_db),
        bias_corrected=lp.bias is not None, activation=t.act if act is not None else None,
        activation_bits=bits, float_input_reason=why, note=_note(c, lp),
        branch_rank=lp.branch.rank if lp.branch else 0,
        branch_params=(lp.branch.a.size + lp.branch.b.size) if lp.branch else 0,
        sqnr_with_branch_db=_num(lp.sqnr_branch_db), hot_rows=0 if lp.hot is None else len(lp.hot.rows))


def _note(c: Conversion, lp) -> str:
    if c.placement is None or lp.target.node not in c.placement.float_outputs:
        return lp.note
    why = (f"output not rounded: it decides the answer (it reaches an output, or a Sigmoid/Softmax ahead of "
           f"one, through no other layer), so the layer runs in float under the {c.plan.target} target")
    return f"{lp.note}; {why}" if lp.note else why


def clipped_share(a, st) -> float:
    """The fraction of calibration values outside an activation's range [lo, hi]. A bin cut by an
    end counts in proportion to its part outside, except at an end that reaches the observed
    extreme: nothing lies beyond it (a floor such as a shifted ReLU's zeros sits in one bin)."""
    if st is None or not st.counts.sum() or (a.lo <= st.observed[0] and a.hi >= st.observed[1]):
        return 0.0
    left, right = st.edges[:-1], st.edges[1:]
    width = np.maximum(right - left, 1e-30)
    below = np.clip(np.minimum(right, a.lo) - left, 0, None) if a.lo > st.observed[0] else 0.0
    above = np.clip(right - np.maximum(left, a.hi), 0, None) if a.hi < st.observed[1] else 0.0
    return float(np.sum(st.counts * np.minimum((below + above) / width, 1.0)) / st.counts.sum())


HISTOGRAM_BINS = 48   # the report's histogram of each activation (over its observed values)


def histogram(st, bins: int = HISTOGRAM_BINS) -> tuple[list[int], list[float | None]]:
    """The calibration histogram cut to the bins the observed values fall in and merged into
    about `bins` bars -> (counts, [low edge, high edge])."""
    if st is None or not st.counts.sum():
        return [], [None, None]
    edges, counts = st.edges, st.counts
    used = np.nonzero(counts)[0]
    first, last = int(used[0]), int(used[-1]) + 1
    parts = np.array_split(counts[first:last], min(bins, last - first))
    return [int(p.sum()) for p in parts], [_num(edges[first]), _num(edges[last])]


def _activation(name: str, a, st) -> ActReport:
    obs = st.observed if st is not None else (None, None)
    clipped = clipped_share(a, st) if st is not None and st.counts.sum() else None
    counts, span = histogram(st)
    return ActReport(tensor=name, method=a.method, bits=a.bits, signed=a.signed,
                     range=[_num(a.lo), _num(a.hi)], observed=[_num(obs[0]), _num(obs[1])],
                     clipped_fraction=clipped, scale=float(a.scale), zero_point=int(a.zero_point),
                     histogram=counts, histogram_range=span)


def _unwritten(c: Conversion) -> set[str]:
    """Main-graph activations the emitted model has no Q/DQ parameters for: a tensor that only
    weight-only layers read (a float input: generic's Gemm/MatMul, ort-cpu's MatMulNBits)."""
    if c.qmodel is None:
        return set()
    inner = {lp.target.act for lp in c.plan.layers if lp.target.graph}
    written = {t.name for t in c.qmodel.graph.initializer if t.name.endswith("/act_scale")}
    return {a for a in c.plan.acts if a not in inner and f"{a}/act_scale" not in written}


def build_report(c: Conversion) -> Report:
    r = Report(model=c.name, config=c.cfg.to_dict(), prepare=dict(c.prep_info))
    r.quantized = [_layer(c, lp) for lp in c.plan.layers]
    r.skipped = [SkippedReport(s.node, s.op, s.reason) for s in c.skipped]
    unrounded = _unwritten(c)
    r.activations = [_activation(n, a, c.stats.acts.get(n)) for n, a in sorted(c.plan.acts.items())
                     if n not in unrounded]
    r.size_before, r.size_after = model_bytes(c.source), model_bytes(c.qmodel)
    r.params = sum(t.params for t in c.targets)
    r.calib_samples, r.holdout_samples = len(c.calib), len(c.held)
    r.seconds = {k: round(v, 3) for k, v in c.seconds.items()}
    r.fidelity = c.fidelity
    r.session_options = dict(c.session_options)
    r.warnings = list(c.warnings)
    r.opset_before, r.opset_after = c.src_opset, opset_of(c.qmodel)
    r.branches = c.plan.branch_summary
    if r.branches is not None and r.branches.layers_with_branch:
        # factor codes, their scales and zero points, middle-activation and A-bias parameters
        r.branches.bytes = initializer_bytes(c.qmodel, BRANCH_SCOPE)
    r.mixed, r.search, r.ranges, r.protect, r.rounding = c.mixed, c.search, c.ranges, c.protect, c.rounding
    r.wide = c.wide
    r.smoothing = c.smoothing
    r.rotated = sorted(c.rotated)
    r.shared_weights = c.shared_weights
    if c.prepared is not None:
        done = {t.node for t in c.targets} | {s.node for s in c.skipped}
        r.float_ops = [SkippedReport(*f) for f in float_nodes(c.prepared, done, set(c.plan.acts), c.cfg.rules)]
    return r


def _schema_of(tp, defs: dict) -> dict:
    """The JSON Schema of one annotated type (dataclasses become $defs)."""
    import dataclasses
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a, defs) for a in args]}
    if tp is type(None):
        return {"type": "null"}
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}
            hints = typing.get_type_hints(tp)
            doc = (tp.__doc__ or "").strip().split("\n")[0]
            defs[tp.__name__] = {"type": "object", "description": "" if doc.startswith(tp.__name__ + "(") else doc,
                                 "properties": {f.name: _schema_of(hints[f.name], defs) for f in dataclasses.fields(tp)},
                                 "required": [f.name for f in dataclasses.fields(tp)]}
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin in (list, tuple):
        return {"type": "array", "items": _schema_of(args[0], defs) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1], defs) if len(args) > 1 else {}}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]} if tp is not float else {"type": ["number", "null"]}   # NaN/inf are written as null
    return {}                                                                             # object: anything


def report_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the report's JSON form, derived from the dataclasses, so
    it cannot drift from what is written; docs/report.schema.json is this, for REPORT_SCHEMA."""
    from .types import REPORT_SCHEMA
    defs: dict = {}
    root = _schema_of(Report, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": REPORT_SCHEMA,
            "title": "onnxq conversion report", **root, "$defs": defs}
