"""Plain data passed between the stages: targets, statistics, plans, reports."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import ConvertConfig

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("onnxq")

# progress callbacks: (stage, done, total)
Progress = Callable[[str, int, int], None]
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, dtype, shape with None where the dimension is dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]       # begin..., end...
    auto_pad: str               # NOTSET, SAME_UPPER, SAME_LOWER, VALID
    group: int

    def resolve_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        nd = len(self.kernel)
        if self.auto_pad in ("NOTSET", ""):
            return self.pads if self.pads else (0,) * (2 * nd)
        if self.auto_pad == "VALID":
            return (0,) * (2 * nd)
        begin, end = [], []
        for i in range(nd):
            out = -(-spatial[i] // self.strides[i])
            span = (self.kernel[i] - 1) * self.dilations[i] + 1
            total = max(0, (out - 1) * self.strides[i] + span - spatial[i])
            small, large = total // 2, total - total // 2
            begin.append(small if self.auto_pad == "SAME_UPPER" else large)
            end.append(large if self.auto_pad == "SAME_UPPER" else small)
        return tuple(begin + end)


@dataclass(frozen=True)
class Target:
    """A node with a constant weight that can be quantized."""

    node: str                 # node name (made unique when the model has none)
    op: str                   # Conv, ConvTranspose, Gemm, MatMul
    graph: str                # "" for the main graph, else the path of the subgraph
    weight: str               # weight initializer name
    act: str | None           # activation input tensor name
    bias: str | None          # bias initializer name, if any
    weight_layout: str        # how the weight reads as a matrix: see algos/matrix.py
    shape: tuple[int, ...]    # weight shape
    groups: int = 1
    geo: ConvGeometry | None = None
    fixed_bias: bool = False   # the node reads a bias input the quantizer may not replace

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.groups > 1 and self.shape[1] == 1

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def out_channels(self) -> int:
        """Output channels, the length of a bias: a ConvTranspose's weight [C, O/g, *k] holds a
        group's; a Gemm/MatMul weight [O, K] ("rows") or [K, O] ("cols")."""
        if self.op == "ConvTranspose":
            return self.shape[1] * self.groups
        return self.shape[1] if self.weight_layout == "cols" else self.shape[0]

    @property
    def weight_terms(self) -> tuple:
        """Layers with equal terms read one weight and bias the same way (an unrolled loop's
        steps, a layer applied twice): their inputs' statistics pool and the weight is coded once."""
        return (self.graph, self.weight, self.bias, self.op, self.weight_layout, self.shape, self.groups,
                repr(self.geo))

    @property
    def row_groups(self) -> int:
        """Independent blocks of the weight matrix's rows: a Conv's groups, else 1 (a grouped
        ConvTranspose has no statistics, and Gemm/MatMul have no groups)."""
        return self.groups if self.op == "Conv" else 1


@dataclass(frozen=True)
class Skipped:
    node: str
    op: str
    reason: str


@dataclass
class ActStats:
    """Range statistics of one activation tensor."""

    counts: np.ndarray
    edges: np.ndarray
    observed: tuple[float, float]


@dataclass
class LayerStats:
    """Input statistics of one layer: H = E[x x^T] per group [G, K, K] (None when only the mean
    was gathered), mean E[x] [G, K]. `pooled`: where several layers read one weight on equal terms
    (Target.weight_terms), the statistics of all their inputs together, which the weight is coded
    on once (`hessian` is then that pooled H; `mean` stays the layer's own, for its bias)."""

    hessian: np.ndarray | None
    mean: np.ndarray
    rows: int
    pooled: "LayerStats | None" = None
    reads: np.ndarray | None = None    # an embedding table's: how often calibration read each row [V]


