"""The conversion report: what was quantized, what stayed float and why, sizes, fidelity."""

from __future__ import annotations

import math

import onnx

from .config import ConvertConfig
from .graph.io import opset_of
from .graph.walk import graphs
from .types import Plan, Report, Skipped, Stats, Target


def _num(x):
    if x is None:
        return None
    return None if (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def build_report(name: str, cfg: ConvertConfig, plan: Plan, targets: list[Target],
                 skipped: list[Skipped], stats: Stats, source: onnx.ModelProto,
                 qmodel: onnx.ModelProto, fid: dict, secs: dict, warnings: list[str],
                 prep: dict, src_opset: int, n_cal: int, n_held: int) -> Report:
    r = Report(model=name, config=cfg.to_dict())
    for lp in plan.layers:
        t = lp.target
        act = plan.acts.get(t.act) if t.act else None
        if t.act is None and t.graph:
            act_note = "float (inside a Loop/Scan body, which calibration cannot observe: weight-only)"
        elif t.act is None:
            act_note = "float (activation type unknown or not float32)"
        elif act is None:
            act_note = ("float" if not cfg.quantize_acts
                        else "float (never reached by the calibration data: weight-only)")
        else:
            act_note = f"{'int' if act.signed else 'uint'}{act.bits} [{act.lo:.4g}, {act.hi:.4g}]"
        r.quantized.append({
            "node": t.node, "op": t.op, "graph": t.graph or "main", "bits": lp.bits,
            "method": lp.method, "params": t.params, "groups": t.groups,
            "sqnr_db": _num(lp.sqnr_db), "sqnr_rtn_db": _num(lp.sqnr_rtn_db),
            "bias_corrected": lp.bias is not None, "activation": act_note, "note": lp.note,
            "branch_rank": lp.branch.rank if lp.branch else 0,
            "branch_params": (lp.branch.a.size + lp.branch.b.size) if lp.branch else 0,
            "sqnr_with_branch_db": _num(lp.sqnr_branch_db),
        })
    r.skipped = [{"node": s.node, "op": s.op, "reason": s.reason} for s in skipped]
    for a_name, a in sorted(plan.acts.items()):
        st = stats.acts.get(a_name)
        obs = st.observed if st is not None else (None, None)
        clipped = None
        if st is not None and st.counts.sum():
            centers = 0.5 * (st.edges[:-1] + st.edges[1:])
            clipped = float(st.counts[(centers < a.lo) | (centers > a.hi)].sum() / st.counts.sum())
        r.activations.append({"tensor": a_name, "method": a.method, "bits": a.bits,
                              "signed": a.signed, "range": [_num(a.lo), _num(a.hi)],
                              "observed": [_num(obs[0]), _num(obs[1])], "clipped_fraction": clipped,
                              "scale": a.scale, "zero_point": a.zero_point})
    r.size_before, r.size_after = source.ByteSize(), qmodel.ByteSize()
    r.params = sum(t.params for t in targets)
    r.calib_samples, r.holdout_samples = n_cal, n_held
    r.seconds = {k: round(v, 3) for k, v in secs.items()}
    r.fidelity = fid
    r.warnings = list(warnings)
    r.opset_before, r.opset_after = src_opset, opset_of(qmodel)
    r.config["prepare"] = prep
    r.branches = dict(plan.branch_summary)
    if r.branches.get("layers_with_branch"):
        r.branches["bytes"] = branch_bytes(qmodel)
    return r


def branch_bytes(qmodel: onnx.ModelProto) -> int:
    """Bytes the emitted branches add to the file: every initializer under a `<node>/residual/`
    name (factor codes, their scales and zero points, middle-activation and A-bias parameters),
    in every graph."""
    return sum(t.ByteSize() for _, g in graphs(qmodel) for t in g.initializer if "/residual/" in t.name)
