"""Per-target emission rules, in one table: where Q/DQ pairs go, which types and containers the
runtime wants, and the session options it runs the result with.

generic   Q/DQ on the inputs of quantized layers only, read only by those layers; INT4 weights in
          INT4 containers, ungrouped convs' with one float16 scale per --block input channels at
          each kernel tap; blocked weights as UINT4 codes with a zero point per block (--zero-points);
          at 8 bits pointwise- and depthwise-conv inputs may be smoothed per channel. The smallest file; runtimes
          that fuse input-side Q/DQ (TensorRT-style, OpenVINO for 8-bit layers) run it fast. Gemm/MatMul
          layers are weight-only (a float input; a Gemm on its own weight written as MatMul on [K, N]
          codes, graph/matmuls.py): onnxruntime's default session runs them as MatMulNBits, which
          rounds the input per block as it runs, OpenVINO as compressed FullyConnected layers.
          Tables are looked up on their codes (graph/tables.py). On onnxruntime's CPU provider a
          model with convs runs at FP32 speed with `session.disable_quant_qdq` (weights folded at
          load); one whose weights all fuse is recorded as meant for a default session. At 8-bit
          activations the few whose rounding costs the network most may be int16 (--protect-acts).
          8-bit Conv/Gemm/MatMul weights in UINT8 with zero point 128 (U8_WEIGHT_OPS, below).
ort-cpu   full node units DQ -> op -> Q so onnxruntime's CPU provider fuses integer kernels
          (QLinearConv, QLinearMatMul, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, ...):
          Q/DQ also on the outputs of quantized layers (after a Relu/Clip they feed, which the
          kernel absorbs), through the element-wise and pooling ops it fuses, with the input's
          scale carried through data-movement ops; every reader of a quantized tensor reads the
          same DQ. u8 activations (ranged one tensor at a time at W8A8: --act-method auto),
          per-channel symmetric 8-bit weights: INT8 where the converting
          CPU adds int8 products in int32 (VNNI, AMX, Arm), whose symmetric conv path runs 1.2-2.3x
          faster; else u8 codes with zero point 128 (the same values; U8_WEIGHT_OPS, below), since
          x86 CPUs without VNNI add u8 x s8 pairs in int16 and saturate. int32 biases. Its Conv kernels take
          8-bit weights only, so 2- to 4-bit conv weights are stored as their 4-bit-grid values in
          INT8 containers (the speed of W8A8 with the rounding of W4; the file is W8-sized).
          Scores that flow through no quantized layer into a Sigmoid/Softmax ahead of an output
          (a detector's class logits) get no output Q: the layers making them run in float.
          A HardSwish between two u8 tensors (it has no integer kernel) is written as x/6 + 1/2
          rounded to a u8 gate, times x: QLinearAdd and QLinearMul. At 8 bits a depthwise or
          pointwise conv input is smoothed per channel where the division folds into the ops that
          make it; one a HardSwish makes from a conv's output folds into that conv (x / s), the
          HardSwish then a 1x1 depthwise gate conv on x / s times x / s: QLinearConv and
          QLinearMul (graph/hardswish_channels.py). A constant scale and shift
          read only by convs (a learnt affine block after an activation) folds into those convs
          (a padding conv reads an explicit Pad), and a Pad between two tensors of one 8-bit
          grid runs on the codes (graph/forward.py, graph/pads.py).
          An output-side tensor read only by ops that saturate (HardSwish below -3, HardSigmoid,
          Clip, Relu; Sigmoid beyond +-8 and Tanh beyond +-4.5 to within 2^-11; x * sigmoid(x)
          below -8, x * hardsigmoid(x) below its zero) is ranged only where they do not. At
          8-bit activations the few whose rounding costs the network most may be int16
          (--protect-acts): the layers reading or making them then run in float, so they may
          hold at most 2% of the multiply-adds.
          Gemm/MatMul weights become its weight-only kernel MatMulNBits (com.microsoft: onnxq's
          4-bit codes packed two to a byte or 8-bit ones, one scale and zero point per block of
          K; the input stays float and the kernel quantizes it to int8 per block as it runs:
          more faithful than a static 8-bit input, as fast), and embedding
          tables its GatherBlockQuantized (8 or 4 bits, dequantized rows gathered in one kernel).
openvino  generic placement (OpenVINO's CPU plugin runs input-side Q/DQ convs as u8) with 2- to
          4-bit conv weights in INT8 containers: INT4 conv weights make it fall back to bf16
          (blocked Gemm/MatMul weights keep INT4 codes with zero points); the graph simplified
          first as for ort-cpu (affine chains folded into convs, identity Casts dropped,
          hard-swish fused). Gemm/MatMul layers are weight-only (float input), which the plugin
          runs as compressed FullyConnected layers that round their input per group as they run:
          all-MiniLM-L6-v2 W8A8 19.2 -> 28.3 dB at about the same speed, W4A8 16.6 -> 19.4 dB and
          faster (docs/results.md, round 28).
qnn       fully quantized graphs as NPU backends (Qualcomm's QNN HTP and the like) run them: every
          layer is a DQ -> op -> Q unit, Gemm/MatMul included, and so is every op the backend
          runs on quantized tensors (element-wise, pooling, activation, normalisation, resizing,
          softmax) when all its activation inputs are quantized; data-movement ops keep their
          input's scale; u8 activations, symmetric per-channel INT8 weights with 2- to 4-bit
          layers in INT4; no GPU or NPU here, so the tests check the graph structurally.
tensorrt  TensorRT's explicit-quantization rules: Q/DQ on op inputs, residual Add inputs
          included (the Add fuses into the conv before it), symmetric int8 activations with zero
          point 0, INT8 conv weights, INT4 weights only for Gemm/MatMul, whose inputs stay float
          (weight-only); no GPU here, so the tests check the graph against these rules.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path


# ops whose onnxruntime CPU kernels take quantized inputs and outputs (their scales may differ)
FUSED_OPS = frozenset({"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu"})
# ops an NPU backend runs on quantized tensors (QNN HTP's quantized op set, those with float outputs)
NPU_OPS = FUSED_OPS | frozenset({"Sub", "Div", "Relu", "Clip", "HardSwish", "HardSigmoid", "Tanh", "Softmax",
                                 "Gelu", "Erf", "LayerNormalization", "InstanceNormalization", "ReduceMean",
                                 "ReduceMax", "GlobalMaxPool", "Sqrt", "Pow", "Exp", "Log", "Abs", "Neg", "Max",
                                 "Min", "PRelu", "Elu", "MatMul", "Pad"})
# data-movement ops that run on the 8-bit tensor when their output keeps the input's scale
SAME_SCALE_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize",
                            "DepthToSpace", "SpaceToDepth", "Split", "Pad"})
# layers whose output gets a Q under full node units: onnxruntime fuses DQ -> Gemm/MatMul without
# one into kernels with a float output (QGemm, MatMulIntegerToFloat), so rounding their outputs
# (often a bias or residual Add's input, with outlier channels in transformers) would only cost
# fidelity
UNIT_OPS = frozenset({"Conv", "ConvTranspose"})
# activations a quantized layer's kernel absorbs when the Q right after them makes them redundant
ABSORBED_OPS = frozenset({"Relu", "Clip"})
# layers ahead of a thresholded score (a Sigmoid that reaches an output) whose outputs keep min-max
# ranges (graph/placement.score_branch; docs/results.md, round 16)
BRANCH_LAYERS = 2
# ops that turn scores into the network's answer: the values ahead of them decide it
DECISION_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax"})
# ort-cpu: the share of the multiply-adds that int16 activations may take off the integer kernels
# (a unit with an int16 input or output runs in float; docs/results.md, round 15)
ORT_WIDE_MACS = 0.02
# 8-bit weights that onnxruntime's CPU provider runs in integer kernels (its default session fuses
# DQ -> Conv/Gemm/MatMul -> Q units, under generic placement too) go in UINT8 containers with zero
# point 128: the values are the same, but its x86 u8 x s8 kernels without VNNI (AVX2, AVX-512 before
# VNNI) add pairs of products in int16 and saturate, which u8 x u8 kernels do not (onnxruntime's
# quantization docs name U8U8 as the remedy). On an AVX2 machine the int8 containers cost EfficientNet-
# Lite1 W8A8 19.4 -> 5.4 dB and PP-OCR rec 19.4 -> 11.2 dB (docs/results.md, round 21)
U8_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# ort-cpu: W8A8 activation ranges chosen per tensor by their effect on the outputs (--act-method auto)
# rather than one method for the model: full node units round every conv's output, every SiLU's gate and
# every element-wise result (YOLOv8n: 210 roundings against generic's 59), and no single method suits all
# of them (docs/results.md, round 39)
ORT_ACT_METHOD = "auto"
# ort-cpu: ungrouped convs on a model input of at most this many channels (an image's first conv)
# stay float: onnxruntime's 8-bit conv runs their short Cin x kh x kw rows slower than its float
# conv (PP-LCNet's 3-channel stem: 441 us as QLinearConv, 178 us in float; docs/results.md, round 17)
ORT_INPUT_CONVS = 4



@dataclass(frozen=True)
class Rules:
    name: str
    output_units: bool            # Q/DQ on layer outputs and through fused ops (full node units)
    all_readers: bool             # every reader of a quantized tensor reads its one DQ
    int4_conv: bool               # 2-4-bit Conv/ConvTranspose weights in INT4 containers (else INT8)
    int4_matmul: bool             # 2-4-bit Gemm/MatMul weights in INT4 containers (else INT8)
    simplify: bool = False        # exact rewrites for fused kernels: identity Casts dropped, affine
                                  # blocks folded into convs, decomposed hard-swish one node (opset 14)
    tables: bool = True           # embedding tables quantized (DQ -> Gather, folded at load)
    act_signed: bool = False      # symmetric int8 activations, zero point 0
    add_inputs: bool = False      # Q/DQ on both inputs of residual Adds (fused into the conv before)
    int4_weight_only: bool = False  # 2-4-bit Gemm/MatMul read a float input (int4 weight-only kernels)
    int8_weight_only: bool = False  # 8-bit Gemm/MatMul too (weight-only kernels that round their input
                                    # per block as they run: onnxruntime's MatMulNBits, 8 bits)
    matmul_gemms: bool = False    # ... and such a Gemm on a weight blocked along K is emitted as MatMul
                                  # (+ Add) on [K, N] codes, the form runtimes fuse (graph/matmuls.py)
    table_codes: bool = False     # tables' Gathers read the codes, only gathered rows are dequantized
                                  # (graph/tables.py)
    ms_kernels: bool = False      # onnxruntime's MatMulNBits / GatherBlockQuantized (com.microsoft)
    rotate_inputs: bool = False   # the runtime rounds a weight-only Gemm/MatMul's input to int8 per block
                                  # (MatMulNBits, accuracy level 4): inputs rotated (graph/rotate.py)
    blocked_weights: bool = False  # 2-4-bit Gemm/MatMul weights may take one scale per block of K (--block)
    blocked_convs: bool = False    # 2-4-bit ungrouped conv weights may take one scale per block of input
                                   # channels at each kernel tap (--block)
    zero_points: bool = False      # blocked weights may sit on affine grids, a zero point per block (--zero-points)
    unit_ops: frozenset = UNIT_OPS       # layers whose output gets a Q (with output_units)
    fused_ops: frozenset = FUSED_OPS     # other ops quantized on both sides when their inputs are (output_units)
    float_decisions: bool = False        # no output-side Q ahead of an output's Sigmoid/Softmax (output_units)
    smooth_convs: bool = False           # pointwise- and depthwise-conv inputs may be smoothed (8-bit conversions)
    smooth_folds: bool = False           # ... conv inputs only where the division folds into the ops that make
                                         # them (a Mul would part a conv from its fused integer unit)
    wide_acts: bool = False              # the most harmful 8-bit activations may be int16 (--protect-acts)
    wide_macs: float | None = None       # ... as long as the layers that then lose their integer kernels
                                         # (reading or making an int16 tensor) hold at most this share
                                         # of the quantized layers' multiply-adds (None: no limit)
    input_convs: int = 0                 # ungrouped convs on a model input of at most this many channels stay float
    int_hard_swish: bool = False         # a HardSwish between u8 tensors as QLinearAdd + QLinearMul (graph/hardswish.py)
    fold_into_readers: bool = False      # constant scale/shift chains read only by convs folded into them (graph/forward.py)
    u8_weights: bool = False             # 8-bit Conv/Gemm/MatMul weights as UINT8 codes with zero point 128 (U8U8)
    u8_weights_auto: bool = False        # ... decided by the converting CPU instead (int16_pair_sums)
    int_pad: bool = False                # a Pad that feeds a layer runs on its input's 8-bit codes (graph/pads.py)
    act_method: str = "best"             # W8A8 activation ranges when --act-method is not given: one method
                                         # for the whole model (best) or one per tensor (auto; search/choose.py)
    session_options: dict[str, str] = field(default_factory=dict)   # for onnxruntime's CPU provider
    summary: str = ""


RULES: dict[str, Rules] = {
    "generic": Rules("generic", output_units=False, all_readers=False, int4_conv=True, int4_matmul=True,
                     int4_weight_only=True, int8_weight_only=True, matmul_gemms=True, table_codes=True,
                     blocked_weights=True, rotate_inputs=True,
                     blocked_convs=True, zero_points=True, smooth_convs=True, wide_acts=True, u8_weights=True,
                     session_options={"session.disable_quant_qdq": "1"},
                     summary="Q/DQ on quantized layers' inputs; INT4 containers; Gemm/MatMul weight-only "
                             "(float input), Gemm as MatMul on [K, N] codes; tables gathered as codes"),
    "ort-cpu": Rules("ort-cpu", output_units=True, all_readers=True, int4_conv=False, int4_matmul=False,
                     simplify=True, int4_weight_only=True, int8_weight_only=True, ms_kernels=True,
                     blocked_weights=True, rotate_inputs=True,
                     zero_points=True, float_decisions=True, wide_acts=True, wide_macs=ORT_WIDE_MACS,
                     smooth_convs=True, smooth_folds=True, input_convs=ORT_INPUT_CONVS, int_hard_swish=True,
                     fold_into_readers=True, int_pad=True,
                     u8_weights_auto=True, act_method=ORT_ACT_METHOD,
                     summary="full node units for onnxruntime's CPU integer kernels; u8 activations, 8-bit weights s8 "
                             "(u8 with zero point 128 where the CPU's int8 kernels add pairs in int16), int32 bias; "
                             "Gemm/MatMul as MatMulNBits (4 or 8 bits), tables as GatherBlockQuantized"),
    "openvino": Rules("openvino", output_units=False, all_readers=False, int4_conv=False, int4_matmul=True,
                      simplify=True, blocked_weights=True, zero_points=True, int4_weight_only=True,
                      int8_weight_only=True,
                      session_options={"session.disable_quant_qdq": "1"},
                      summary="Q/DQ on quantized layers' inputs; conv weights in INT8 containers; "
                              "Gemm/MatMul weight-only"),
    "qnn": Rules("qnn", output_units=True, all_readers=True, int4_conv=True, int4_matmul=True,
                 simplify=True, unit_ops=frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"}),
                 fused_ops=NPU_OPS, session_options={"session.disable_quant_qdq": "1"},
                 summary="fully quantized for NPU backends: Q/DQ around every layer and every op they run "
                         "quantized; u8 activations, symmetric per-channel INT8/INT4 weights"),
    "tensorrt": Rules("tensorrt", output_units=False, all_readers=False, int4_conv=False, int4_matmul=True,
                      act_signed=True, add_inputs=True, int4_weight_only=True, tables=False,
                      session_options={"session.disable_quant_qdq": "1"},
                      summary="explicit quantization: symmetric int8 activations (zero point 0) on layer and "
                              "residual-Add inputs, INT8 conv weights, INT4 weight-only Gemm/MatMul"),
}
DEFAULT_TARGET = "generic"


def target_rules(target: str, u8_weights: bool | None = None) -> Rules:
    """A target's rules with the 8-bit weight container as settled (ConvertConfig.u8_weights), where
    that differs from the table's."""
    r = RULES[target]
    return r if u8_weights is None or u8_weights == r.u8_weights else replace(r, u8_weights=u8_weights)