@dataclass
class PairedStats:
    """Statistics for input-error compensation (sequential mode): the quantized model's input
    x^ (hessian = E[x^ x^T], mean = E[x^]) against the FP32 input x (cross = E[x x^T],
    fp_mean = E[x]). [G, K, K] / [G, K]. `halves`: the same from two disjoint halves of the
    samples, so a fit on one can be judged on the other."""

    quant: LayerStats
    cross: np.ndarray
    fp_mean: np.ndarray
    halves: "tuple[PairedStats, PairedStats] | None" = None

    @staticmethod
    def merged(a: "PairedStats", b: "PairedStats") -> "PairedStats":
        """The statistics of a's and b's rows together, with a and b as its halves."""
        wa, wb = a.quant.rows / (a.quant.rows + b.quant.rows), b.quant.rows / (a.quant.rows + b.quant.rows)
        mix = lambda x, y: wa * x + wb * y   # noqa: E731
        quant = LayerStats(mix(a.quant.hessian, b.quant.hessian), mix(a.quant.mean, b.quant.mean),
                           a.quant.rows + b.quant.rows)
        return PairedStats(quant, mix(a.cross, b.cross), mix(a.fp_mean, b.fp_mean), (a, b))


@dataclass
class Stats:
    acts: dict[str, ActStats] = field(default_factory=dict)
    layers: dict[str, LayerStats] = field(default_factory=dict)
    samples: int = 0
    # the smoothing the statistics were collected under: input tensor -> (alpha, scales [K],
    # error before, error after); reused as it is, so the tensors keep the names the stats know
    smoothing: dict[str, tuple[float, np.ndarray, float, float]] = field(default_factory=dict)
    # the input rotations they were collected under (graph/rotate.py): input tensor -> matrix [B, B]
    rotation: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: str) -> None:
        arrays: dict[str, np.ndarray] = {"__samples": np.array(self.samples)}
        for i, (k, r) in enumerate(sorted(self.rotation.items())):
            arrays[f"r{i}/name"], arrays[f"r{i}/matrix"] = np.array(k), r
        for i, (k, (alpha, scales, before, after)) in enumerate(sorted(self.smoothing.items())):
            arrays[f"s{i}/name"], arrays[f"s{i}/scales"] = np.array(k), scales
            arrays[f"s{i}/numbers"] = np.array([alpha, before, after])
        for i, (k, a) in enumerate(sorted(self.acts.items())):
            arrays[f"a{i}/name"] = np.array(k)
            arrays[f"a{i}/counts"], arrays[f"a{i}/edges"] = a.counts, a.edges
            arrays[f"a{i}/observed"] = np.array(a.observed)
        for i, (k, s) in enumerate(sorted(self.layers.items())):
            arrays[f"l{i}/name"], arrays[f"l{i}/mean"], arrays[f"l{i}/rows"] = np.array(k), s.mean, np.array(s.rows)
            for field_name in ("hessian", "reads"):
                if getattr(s, field_name) is not None:
                    arrays[f"l{i}/{field_name}"] = getattr(s, field_name)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str) -> "Stats":
        z = np.load(path, allow_pickle=False)
        st = cls(samples=int(z["__samples"]))
        keys = set(z.files)
        for p in _entries(keys, "a"):
            st.acts[str(z[p + "name"])] = ActStats(z[p + "counts"], z[p + "edges"],
                                                   tuple(float(v) for v in z[p + "observed"]))
        for p in _entries(keys, "l"):
            got = {f: z[p + f] if p + f in keys else None for f in ("hessian", "reads")}
            st.layers[str(z[p + "name"])] = LayerStats(got["hessian"], z[p + "mean"], int(z[p + "rows"]),
                                                       reads=got["reads"])
        for p in _entries(keys, "s"):
            alpha, before, after = (float(v) for v in z[p + "numbers"])
            st.smoothing[str(z[p + "name"])] = (alpha, z[p + "scales"], before, after)
        for p in _entries(keys, "r"):
            st.rotation[str(z[p + "name"])] = z[p + "matrix"]
        return st


def _entries(keys: set[str], prefix: str):
    """The saved entries of one kind, in order: "{prefix}0/", "{prefix}1/", ... while a name is stored."""
    i = 0
    while f"{prefix}{i}/name" in keys:
        yield f"{prefix}{i}/"
        i += 1


@dataclass(frozen=True)
class ActQuant:
    scale: float
    zero_point: int
    bits: int
    signed: bool
    lo: float
    hi: float
    method: str


