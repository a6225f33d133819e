"""Activations kept at 16 bits where 8 bits cost the network most (--protect-acts).

At W8A8 the activations, not the weights, carry most of the error on every family measured
(docs/experiments/wide-activations.md: 16-bit activations everywhere lift PP-OCR rec 0.81 -> 0.94
of its strings, MiniLM 22.8 -> 28.2 dB), and a few tensors carry most of that: a GELU output
with outlier channels, a ReLU6 output with a point mass at 6 read by a depthwise conv, a
detector's score path. Each quantized activation's harm is what its rounding alone adds to the
network's loss (every other activation unrounded, the weights as emitted): one feed of a session
in which any activation can be left unrounded (graph/variants.with_act_masks). Measured the
other way round (the loss it takes away when it alone is unrounded, every other one rounded),
the harms did not add up: on PP-OCR rec a single flipped character dominates the loss of a few
samples, and unrounding any one of a dozen tensors removed it, so that ranking picked tensors
whose set changed little (held-out SQNR with its first 8 or 16 unrounded: 21.1 and 21.0 dB;
ranked by the harm alone, the first 8 or 16: 23.4 and 25.6 dB; docs/experiments/wide-activations.md). The most harmful ones, at most a fraction of
the quantized tensors, move to 16 bits (int16 Q/DQ, range min-max: 16 bits have resolution to
spare, and clipping the tail is the harm being removed). Calibration samples the harm was not
measured on choose how many (all of them, half, a quarter, ...), and keep none unless the
network is closer to FP32 with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..algos.matrix import AXIS
from ..algos.metrics import divergence, expected
from ..config import ConvertConfig
from ..graph.rewrite import apply_plan
from ..graph.large import is_large
from ..graph.variants import mask_name, with_act_masks
from ..plan.acts import act_quant, method_range
from ..plan.biases import code_biases
from ..runtime import session
from ..types import ActQuant, ActStats, Feed, Plan, Progress, Target, WideSummary
from .lapq import batched, searched
from .probe import TAILS, Tail, keep_tails, latest_tail

if TYPE_CHECKING:
    import onnx

WIDE_BITS = 16
MIN_SHARE = 0.02      # a tensor whose harm is under this share of the network loss stays at 8 bits


class MaskSession:
    """The emitted model with every candidate activation's rounding switchable, and the network
    loss on a set of samples. With `tails`, a trial in which only tensors late in the graph are
    rounded runs from the latest cut before them, fed the unrounded network's tensors at that cut
    (cached for the samples of `cache`): nothing before it differs, so the loss is the same."""

    def __init__(self, prepared: "onnx.ModelProto", plan: Plan, names: Sequence[str],
                 cache: Sequence[Feed] = (), tails: int = 0):
        self.names = list(names)
        # a tensor tied to a candidate (data movement keeps its input's scale, graph/placement.py)
        # takes the candidate's Q/DQ, 16 bits included: it is rounded and unrounded with it
        chosen = set(self.names)
        self.followers = {t: s for t, s in plan.tied.items() if s in chosen and t in plan.acts}
        model = with_act_masks(apply_plan(prepared, code_biases(plan), masks=True),
                               self.names + sorted(self.followers))
        self.sess = session(model)
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.inputs = {i.name for i in self.sess.get_inputs()}
        self.tails: list[Tail] = []
        self.cached = list(cache)
        where = {n.name: i for i, n in enumerate(model.graph.node)}
        self.first = {a: where[f"{a}/mask_sub"] for a in self.names if f"{a}/mask_sub" in where}
        # a candidate the emitted model does not round (no switch: ort-cpu's MatMulNBits inputs) is no candidate
        self.names = [a for a in self.names if a in self.first]
        self.followers = {t: s for t, s in self.followers.items() if s in self.first}
        if tails > 1 and self.cached and not is_large(model):
            unrounded = self._masks(self.names)
            self.tails = keep_tails(model, self.first.values(), tails, [{**f, **unrounded} for f in self.cached],
                                    all_outputs=True)

    def _masks(self, unrounded) -> dict[str, np.ndarray]:
        out = {mask_name(a): np.array(0.0 if a in unrounded else 1.0, np.float32) for a in self.names}
        out.update({mask_name(t): out[mask_name(s)] for t, s in self.followers.items()})
        return {k: v for k, v in out.items() if k in self.inputs}

    def _tail_for(self, feeds, rounded) -> Tail | None:
        """The latest kept tail before every rounded tensor, when `feeds` are the cached samples."""
        if not self.tails or feeds is not self.cached:
            return None
        return latest_tail(self.tails, [self.first[a] for a in rounded])

    def loss(self, feeds, reference, unrounded=frozenset()) -> float:
        masks = self._masks(unrounded)
        t = self._tail_for(feeds, [a for a in self.names if a not in unrounded])
        if t is None:
            outs = [self.sess.run(self.outputs, {**f, **masks}) for f in feeds]
        else:
            outs = [t.sess.run(self.outputs, {**v, **{k: x for k, x in {**f, **masks}.items() if k in t.inputs}})
                    for f, v in zip(feeds, t.cached)]
        return float(np.mean([divergence(r, o) for o, r in zip(outs, reference)]))


def candidates(plan: Plan, cfg: ConvertConfig) -> list[str]:
    """Main-graph activations at the conversion's activation bits (lapq.searched: none that only
    weight-only layers read)."""
    return [a for a in searched(plan) if plan.acts[a].bits == cfg.act_bits]


def layer_macs(plan: Plan, stats: Mapping[str, ActStats]) -> dict[str, float]:
    """Each main-graph layer's multiply-adds over the calibration samples, from the number of
    values its input held (padding and borders aside)."""
    return target_macs([lp.target for lp in plan.layers], stats)


def target_macs(targets: Sequence[Target], stats: Mapping[str, ActStats]) -> dict[str, float]:
    """layer_macs of targets."""
    out = {}
    for t in targets:
        st = stats.get(t.act) if t.act and not t.graph else None
        if st is not None:
            out[t.node] = float(st.counts.sum()) * _per_input(t)
    return out


def _per_input(t) -> float:
    """Multiply-adds per input value of a layer (0 for a table lookup)."""
    if t.op == "Conv":
        strides = float(np.prod(t.geo.strides)) if t.geo else 1.0
        return t.params / (t.shape[1] * t.groups) / strides
    if t.op == "ConvTranspose":
        return t.params / t.shape[0]
    if t.op in ("Gemm", "MatMul"):
        return float(t.shape[AXIS[t.weight_layout]])
    return 0.0


def unfused_share(plan: Plan, macs: Mapping[str, float], units: Mapping[str, str]) -> Callable[[Sequence[str]], float]:
    """The share of the multiply-adds a set of tensors takes off integer kernels at 16 bits: the
    layers reading them or a tensor tied to them, and the unit making one."""
    readers: dict[str, set[str]] = {}          # a tensor tied to another counts as that one (it gets its bits)
    for lp in plan.layers:
        if lp.target.act and not lp.target.graph:
            readers.setdefault(plan.tied.get(lp.target.act, lp.target.act), set()).add(lp.target.node)
    total = sum(macs.values()) or 1.0

    def taken(chosen: Sequence[str]) -> float:
        nodes = set().union(*(readers.get(a, set()) | ({units[a]} if a in units else set()) for a in chosen))
        return sum(macs.get(n, 0.0) for n in nodes) / total
    return taken


def affordable(ranked: Sequence[str], taken: Callable[[Sequence[str]], float], share: float) -> list[str]:
    """The tensors of `ranked`, in order, that fit together while what they take (`taken`,
    unfused_share's) stays at most `share`."""
    out: list[str] = []
    for a in ranked:
        if taken(out + [a]) <= share:
            out.append(a)
    return out


def affordable_alone(names: Sequence[str], taken: Callable[[Sequence[str]], float], share: float) -> list[str]:
    """The tensors of `names` that fit the budget on their own. The layers a set of tensors takes
    off integer kernels include each member's, so a tensor over the budget alone is in no set
    `affordable` keeps: its harm need not be measured (a probe each, a whole network run on every
    fitting sample; 32 of an 800 x 608 detector's 185 tensors)."""
    return [a for a in names if taken([a]) <= share]


def prefixes(ranked: Sequence[str], budget: int) -> list[list[str]]:
    """The first `budget` tensors of `ranked`, half as many, a quarter, ... down to one: the
    sets the check chooses among."""
    ranked = list(ranked[:budget])
    sizes = []
    k = len(ranked)
    while k >= 1:
        sizes.append(k)
        k //= 2
    return [ranked[:k] for k in sizes]


def checked(ms: MaskSession, sets: Sequence[Sequence[str]], check, summary: WideSummary) -> list[str] | None:
    """The check: the loss on samples the harm was not measured on of each of `sets` (a few sizes
    of the most harmful set); the best of them, if it beats every activation at 8 bits, else None.
    `check`: (batched feeds, reference outputs)."""
    summary.check_before = ms.loss(*check)
    losses = [ms.loss(*check, frozenset(c)) for c in sets]
    i = int(np.argmin(losses))
    summary.check_after = losses[i]
    return list(sets[i]) if summary.check_after < summary.check_before else None


def widen_acts(prepared: "onnx.ModelProto", plan: Plan, stats: Mapping[str, ActStats],
               fit: Sequence[Feed], check: Sequence[Feed], cfg: ConvertConfig,
               progress: Progress | None = None, units: Mapping[str, str] | None = None, tails: int = TAILS
               ) -> tuple[dict[str, ActQuant], WideSummary]:
    """`plan.acts` with the most harmful activations at 16 bits, and what was measured; under a
    target whose integer kernels take 8 bits only, as many as the multiply-add budget lets
    (`units`: a unit layer's output tensor -> the layer)."""
    names = candidates(plan, cfg)
    budget = int(np.floor(cfg.protect_acts * len(names)))
    summary = WideSummary(tensors=len(names), budget=budget, harm={}, widened=[])
    if not names or budget < 1 or not fit:
        return dict(plan.acts), summary
    ref = session(prepared)
    fit_ref, check_ref = ([ref.run(None, f) for f in fs] for fs in (fit, check))
    (fit_b, fit_r), (check_b, check_r) = batched(ref, fit, fit_ref), batched(ref, check, check_ref)
    fit_r, check_r = [expected(r) for r in fit_r], [expected(r) for r in check_r]
    del ref
    ms = MaskSession(prepared, plan, names, cache=fit_b, tails=tails)
    fit_b = ms.cached
    if len(ms.names) < len(names):            # some are not rounded in the emitted model
        names = ms.names
        budget = int(np.floor(cfg.protect_acts * len(names)))
        summary.tensors, summary.budget = len(names), budget
        if not names or budget < 1:
            return dict(plan.acts), summary
    summary.loss = base = ms.loss(fit_b, fit_r)
    unrounded = frozenset(names)
    floor = ms.loss(fit_b, fit_r, unrounded)       # the weights' share of the loss
    taken = None
    probed = names
    if cfg.rules.wide_macs is not None:
        taken = unfused_share(plan, layer_macs(plan, stats), units or {})
        probed = affordable_alone(names, taken, cfg.rules.wide_macs)
        summary.over_budget = len(names) - len(probed)
    for i, a in enumerate(probed):
        summary.harm[a] = ms.loss(fit_b, fit_r, unrounded - {a}) - floor
        if progress:
            progress("protect activations", i + 1, len(probed))
    ranked = [a for a in sorted(probed, key=lambda a: (-summary.harm[a], a)) if summary.harm[a] > MIN_SHARE * base]
    if taken is not None:
        ranked = affordable(ranked, taken, cfg.rules.wide_macs)
    sets = prefixes(ranked, budget)
    if not sets:
        return dict(plan.acts), summary
    chosen = checked(ms, sets, (check_b, check_r) if check else (fit_b, fit_r), summary)
    if chosen is None:
        return dict(plan.acts), summary
    summary.widened = chosen
    summary.unfused = taken(chosen) if taken else None
    out = dict(plan.acts)
    for a in chosen:
        lo, hi = method_range(stats[a], "minmax", WIDE_BITS, True)
        out[a] = act_quant(lo, hi, WIDE_BITS, True, "minmax")
    return out, summary
