"""The one typed configuration of a conversion, validated once."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .algos.ranges import RANGE_METHODS, parse_method
from .algos.weights import DEFAULT_DAMP, WEIGHT_METHODS
from .errors import ConfigError
from .plan.rules import DEFAULT_TARGET, RULES, int16_pair_sums, target_rules

VERSION = "0.1.0"
WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (4, 6, 8, 16, 32)
SEARCHED_METHODS = ("auto", "best", "lapq")   # activation methods that measure the network (search/)
# 8-bit activations: the ranges the searches start from; keeps all but 1 value in 10^5 at each
# end. Against percentile:99.99 it read 29.5 -> 36.0 and 32.6 -> 32.9 dB on a YOLOv8n (F1 0.78 ->
# 0.95 on the second data set) and 26.5 -> 34.2 / 25.1 -> 27.4 dB on OriNet, but lost PP-OCR rec
# strings (0.83 -> 0.65 in tests/test_real_ocr.py): so the default, 'best', measures the network
# with each of search/choose.BEST_OF and keeps the best (docs/experiments/generalisation.md)
START_RANGE = "percentile:99.999"
DEFAULT_RANGE = "best"
BLOCKS = (0, 32, 64, 128)      # --block choices (0: one scale per output channel)
BLOCKS_8BIT = (16, 32, 64, 128)   # blocks of blocked 8-bit Gemm/MatMul weights (ConvertConfig.block8)
FINE_8BIT_BLOCK = 16           # ... where every quantized layer is weight-only (api.block_8bit)
ROTATE_BLOCK = 16              # channels a Hadamard rotation of such a layer's input mixes (graph/rotate.py)
PROTECT = 0.18                 # --protect's default (docs/results.md, round 12) ...
ENCODER_PROTECT = 0.28         # ... where every layer reads a float input (an encoder at W4A8; rounds 44, 51)
# activation bits at which low-bit conversions run sequential mode by default: 8 (rounds 13-14) and
# 32, weight-only (round 40: 4-bit weight-only on eight models, eleven draws, held-out SQNR +0.1 to
# +3.3 dB, answers up or level on every draw; docs/results.md)
SEQUENTIAL_ACT_BITS = (8, 32)


@dataclass(frozen=True)
class ConvertConfig:
    """What to quantize and how.

    bits: weight bits (2, 3, 4 or 8); act_bits: activation bits (32 = weight-only).
    weight_method / act_method: names from WEIGHT_METHODS / RANGE_METHODS; None = default
    (weights: weight_method_for; activations: percentile at 8 and 16 bits, the interval rule at
    4 and 6 bits, where percentile clips too little: docs/experiments/activation-ranges.md).
    depthwise_bits: depthwise convs keep this many bits (9 weights a channel: the error of a
    4-bit depthwise conv dominates the network's while its size is negligible).
    exclude: node-name patterns (fnmatch) left in float. bits_overrides: (pattern, bits) pairs.
    """

    bits: int = 4
    act_bits: int = 8
    weight_method: str | None = None
    damp: float = DEFAULT_DAMP             # gptq: damping of H, a fraction of mean(diag H)
    act_method: str | None = None
    act_symmetric: bool = False
    calib_size: int = 256
    holdout: int | None = None
    seed: int = 0
    depthwise_bits: int = 8
    bias_correction: bool = True
    rows_per_sample: int = 512
    exclude: tuple[str, ...] = ()
    bits_overrides: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    verify: bool = True
    sequential: bool | None = None         # None: on for uniform W<8A8 (docs/experiments/weights.md)
    stages: int | None = None              # sequential passes at most; None: as many as layers (search/sequential.py)
    sequential_samples: int = 64           # samples of each extra sequential pass
    rank_budget: float = 0.0
    branch_init: str = "whitened"
    branch_bits: int = 8
    branch_weighting: str = "network"      # rank allocation weighted by measured network effect, or "layer"
    max_rank: int = 64
    branch_refine: int = 0                 # joint refinement rounds: re-round W - B·A, refit the branch
    avg_bits: float | None = None          # mixed precision: parameter-weighted average weight bits
    max_size: int | None = None            # mixed precision: bytes of quantized weights at most
    bit_choices: tuple[int, ...] = (8, 4, 3, 2)
    search_evals: int = 120                # lapq: network-loss evaluations at most (det W4A4: ~1 s each)
    search_samples: int = 64               # lapq: samples the search fits (the next as many check it)
    protect: float | None = None           # <= 4 bits: weight bytes (fraction) over uniform low bits for
                                           # --block's blocked scales and zero points, then layers kept at
                                           # 8 bits (search/protect.py); None: PROTECT, or ENCODER_PROTECT
                                           # where every layer reads a float input (api.protect_budget)
    target: str = DEFAULT_TARGET           # emission rules of the runtime the model is for (plan/rules.py)
    quantize_attention: bool = False       # 8-bit Q/DQ on both inputs of MatMuls of two activations
    smooth: bool = True                    # per-channel smoothing of Gemm/MatMul/depthwise inputs where it pays
    protect_acts: float = 0.25             # 8-bit activations: share of them that may be kept at 16 bits
    block: int = 32                        # <= 4-bit Gemm/MatMul: one scale per this many K values (0: per channel)
    zero_points: bool = True               # blocked weights on affine grids, a zero point per block
    u8_weights: bool | None = None         # 8-bit conv/Gemm/MatMul weights as UINT8 with zero point 128; None:
                                           # the target's rule (ort-cpu: settled at once, True where the CPU adds
                                           # int8 pairs in int16)
    block_8bit: bool | None = None         # W8: weight-only Gemm/MatMul and tables blocked too (opset 21);
                                           # None: where they hold most of the weights (api.block_8bit)
    gptq_8bit_matmul: bool | None = None   # W8: Gemm/MatMul rounded second-order; None: where block_8bit holds
                                           # and the weights are in memory (api.block_8bit)
    block8: int | None = None              # W8 blocked Gemm/MatMul (block_8bit): K values a scale; None: 16 where
                                           # every quantized layer is weight-only, else --block (api.block_8bit)
    exact_matmuls: bool = False            # onnxruntime runs weight-only Gemm/MatMul on float inputs, weights
                                           # dequantized at load, not as MatMulNBits (api.session_options)
    rotate: bool = True                    # every layer weight-only (W8 blocked, or W2-4): the Gemm/MatMul
                                           # inputs, which MatMulNBits rounds to int8 per block, rotated (api.rotate)
    hot_rows: bool = True                  # <= 4-bit tables: the rows calibration read corrected by a residual
                                           # table, paid from --protect's budget (plan/hot.py)

    def __post_init__(self) -> None:
        self._check_switches()
        self._check_target()
        if self.u8_weights is None and RULES[self.target].u8_weights_auto:   # as the converting CPU wants
            object.__setattr__(self, "u8_weights", int16_pair_sums())
        if self.bits not in WEIGHT_BITS:
            raise ConfigError(f"--bits must be one of {WEIGHT_BITS}, got {self.bits}")
        if self.act_bits not in ACT_BITS:
            raise ConfigError(f"--act-bits must be one of {ACT_BITS}, got {self.act_bits}")
        if self.weight_method is not None and self.weight_method not in (*WEIGHT_METHODS, "auto"):
            raise ConfigError(f"unknown weight method '{self.weight_method}'; "
                              f"known: {', '.join(WEIGHT_METHODS)}, auto")
        if self.act_method is not None and self.act_method not in SEARCHED_METHODS:
            try:
                parse_method(self.act_method)
            except ValueError as e:
                why = str(e) if "parameter" in str(e) else f"unknown activation method '{self.act_method}'"
                raise ConfigError(f"{why}; known: {', '.join(RANGE_METHODS)}, best, auto (chosen per tensor), lapq (percentile:PCT with "
                                  "PCT in (50, 100], lp:P with P in [1, 10], interval:EPS with EPS in (0, 1])") from None
        if self.block not in BLOCKS:
            raise ConfigError(f"--block must be one of {', '.join(map(str, BLOCKS))}, got {self.block}")
        if self.block8 not in (None, *BLOCKS_8BIT):
            raise ConfigError(f"block8 must be one of {', '.join(map(str, BLOCKS_8BIT))}, got {self.block8}")
        if self.stages is not None and self.stages < 1:
            raise ConfigError(f"stages must be at least 1, got {self.stages}")
        if self.search_samples < 1 or self.search_evals < 0:
            raise ConfigError("--search-samples must be at least 1 and --search-evals at least 0")
        if not 0.0 <= self.protect_acts <= 1.0:
            raise ConfigError(f"--protect-acts is a fraction of the 8-bit activations (0..1), got {self.protect_acts}")
        if self.protect is not None and not 0.0 <= self.protect <= 1.0:
            raise ConfigError(f"--protect is a fraction of the low-bit weight bytes (0..1), got {self.protect}")
        if not 0 < self.damp <= 1:
            raise ConfigError(f"--damp must lie in (0, 1], got {self.damp}")
        if self.calib_size < 1:
            raise ConfigError("--calib-size must be at least 1")
        if self.depthwise_bits not in WEIGHT_BITS:
            raise ConfigError(f"depthwise bits must be one of {WEIGHT_BITS}")
        if not 0.0 <= self.rank_budget <= 1.0:
            raise ConfigError(f"--rank-budget is a fraction of the parameters (0..1), got {self.rank_budget}")
        if self.branch_init not in ("whitened", "svd"):
            raise ConfigError(f"unknown --branch-init '{self.branch_init}'; known: whitened, svd")
        if self.branch_bits not in (8, 16, 32):
            raise ConfigError(f"--branch-bits must be 8, 16 or 32, got {self.branch_bits}")
        if self.max_rank < 1:
            raise ConfigError(f"--max-rank must be at least 1, got {self.max_rank}")
        if not 0 <= self.branch_refine <= 10:
            raise ConfigError(f"--branch-refine must lie in 0..10, got {self.branch_refine}")
        if self.branch_weighting not in ("network", "layer"):
            raise ConfigError(f"unknown --branch-weighting '{self.branch_weighting}'; known: network, layer")
        if self.avg_bits is not None and not 2 <= self.avg_bits <= 8:
            raise ConfigError(f"--avg-bits must lie in 2..8, got {self.avg_bits}")
        if self.max_size is not None and self.max_size <= 0:
            raise ConfigError("--max-size must be positive")
        if not self.bit_choices or any(b not in WEIGHT_BITS for b in self.bit_choices):
            raise ConfigError(f"--bit-choices must come from {WEIGHT_BITS}, got {self.bit_choices}")
        for _, b in self.bits_overrides:
            if b not in WEIGHT_BITS:
                raise ConfigError(f"bit override must be one of {WEIGHT_BITS}, got {b}")

    def _check_switches(self) -> None:
        """On/off options hold True or False (None where the default is decided later): a string such
        as 'False' from a hand-written config would otherwise read as on."""
        for f in fields(self):
            v = getattr(self, f.name)
            ok = isinstance(v, bool) or (v is None and f.type == "bool | None")
            if f.type in ("bool", "bool | None") and not ok:
                raise ConfigError(f"{f.name} must be True or False, got {v!r}")

    def _check_target(self) -> None:
        """The target exists and the options that depend on it fit it."""
        if self.target not in RULES:
            raise ConfigError(f"unknown target '{self.target}'; known: {', '.join(RULES)}")
        r = RULES[self.target]
        if self.quantize_attention and r.all_readers:
            raise ConfigError(f"--quantize-attention is for the input-side targets (generic, openvino, tensorrt); "
                              f"'{self.target}' places Q/DQ around every op it runs quantized by its own rules")
        if self.exact_matmuls and r.ms_kernels:
            raise ConfigError(f"--exact-matmuls is for the targets that leave onnxruntime a DequantizeLinear to "
                              f"fold at load; '{self.target}' writes its own MatMulNBits kernels")
        if self.u8_weights is not None and not (r.u8_weights or r.u8_weights_auto):
            raise ConfigError(f"--u8-weights/--int8-weights are for the generic and ort-cpu targets; "
                              f"'{self.target}' keeps symmetric INT8 weights, as its runtime wants")

    @property
    def weight_method_name(self) -> str:
        """The method of the model's --bits layers, as the report names it."""
        conv, matmul, rest = (self.weight_method_for(self.bits, op) for op in ("Conv", "MatMul", ""))
        if conv == rest and matmul == rest:
            return rest
        return f"gptq for convs{' and Gemm/MatMul' if matmul == 'gptq' else ''}, {rest} for the rest"

    def weight_method_for(self, bits: int, op: str = "") -> str:
        """The weight method of a layer (`op`) with `bits` bits: the chosen one, else gptq at
        <= 4 bits; in an 8-bit conversion gptq for every Conv (depthwise ones too, their groups
        floored at the layer's scale: algos.weights.layer_floor) and, where gptq_8bit_matmul holds
        (settled by api.block_8bit: a MatMul-heavy model whose weight-only Gemm/MatMul take blocked
        8-bit grids, its weights in memory), for every Gemm/MatMul; else mse (tables; the
        Gemm/MatMul of other 8-bit conversions and the 8-bit layers of a 4-bit conversion, where
        second-order rounding measured mixed: docs/experiments/weights.md)."""
        if self.weight_method and self.weight_method != "auto":
            return self.weight_method
        if bits <= 4 or (self.bits == 8 and (op == "Conv" or (self.gptq_8bit_matmul and op in ("Gemm", "MatMul")))):
            return "gptq"
        return "mse"

    @property
    def act_method_name(self) -> str:
        if self.act_method:
            return self.act_method
        if self.act_bits <= 6:
            return "interval"
        # the target's own choice holds for W8A8: under ort-cpu at 4 bits, where the weights' error
        # dominates, per-tensor ranges read mixed (docs/results.md, round 39)
        w8a8 = self.act_bits == 8 and self.bits == 8 and not self.mixed
        return self.rules.act_method if w8a8 else DEFAULT_RANGE

    @property
    def mixed(self) -> bool:
        return self.avg_bits is not None or self.max_size is not None

    def size_budget_bits(self, params: int) -> float:
        """Bits the quantized weights may take: from --avg-bits (branch parameters counted at the
        same average) or --max-size."""
        if self.avg_bits is not None:
            branch = self.rank_budget * params
            return self.avg_bits * (params + branch) - self.branch_bits * branch
        return float(self.max_size) * 8

    @property
    def rules(self):
        """The target's emission rules, with the 8-bit weight container as settled (u8_weights)."""
        return target_rules(self.target, self.u8_weights)

    @property
    def sequential_on(self) -> bool:
        """Sequential mode: as asked, else by default where it was measured to pay, uniform low-bit
        weights with 8-bit activations or none (SEQUENTIAL_ACT_BITS; no mixed precision); low-rank
        branches are fitted after it."""
        if self.stages == 1:
            return False
        if self.sequential is None:
            return self.bits < 8 and self.act_bits in SEQUENTIAL_ACT_BITS and not self.mixed
        return self.sequential

    @property
    def protect_on(self) -> bool:
        """Protection applies to uniform low-bit conversions (mixed precision chooses bits its own
        way)."""
        return (self.protect is None or self.protect > 0) and self.bits < 8 and not self.mixed

    @property
    def protect_acts_on(self) -> bool:
        """Activations may be kept at 16 bits where the target's runtime takes them (search/wide.py)."""
        return self.protect_acts > 0 and self.act_bits == 8 and self.rules.wide_acts

    @property
    def rounding_choice(self) -> bool:
        """--weight-method auto: low-bit layers planned by each candidate method, the one the
        network prefers kept (api.low_bits)."""
        return self.weight_method == "auto" and self.bits < 8 and not self.mixed

    @property
    def quantize_acts(self) -> bool:
        return self.act_bits < 32

    def excluded(self, node: str) -> bool:
        return any(fnmatch.fnmatchcase(node, p) for p in self.exclude)

    def bits_for(self, node: str, depthwise: bool) -> tuple[int, str]:
        """Weight bits of a node and why, when it differs from --bits."""
        for pattern, b in self.bits_overrides:
            if fnmatch.fnmatchcase(node, pattern):
                return b, "bits chosen by mixed precision" if self.mixed else f"override {pattern}"
        if depthwise and self.depthwise_bits > self.bits:
            return self.depthwise_bits, f"depthwise conv kept at {self.depthwise_bits} bits"
        return self.bits, ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_method"], d["act_method"] = self.weight_method_name, self.act_method_name
        d["sequential"] = self.sequential_on
        return d