@dataclass
class Branch:
    """Low-rank residual: output += B(A(x)), in matrix form a [r, K], b [O, r].

    With bits < 32 the factors are stored as per-row symmetric codes (a = a_codes * a_scales)
    and the middle activation A(x) gets a QDQ pair with `mid`. A layer whose bias is corrected
    gets a centred branch: A's own bias `a_bias` = -A·E[x] makes the middle activation zero-mean,
    so its range covers the spread the factors were fitted on rather than the mean.
    """

    rank: int
    bits: int
    a: np.ndarray                 # float factors (exactly the dequantized codes when bits < 32)
    b: np.ndarray
    a_codes: np.ndarray | None = None
    a_scales: np.ndarray | None = None
    b_codes: np.ndarray | None = None
    b_scales: np.ndarray | None = None
    mid: "ActQuant | None" = None
    init: str = "whitened"
    a_bias: np.ndarray | None = None    # [r] float, centred branches only


@dataclass(frozen=True)
class Int32Bias:
    """A layer's weights and bias coded for an integer kernel: the bias in int32 units of
    s_x * s_w (per output channel), the weights with bias-safe scales (algos/bias.py)."""

    codes: np.ndarray
    scales: np.ndarray
    bias_codes: np.ndarray    # int32
    bias_scales: np.ndarray   # s_x * s_w, float32


@dataclass(frozen=True)
class CodedBiases:
    """What a layer's node and its branch read as biases once the input scale is known."""

    float_bias: np.ndarray | None           # the bias the layer computes with (corrected or the model's)
    layer: Int32Bias | None                 # int32 coding of float_bias, when the input is quantized
    branch: tuple[np.ndarray, np.ndarray] | None = None   # (int32 codes, scales) of a branch's A bias


@dataclass
class LayerPlan:
    target: Target
    bits: int
    method: str
    codes: np.ndarray            # weight codes in the original weight layout (int8: 2 to 8 bits fit)
    scales: np.ndarray           # [channels along axis]
    axis: int
    bias: np.ndarray | None      # corrected bias (float32) or None to keep the original
    source_bias: np.ndarray | None = None   # the model's own bias (float)
    block: int = 0               # > 0: scales [O, K / block], one per run of `block` columns (tables,
                                 # Gemm/MatMul), or a conv's [O, C / block, *kernel] (per kernel tap)
    zero_points: np.ndarray | None = None   # blocked affine grids: one per scale (codes are relative to it)
    sqnr_db: float | None = None  # layer output SQNR estimate from H (None without H)
    sqnr_rtn_db: float | None = None
    note: str = ""
    branch: Branch | None = None
    sqnr_branch_db: float | None = None   # with the low-rank branch added
    # what the rounding was fitted to, for the branch planner: target matrix [O, K] (None: the
    # FP32 weight), the regularized input second moment [G, K, K] and the input mean [G, K]
    fit_target: np.ndarray | None = None
    fit_hessian: np.ndarray | None = None
    input_mean: np.ndarray | None = None
    hot: "HotRows | None" = None   # an embedding table's rows calibration read, corrected (plan/hot.py)

    @property
    def half_scales(self) -> bool:
        return half_scales(self.target, self.block, self.bits)


@dataclass
class HotRows:
    """The rows of a low-bit embedding table that calibration read, made closer to FP32 by a second
    small table looked up beside it (plan/hot.py): `rows` [n] of the table, `plan` the residual
    table [n + 1, D] they index (its row 0, all zeros, is what every other row adds)."""

    rows: np.ndarray
    plan: LayerPlan
    reads: np.ndarray            # how often calibration read each of `rows`


