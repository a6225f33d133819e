"""Fidelity of a quantized model against its FP32 source, through onnxruntime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .algos.metrics import compare_outputs
from .errors import VerificationError
from .types import Fidelity, OutputMetrics
from .runtime import give_back_memory, session

if TYPE_CHECKING:
    import onnx


def fidelity(ref_model: "onnx.ModelProto | bytes | str", cand_model: "onnx.ModelProto | bytes | str",
             loaders: Sequence[Callable[[], dict]], labels: np.ndarray | None = None,
             options: dict[str, str] | None = None) -> Fidelity:
    """Per-output metrics plus a summary (worst cosine, first classifier output's agreement), the
    candidate run with `options` (its target's session options: the way the target runs it).
    One session at a time: a large model's two weight sets are never in memory together."""
    ref_s = session(ref_model)
    names = [o.name for o in ref_s.get_outputs()]
    ref_out: dict[str, list] = {n: [] for n in names}
    cand_out: dict[str, list] = {n: [] for n in names}
    for load in loaders:
        for n, a in zip(names, ref_s.run(names, load())):
            ref_out[n].append(np.asarray(a))
    del ref_s
    give_back_memory()
    cand_s = session(cand_model, options=options)
    for load in loaders:
        try:
            res = cand_s.run(names, load())
        except Exception as e:
            raise VerificationError(f"the quantized model failed to run in onnxruntime: "
                                    f"{str(e).splitlines()[0][:200]}") from None
        for n, a in zip(names, res):
            cand_out[n].append(np.asarray(a))
    per = {n: OutputMetrics(**compare_outputs(ref_out[n], cand_out[n])) for n in names
           if all(a.dtype.kind == "f" for a in ref_out[n])}
    fid = Fidelity(samples=len(loaders), outputs=per)
    # top-1 agreement is the model's first output's: other outputs (states, boxes) are no answer
    cls_out = names[0] if names and names[0] in per and per[names[0]].top1_agreement is not None else None
    if labels is not None and cls_out is not None:
        pred_r = np.concatenate([a.reshape(-1, a.shape[-1]).argmax(-1) for a in ref_out[cls_out]])
        pred_c = np.concatenate([a.reshape(-1, a.shape[-1]).argmax(-1) for a in cand_out[cls_out]])
        if pred_r.shape == labels.shape:
            fid.accuracy_reference = float(np.mean(pred_r == labels))
            fid.accuracy_candidate = float(np.mean(pred_c == labels))
    meaningful = [v for v in per.values() if not v.degenerate]
    if meaningful:
        fid.cosine = min(v.cosine for v in meaningful)
        fid.sqnr_db = min(v.sqnr_db for v in meaningful)
        if cls_out is not None:
            fid.top1_agreement, fid.kl = per[cls_out].top1_agreement, per[cls_out].kl
    return fid
