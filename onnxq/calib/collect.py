"""One streamed onnxruntime pass over an augmented graph: every activation that feeds a
quantized layer becomes a graph output, and each sample's values go straight into the
reducers (histograms, input second moments); nothing is kept per sample."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..algos.qmath import act_qrange, fake_quant
from ..errors import CalibrationError
from ..graph.inline import inline_ifs, main_graph_names, open_ifs
from ..graph.variants import changed_tensors, cut, pruned, signature
from ..graph.walk import node_reads
from ..runtime import give_back_memory, owned, session
from ..types import ActQuant, ActStats, Feed, LayerStats, PairedStats, Progress, Stats, Target
from .collectors import CrossMoment, RangeHistogram, SecondMoment, im2col_cols, im2col_sums
from .data import MAX_ABS

if TYPE_CHECKING:
    import onnx


class Router:
    """Per sample, the model with the If branches that sample takes inlined (graph/inline.py),
    as an onnxruntime session returning the wanted activations present in it."""

    def __init__(self, model: "onnx.ModelProto", wanted: Sequence[str]) -> None:
        self.model, self.wanted = model, list(wanted)
        self.cache: dict[tuple, tuple] = {}

    def _entry(self, choose: dict[str, bool]):
        key = tuple(sorted(choose.items()))
        if key not in self.cache:
            m = inline_ifs(self.model, choose) if choose else self.model
            ifs = [n for n in open_ifs(m)]
            present = main_graph_names(m)
            acts = [a for a in self.wanted if a in present]
            conds = [n.input[0] for n in ifs]
            outs = list(dict.fromkeys(conds + acts))
            self.cache[key] = (session(pruned(m, outs)), [n.name for n in ifs], conds, acts, outs)
        return self.cache[key]

    def run_sample(self, feed: Feed, i: int) -> dict[str, np.ndarray]:
        """run() on calibration sample i, an onnxruntime failure said in one line."""
        try:
            return self.run(feed)
        except Exception as e:
            raise _sample_failed(i, e) from None

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        choose: dict[str, bool] = {}
        while True:
            sess, if_names, conds, acts, outs = self._entry(choose)
            values = dict(zip(outs, sess.run(outs, feed)))
            if not if_names:
                return {a: values[a] for a in acts}
            choose.update({n: bool(np.asarray(values[c]).reshape(-1)[0]) for n, c in zip(if_names, conds)})


def _sample_failed(i: int, e: Exception) -> CalibrationError:
    return CalibrationError(f"calibration sample {i} failed in onnxruntime: {str(e).splitlines()[0][:200]}")


# what one Frontier keeps at most over all samples, feeds aside
FRONTIER_BYTES = 1 << 30
# rows that readers of one shared weight gather before they enter its pooled H in one product
POOL_BATCH = 512


class Frontier:
    """A model run again and again on the same samples as it changes (sequential mode's partly
    quantized model, one more stage quantized each time): each run computes only the nodes whose
    values the tensors kept from earlier runs cannot give, so a sequence of stages costs about one
    pass over the model instead of one per stage. Main graphs without If nodes only (Router
    inlines those per sample)."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.values = [dict(f) for f in feeds]                # per sample: tensor -> value
        self.feeds = set(self.values[0]) if self.values else set()
        self.model: "onnx.ModelProto | None" = None
        self.signature: tuple[set[bytes], dict[str, bytes]] = (set(), {})

    @staticmethod
    def fits(model: "onnx.ModelProto") -> bool:
        return not open_ifs(model)

    def run(self, model: "onnx.ModelProto", wanted: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Per sample, the wanted tensors present in the model's main graph."""
        if self.model is not model:
            now = signature(model)
            if self.model is not None:
                stale = changed_tensors(self.signature, model, now)
                for v in self.values:
                    for k in stale & v.keys():
                        del v[k]
            self.model, self.signature = model, now
        present = main_graph_names(model)
        wanted = [w for w in wanted if w in present]
        first = self.values[0] if self.values else {}
        sub = cut(model, wanted, {k: v.dtype for k, v in first.items()})
        if sub.graph.output:
            sess = session(sub)
            outs = [o.name for o in sub.graph.output]
            ins = [i.name for i in sub.graph.input]
            for i, v in enumerate(self.values):
                try:
                    v.update(zip(outs, owned(sess.run(outs, {k: v[k] for k in ins}))))
                except Exception as e:
                    raise _sample_failed(i, e) from None
        out = [{w: v[w] for w in wanted} for v in self.values]
        self._forget(model)
        return out

    def _forget(self, model: "onnx.ModelProto") -> None:
        """Keep only the tensors a node not yet computed reads (a dropped one is computed again
        if a later stage needs it)."""
        if not self.values:
            return
        have = self.values[0].keys()
        live = set(self.feeds)
        for node in model.graph.node:
            if not all(o in have for o in node.output if o):
                live |= node_reads(node)
        size: dict[str, int] = {}
        for v in self.values:
            for k in [k for k in v if k not in live]:
                del v[k]
            for k in v.keys() - self.feeds:
                size[k] = size.get(k, 0) + v[k].nbytes
        # bounded memory: the largest kept tensors go first (computed again when needed)
        over = sum(size.values()) - FRONTIER_BYTES
        for k in sorted(size, key=size.get, reverse=True):
            if over <= 0:
                break
            over -= size[k]
            for v in self.values:
                v.pop(k, None)


def layer_cols(x: np.ndarray, t: Target, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `rows` sampled input rows of layer t from its activation x, as columns. -> [G, K, S]."""
    if t.op == "Conv":
        return im2col_cols(x, t.geo, rows, rng)
    if t.op == "ConvTranspose":         # one row per input pixel; the planner spreads it over the taps
        x = np.moveaxis(x, 1, -1)
    elif t.op == "MatMul" and t.weight_layout == "rows":                # Y = W @ X reads X's columns
        x = np.swapaxes(x, -1, -2)
    flat = x.reshape(-1, _k(t))
    if flat.shape[0] > rows:
        flat = flat[np.sort(rng.choice(flat.shape[0], size=rows, replace=False))]
    return np.ascontiguousarray(flat.T)[None]


def layer_sums(x: np.ndarray, t: Target, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The float64 sum of the rows layer_cols would sample (the same draws, the same values),
    and how many: all that a mean needs."""
    if t.op == "Conv":
        return im2col_sums(x, t.geo, rows, rng)
    c = layer_cols(x, t, rows, rng)
    return c.sum(axis=2, dtype=np.float64), c.shape[2]


def wants_hessian(t: Target) -> bool:
    return t.act is not None and (t.op in ("Conv", "Gemm", "MatMul")
                                  or (t.op == "ConvTranspose" and t.groups == 1))


def collect(model: "onnx.ModelProto", targets: Sequence[Target], loaders: Sequence[Callable[[], Feed]],
            *, hessians: "bool | set[str]", rows_per_sample: int, seed: int,
            progress: Progress | None = None, extra: Sequence[str] = ()) -> Stats:
    """Range statistics of every target's activation (and of the `extra` tensors), E[x] per
    layer and, with `hessians` (True, or the set of layers that want it), H = E[x x^T] per layer.
    The means are the same whichever layers gather H (the same rows are drawn)."""
    tables = table_ids(model, targets)
    acts = sorted({t.act for t in targets if t.act} | set(extra) | set(tables))
    if not acts:
        return Stats(samples=len(loaders))
    reads = {node: np.zeros(rows, np.int64) for readers in tables.values() for node, rows in readers}
    router = Router(model, acts)
    hist = {a: RangeHistogram() for a in acts}
    moments, pools = _moments(targets, hessians)
    by_act: dict[str, list[Target]] = {}
    for t in targets:
        if t.node in moments:
            by_act.setdefault(t.act, []).append(t)
    rng = np.random.default_rng(seed)
    values: dict[str, np.ndarray] = {}
    for i, load in enumerate(loaders):
        values = router.run_sample(load(), i)
        for name, v in values.items():
            for node, rows in tables.get(name, ()):
                count_reads(reads[node], v)
            if v.dtype.kind != "f":
                continue
            v = np.asarray(v, dtype=np.float32)
            lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)    # NaN propagates
            if not (np.isfinite(lo) and np.isfinite(hi)) or max(-lo, hi) > MAX_ABS:
                raise CalibrationError(f"the model computes NaN, Inf or values beyond {MAX_ABS:g} at '{name}' on "
                                       f"calibration sample {i}: check the model and the data's scaling")
            hist[name].update(v, (lo, hi))
            for t in by_act.get(name, ()):
                if t.node in pools:
                    cols = layer_cols(v, t, rows_per_sample, rng)
                    pools[t.node].update(cols)
                    moments[t.node].update(cols)
                elif moments[t.node].h is not None:
                    moments[t.node].update(layer_cols(v, t, rows_per_sample, rng))
                else:
                    moments[t.node].add_sums(*layer_sums(v, t, rows_per_sample, rng))
        if progress:
            progress("calibrate", i + 1, len(loaders))
    del router, values                    # the sessions leave memory before the statistics are assembled
    give_back_memory()                    # and the heap they and the samples' temporaries grew
    st = Stats(samples=len(loaders))
    for a, h in hist.items():
        if h.counts.sum():
            st.acts[a] = ActStats(h.counts, h.edges, h.observed)
    for node, r in reads.items():
        st.layers[node] = LayerStats(None, np.zeros((1, 0)), int(r.sum()), reads=r)
    st.layers.update(_layer_stats(moments, pools))
    return st


def _layer_stats(moments: dict[str, SecondMoment], pools: dict[str, SecondMoment]) -> dict[str, LayerStats]:
    """Each layer's statistics from its accumulators (readers of one weight: their pooled H)."""
    out: dict[str, LayerStats] = {}
    made: dict[int, LayerStats] = {}
    for node, m in moments.items():
        if not m.n:
            continue
        p = pools.get(node)
        if p is None:
            out[node] = LayerStats(m.hand_over(), m.mean, m.n)
            continue
        if id(p) not in made:
            made[id(p)] = LayerStats(p.hand_over(), p.mean, p.n)
        out[node] = LayerStats(made[id(p)].hessian, m.mean, m.n, pooled=made[id(p)])
    return out


def table_ids(model: "onnx.ModelProto", targets: Sequence[Target]) -> dict[str, list[tuple[str, int]]]:
    """The index tensors of the main graph's embedding lookups whose table no other layer reads:
    ids tensor -> [(the lookup's node, the table's rows)]."""
    weights = Counter((t.graph, t.weight) for t in targets)
    lookups = {t.node: t for t in targets if t.op == "Gather" and not t.graph and weights[("", t.weight)] == 1}
    out: dict[str, list[tuple[str, int]]] = {}
    for n in model.graph.node:
        if n.name in lookups:
            out.setdefault(n.input[1], []).append((n.name, lookups[n.name].shape[0]))
    return out


def count_reads(counts: np.ndarray, ids: np.ndarray) -> None:
    """Adds one sample's lookups to a table's read counts (negative ids count from the end, as
    Gather reads them; ids outside the table are not counted)."""
    v = np.asarray(ids).reshape(-1)
    if v.dtype.kind not in "iu":
        return
    v = v.astype(np.int64)
    v = np.where(v < 0, v + len(counts), v)
    v = v[(v >= 0) & (v < len(counts))]
    counts += np.bincount(v, minlength=len(counts))


def _moments(targets: Sequence[Target], hessians: "bool | set[str]"
             ) -> tuple[dict[str, SecondMoment], dict[str, SecondMoment]]:
    """(an accumulator per layer that wants statistics, the pooled H accumulator of each layer
    that shares its weight). In one pass over all layers, readers of one weight on equal terms
    share one H (one, not one per unrolled step) and keep their own means."""
    second = (lambda t: hessians) if isinstance(hessians, bool) else (lambda t: t.node in hessians)
    wanting = [t for t in targets if wants_hessian(t)]
    groups: dict[tuple, list[Target]] = {}
    for t in wanting:
        groups.setdefault(t.weight_terms, []).append(t)
    pools: dict[str, SecondMoment] = {}
    for group in groups.values():
        if len(group) > 1 and all(second(t) for t in group):
            p = SecondMoment(group[0].row_groups, _k(group[0]), True, batch=POOL_BATCH)
            pools.update({t.node: p for t in group})
    moments = {t.node: SecondMoment(t.row_groups, _k(t), second(t) and t.node not in pools) for t in wanting}
    return moments, pools


def hessian_chunks(targets: Sequence[Target], budget_bytes: float) -> list[set[str]]:
    """The layers that gather H, in groups whose float64 H fit `budget_bytes` together (one layer
    at least per group): one calibration pass per group keeps a large model's statistics small."""
    chunks: list[set[str]] = []
    used = budget_bytes + 1
    for t in targets:
        if not wants_hessian(t):
            continue
        size = 8.0 * t.row_groups * _k(t) ** 2
        if used + size > budget_bytes:
            chunks.append(set())
            used = 0.0
        chunks[-1].add(t.node)
        used += size
    return chunks


def _k(t: Target) -> int:
    if t.op == "Conv":
        return int(np.prod(t.shape[1:]))
    if t.op == "ConvTranspose":
        return t.shape[0]
    return t.shape[1] if t.weight_layout == "rows" else t.shape[0]


def collect_paired(reference: "onnx.ModelProto", partial: "onnx.ModelProto", targets: Sequence[Target],
                   loaders: Sequence[Callable[[], Feed]], acts: dict[str, ActQuant], *,
                   rows_per_sample: int, seed: int,
                   frontiers: "tuple[Frontier, Frontier] | None" = None) -> dict[str, PairedStats]:
    """Run the FP32 and the partly quantized model on the same samples and pair each target's
    input rows: x from FP32, x^ = the partial model's input after this layer's own activation
    QDQ (applied here in numpy). Main-graph targets only. `frontiers` (FP32, partial) keep what
    earlier stages computed, for a partial model that changes stage by stage on the same loaders."""
    # a ConvTranspose's statistics are per input pixel, not per unfolded patch: it keeps the
    # FP32 ones (plan_layer)
    targets = [t for t in targets if wants_hessian(t) and t.op != "ConvTranspose" and not t.graph]
    wanted = sorted({t.act for t in targets})
    if not targets:
        return {}
    # two halves of the samples (alternating), so a compensation fitted on one is judged on the other
    moments = {t.node: (CrossMoment(t.row_groups, _k(t)), CrossMoment(t.row_groups, _k(t))) for t in targets}
    rng = np.random.default_rng(seed)
    for i, (xf, xq) in enumerate(_paired_runs(reference, partial, wanted, loaders, frontiers)):
        for t in targets:
            a, b = xf.get(t.act), xq.get(t.act)
            if a is None or b is None or a.shape != b.shape or a.dtype.kind != "f":
                continue
            q = acts.get(t.act)
            if q is not None:
                lo, hi = act_qrange(q.bits, q.signed)
                b = fake_quant(b, q.scale, q.zero_point, lo, hi).astype(np.float32)
            pick = int(rng.integers(2**31))           # the same positions in both
            moments[t.node][i % 2].update(layer_cols(a, t, rows_per_sample, np.random.default_rng(pick)),
                                          layer_cols(b, t, rows_per_sample, np.random.default_rng(pick)))
    out = {}
    for node, (ma, mb) in moments.items():
        if ma.n and mb.n:
            out[node] = PairedStats.merged(_paired(ma), _paired(mb))
        elif ma.n:
            out[node] = _paired(ma)
    return out


def _paired_runs(reference: "onnx.ModelProto", partial: "onnx.ModelProto", wanted: Sequence[str],
                 loaders: Sequence[Callable[[], Feed]], frontiers: "tuple[Frontier, Frontier] | None"):
    """Per sample, the wanted tensors of the FP32 and of the partial model (one run when they are
    the same model)."""
    if frontiers is not None:
        xf = frontiers[0].run(reference, wanted)
        yield from zip(xf, xf if partial is reference else frontiers[1].run(partial, wanted))
        return
    ref = Router(reference, wanted)
    part = ref if partial is reference else Router(partial, wanted)
    for load in loaders:
        feed = load()
        xf = ref.run(feed)
        yield xf, (xf if part is ref else part.run(feed))


def _paired(m: CrossMoment) -> PairedStats:
    return PairedStats(LayerStats(m.hq.hessian, m.hq.mean, m.n), m.c / m.n, m.s_fp / m.n)