def half_scales(target: Target, block: int, bits: int) -> bool:
    """A blocked conv's scales are stored in float16 (DequantizeLinear, then Cast to float): at
    blocks of 32 they would otherwise add a bit to every 4-bit weight. So are a blocked embedding
    table's (its gathered scales cast: graph/tables.py, kernels.py): all-MiniLM-L6-v2 W8A8 -0.74 MB
    at the same fidelity; at 4 bits, with a zero point a block, -0.7 to -0.9 MB and the same SQNR
    on a 3-layer cut of it (docs/results.md, round 34; on symmetric 4-bit grids they had cost the
    6-layer encoder 0.2 dB through --protect's budget, a share of the uniform file they shrink).
    A blocked Gemm/MatMul keeps float32 scales, which the fused MatMulNBits kernels read."""
    if not block:
        return False
    return target.weight_layout == "conv" or target.op == "Gather"


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)
    acts: dict[str, ActQuant] = field(default_factory=dict)
    branch_summary: "BranchSummary | None" = None
    biases: dict[str, CodedBiases] = field(default_factory=dict)   # node -> coded (plan/biases.py)
    target: str = "generic"      # emission rules (plan/rules.py)
    u8_weights: bool | None = None   # the 8-bit weight container, where the config settled it (config.rules)
    readers: dict[str, list[str]] = field(default_factory=dict)   # other nodes that read Q/DQ'd inputs
    tied: dict[str, str] = field(default_factory=dict)   # tensor -> the tensor whose Q/DQ params it takes


@dataclass
class BranchSummary:
    """What the low-rank branch planner did (plan/branches.py)."""

    budget_params: int = 0
    used_params: int = 0
    layers_with_branch: int = 0
    ineligible: dict[str, int] = field(default_factory=dict)      # reason -> layers
    refined_layers: int = 0
    weighting: str = ""
    sensitivity_power: float | None = None                       # network weighting only
    divergence_by_power: dict[str, float] = field(default_factory=dict)
    divergence_without_branches: float | None = None             # end-to-end check (probe)
    divergence_all_branches: float | None = None
    divergence_final: float | None = None
    dropped: list[str] = field(default_factory=list)
    check_samples: int = 0                                       # samples the probe judged on ...
    check_fitted: bool = False                                   # ... the branches' own calibration samples
    bytes: int = 0                                               # what the branches add to the file


@dataclass
class MixedSummary:
    """What the mixed-precision allocation chose and measured (search/mixed.py)."""

    allocator: str
    budget_bits: float
    used_bits: float
    avg_bits: float
    predicted_divergence: float
    measured_divergence: float
    measured_by_allocator: dict[str, float]
    predicted_by_allocator: dict[str, float]
    layers: dict[str, int]                      # node -> bits
    costs: dict[str, dict[str, float]]          # node -> bits -> measured cost


@dataclass
class SearchSummary:
    """The joint activation-range search (search/lapq.py)."""

    start_loss: float
    single_method_losses: dict[str, float]
    p_grid: dict[str, float]
    p_star: float
    start: str
    loss_before: float
    loss_after: float
    final: str
    evaluations: int
    tensors: int
    check_losses: dict[str, float]
    kept: str
    check_samples: int


@dataclass
class ChoiceSummary:
    """The per-tensor choice of activation range methods (search/choose.py)."""

    tensors: int
    tried: int                      # tensors whose candidate ranges differ enough to try
    evaluations: int
    loss_before: float              # network loss on the fitting samples, all at the start method
    loss_after: float
    check_before: float | None      # the same on calibration samples the choice did not fit
    check_after: float | None
    changed: dict[str, str]         # tensor -> method that lowered the fitting loss
    kept: bool = False              # the changes were kept (they also lowered the check loss)
    methods: dict[str, float] = field(default_factory=dict)   # 'best': method -> network loss
    chosen: str = ""                # 'best': the method used for every tensor


@dataclass
class RoundingChoice:
    """The weight method chosen for the low-bit layers by network loss (search/protect.py)."""

    losses: dict[str, float]        # method -> network loss with every low-bit layer rounded by it
    chosen: str
    samples: int                    # calibration samples the losses were measured on