def float_input(rules: Rules, target, bits: int) -> bool:
    """Whether a layer (a types.Target) reads its input in float under `rules`: 2- to 4-bit
    Gemm/MatMul under weight-only kernels (8-bit ones too under int8_weight_only); with
    onnxruntime's MatMulNBits only where it fits
    (X @ W, or a Gemm whose bias the quantizer may replace), else its fused 8-bit kernel."""
    weight_only = rules.int4_weight_only if bits <= 4 else rules.int8_weight_only
    if not (weight_only and target.op in ("Gemm", "MatMul")):
        return False
    return not rules.ms_kernels or nbits_fits(target)


def nbits_fits(target) -> bool:
    """Whether MatMulNBits can compute a Gemm/MatMul target: Y = X @ W with a constant bias."""
    if target.op == "MatMul":
        return target.weight_layout == "cols"
    return target.op == "Gemm" and not target.fixed_bias


# what the CPU a conversion runs on does with 8-bit products (Rules.u8_weights_auto)
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@lru_cache(maxsize=1)
def int16_pair_sums() -> bool:
    """Whether onnxruntime's u8 x s8 integer kernels add pairs of products in int16 on this CPU,
    and so may saturate with INT8 weights: an x86 CPU without VNNI (AVX2, AVX-512 before VNNI).
    x86 CPUs with (AVX-)VNNI or AMX, and Arm CPUs, accumulate in int32. An x86 CPU whose flags
    cannot be read counts as one that saturates."""
    if platform.machine().lower() not in X86:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "vnni" not in flags
