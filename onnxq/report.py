"""The conversion report: what was quantized, what stayed float and why, sizes, fidelity."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .graph.io import opset_of
from .graph.walk import initializer_bytes
from .types import Report

if TYPE_CHECKING:
    from .api import Conversion

BRANCH_SCOPE = "/residual/"    # the emitted branch nodes and initializers live under <node>/residual/


def _num(x):
    if x is None:
        return None
    return None if (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def build_report(c: "Conversion") -> Report:
    cfg, plan, stats = c.cfg, c.plan, c.stats
    r = Report(model=c.name, config=cfg.to_dict())
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
    r.skipped = [{"node": s.node, "op": s.op, "reason": s.reason} for s in c.skipped]
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
    r.size_before, r.size_after = c.source.ByteSize(), c.qmodel.ByteSize()
    r.params = sum(t.params for t in c.targets)
    r.calib_samples, r.holdout_samples = len(c.calib), len(c.held)
    r.seconds = {k: round(v, 3) for k, v in c.seconds.items()}
    r.fidelity = c.fidelity
    r.warnings = list(c.warnings)
    r.opset_before, r.opset_after = c.src_opset, opset_of(c.qmodel)
    r.config["prepare"] = c.prep_info
    r.branches = dict(plan.branch_summary)
    if r.branches.get("layers_with_branch"):
        # factor codes, their scales and zero points, middle-activation and A-bias parameters
        r.branches["bytes"] = initializer_bytes(c.qmodel, BRANCH_SCOPE)
    return r