@dataclass
class ProtectSummary:
    """Layers kept at 8 bits, and blocked layers kept per channel, under --protect (search/protect.py)."""

    budget_bytes: float
    used_bytes: float               # of the budget: 8-bit layers' extra bytes and the blocks kept
    harm: dict[str, float]          # node -> network loss added by the layer at low bits (a weight
                                    # several layers read: its first reader, all of them at low bits)
    protected: list[str]            # empty when nothing paid or the check rejected the choice
    check_before: float | None = None   # whole network at uniform low bits, on samples not fitted
    check_after: float | None = None    # the same with the protected layers at 8 bits
    per_channel: list[str] = field(default_factory=list)   # blocked layers the budget bought no blocks for
    flat_harm: dict[str, float] = field(default_factory=dict)  # node -> harm of a blocked one per channel
    rules: dict[str, float] = field(default_factory=dict)      # each rule's choice -> loss on unseen samples
    rule: str | None = None         # the rule whose choice was kept


@dataclass
class WideSummary:
    """Activations kept at 16 bits under --protect-acts (search/wide.py)."""

    tensors: int                    # quantized main-graph activations at the conversion's bits
    budget: int                     # at most this many may be widened
    harm: dict[str, float]          # tensor -> network loss its rounding alone adds (others unrounded)
    widened: list[str]              # empty when nothing paid or the check rejected the choice
    loss: float | None = None       # network loss on the fitting samples, every activation rounded
    check_before: float | None = None   # on calibration samples the harm was not measured on
    check_after: float | None = None    # the same with the widened tensors at 16 bits
    unfused: float | None = None        # share of the layers' multiply-adds that run without an integer
                                        # kernel because of them (targets with a budget for it)
    over_budget: int = 0                # tensors not weighed: the kernels they alone would take off integer
                                        # kernels already hold more than the target's budget


@dataclass
class OutputMetrics:
    """One output of the quantized model against the reference, over the held-out samples."""

    cosine: float
    sqnr_db: float
    top1_agreement: float | None = None      # classifier-like outputs only
    kl: float | None = None
    degenerate: bool = False                 # the reference is constant: cosine and SQNR mean nothing


@dataclass
class Fidelity:
    samples: int = 0
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    cosine: float | None = None              # the worst output's
    sqnr_db: float | None = None
    top1_agreement: float | None = None      # the first classifier-like output's
    kl: float | None = None
    accuracy_reference: float | None = None  # against given labels
    accuracy_candidate: float | None = None


@dataclass
class LayerReport:
    node: str
    op: str
    graph: str
    bits: int
    method: str
    params: int
    groups: int
    sqnr_db: float | None
    sqnr_rtn_db: float | None
    bias_corrected: bool
    activation: str | None        # the input tensor, when it is quantized
    activation_bits: int          # 32: the layer reads a float input (weight-only)
    float_input_reason: str       # why the input stays float, else ""
    note: str
    branch_rank: int
    branch_params: int
    sqnr_with_branch_db: float | None
    hot_rows: int = 0             # a table's rows read in calibration, corrected (plan/hot.py)


@dataclass
class SkippedReport:
    node: str
    op: str
    reason: str


@dataclass
class ActReport:
    tensor: str
    method: str
    bits: int
    signed: bool
    range: list[float | None]
    observed: list[float | None]
    clipped_fraction: float | None
    scale: float
    zero_point: int
    histogram: list[int] = field(default_factory=list)     # calibration counts over histogram_range
    histogram_range: list[float | None] = field(default_factory=lambda: [None, None])


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str | None]


@dataclass
class LayerInfo:
    """One quantizable layer as `onnxq inspect` shows it (names are what --exclude and
    --bits-override match)."""

    node: str
    op: str
    graph: str
    weight_shape: list[int]
    params: int
    bits: int                 # what the given options would give it
    input: str                # "quantized", or why the input stays float


@dataclass
class Inspection:
    model: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    layers: list[LayerInfo]
    skipped: list[SkippedReport]
    float_ops: dict[str, int]         # op type -> nodes that stay float (no weight to quantize)
    target: str


@dataclass
class SmoothReport:
    """Per-channel smoothing of one Gemm/MatMul or conv input (algos/smoothing.py): alpha None = left as
    it is; the readers' relative output error with both sides quantized, without and with it."""

    tensor: str
    readers: list[str]
    alpha: float | None
    error_before: float
    error_after: float
    smoothed: str = ""        # the tensor the readers now read (the Mul's output, or the input itself
                              # when the scales were folded into the ops that make it), "" if none


REPORT_SCHEMA = "onnxq-report/3"


@dataclass
class Report:
    model: str = ""
    config: dict[str, object] = field(default_factory=dict)
    prepare: dict[str, int] = field(default_factory=dict)
    quantized: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedReport] = field(default_factory=list)
    activations: list[ActReport] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    params: int = 0
    calib_samples: int = 0
    holdout_samples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    fidelity: Fidelity = field(default_factory=Fidelity)
    warnings: list[str] = field(default_factory=list)
    opset_before: int = 0
    opset_after: int = 0
    branches: BranchSummary | None = None
    mixed: MixedSummary | None = None
    search: SearchSummary | None = None
    ranges: ChoiceSummary | None = None
    protect: ProtectSummary | None = None
    wide: WideSummary | None = None
    rounding: RoundingChoice | None = None
    smoothing: list[SmoothReport] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)  # Gemm/MatMul inputs rotated per block (graph/rotate.py)
    shared_weights: int = 0                           # weights several layers read, stored once (plan/shared.py)
    float_ops: list[SkippedReport] = field(default_factory=list)   # nodes without weights left in float, and why
    # onnxruntime (CPU) session config entries the model runs best with, which the fidelity figures used
    session_options: dict[str, str] = field(default_factory=dict)
    schema: str = REPORT_SCHEMA

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Placement:
    """The tensors a target quantizes beyond the layers' inputs (graph/placement.py)."""

    observe: list[str] = field(default_factory=list)       # tensors to calibrate beyond the layers' inputs
    tied: dict[str, str] = field(default_factory=dict)     # tensor -> the tensor whose Q/DQ params it takes
    readers: dict[str, list[str]] = field(default_factory=dict)   # non-layer node -> inputs it reads quantized
    float_outputs: list[str] = field(default_factory=list)  # unit layers whose output decides the answer: no Q
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # tensor -> where every reader saturates
    units: dict[str, str] = field(default_factory=dict)    # a unit layer's output Q tensor -> the layer
    tails: list[str] = field(default_factory=list)         # tensors just ahead of a thresholded score: min-max ranges


@dataclass
class Conversion:
    """What the stages produce, in the order they produce it."""

    cfg: ConvertConfig
    name: str = ""
    source: "onnx.ModelProto | None" = None
    src_opset: int = 0
    prepared: "onnx.ModelProto | None" = None
    prep_info: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    calib: list = field(default_factory=list)
    held: list = field(default_factory=list)
    branch_check: list = field(default_factory=list)  # calibration samples kept out of the statistics: they judge branches
    stats: Stats | None = None
    placement: Placement | None = None
    weights: dict = field(default_factory=dict)
    biases: dict = field(default_factory=dict)
    plan: Plan | None = None
    mixed: MixedSummary | None = None
    planned: dict = field(default_factory=dict)       # node -> LayerPlan already made at its bits (mixed)
    early: dict = field(default_factory=dict)         # node -> LayerPlan made during chunked calibration
    search: SearchSummary | None = None
    ranges: ChoiceSummary | None = None
    protect: ProtectSummary | None = None
    wide: WideSummary | None = None
    rounding: RoundingChoice | None = None
    smoothing: list[SmoothReport] = field(default_factory=list)
    smoothed: dict = field(default_factory=dict)      # input tensor -> its algos.smoothing.Smoothing (applied)
    rotated: dict = field(default_factory=dict)       # Gemm/MatMul input -> its rotation [B, B] (graph/rotate.py)
    shared_weights: int = 0                           # weights several layers read, stored once (plan/shared.py)
    tails: int = 0                                    # tail sessions the single-layer probes keep (search/probe.tails_for)
    qmodel: "onnx.ModelProto | None" = None
    session_options: dict[str, str] = field(default_factory=dict)   # what qmodel runs with (api.session_options)
    fidelity: Fidelity = field(default_factory=Fidelity)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        log.info(f"{stage} done in {time.perf_counter() - t0:.1f} s")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)
