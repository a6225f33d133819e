"""convert(): the pipeline as a list of stage calls.

load -> prepare -> targets -> data -> smooth -> calibrate -> plan -> search -> widen -> reconstruct
-> branches -> rewrite -> verify -> report.
Each stage is a function below; the packages hold the work (README, "How it works")."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from typing import TYPE_CHECKING, Sequence

from .algos.matrix import to_matrix
from .algos.smoothing import (ALPHAS, DEPTHWISE_ALPHAS, GAIN, POINTWISE_GAIN, Smoothing, choose_smoothing,
                              depthwise_proxy)
from .calib.channels import channel_stats
from .calib.collect import collect, hessian_chunks
from .calib.data import Preprocess, constant_inputs, open_source, random_feeds
from .config import ENCODER_PROTECT, FINE_8BIT_BLOCK, PROTECT, ROTATE_BLOCK, SEARCHED_METHODS, VERSION, ConvertConfig
from .errors import CalibrationError, InputModelError, OutputError, VerificationError
from .graph.io import (SESSION_KEY, TARGET_KEY, check_model, check_output_path, constant_dequantizes,
                       float_op_counts, int8_weight_dequantizes, PAIR_SAFE_CODE, get_metadata, input_specs, load_model, opset_of, save_model, set_metadata,
                       tensor_infos, validate)
from .graph.placement import plan_placement
from .graph.forward import fold_affine_into_readers
from .graph.prepare import drop_identities, fold_affine, fuse_hardswish, prepare, upgrade_opset
from .graph.rewrite import apply_plan
from .graph.rotate import rotate_inputs
from .graph.smooth import apply_smoothing, channel_axis, folds, pointwise, smoothable
from .graph.large import model_bytes, weights_folder
from .graph.targets import WeightMap, find_targets, initializer_array
from .graph.tidy import tidy
from .plan.acts import keep_tails, plan_acts, saturate, tie
from .plan.biases import code_biases
from .plan.branches import add_branches
from .plan.layers import make_plan, plan_layer, plan_once
from .plan.rules import DEFAULT_TARGET, RULES, float_input, int16_pair_sums
from .plan.shared import pool_stats, share_weights
from .report import build_report, clipped_share
from .runtime import PRECISE, QDQ_OFF, default_session_graph, give_back_memory, run_as, session
from .search.choose import best_method, choose_ranges
from .search.lapq import lapq_search
from .search.mixed import choose_bits
from .search.probe import Probe, tails_for
from .search.protect import check_probe, choose_rounding, protect_layers
from .search.sequential import sequential_layers
from .search.wide import target_macs, widen_acts
from .types import (Conversion, Feed, Inspection, LayerInfo, LayerStats, Progress, Report, SkippedReport,
                    SmoothReport, Stats, log)
from .verify import fidelity

if TYPE_CHECKING:
    import onnx

RANDOM_SAMPLES = 16    # random feeds used when no calibration data is given
PROBE_SAMPLES = 16     # samples the branch planner's network probe runs at most ...
BRANCH_CHECK_FRACTION = 6   # ... and one in this many calibration samples, kept out of the statistics
BRANCH_CHECK_MIN = 24  # below this many calibration samples the branches are judged on the fitted ones
HOLDOUT_MAX = 16       # held-out samples taken from the calibration data at most ...
HOLDOUT_FRACTION = 8   # ... and at most one in this many
HOLDOUT_STREAM = 7     # random stream of the held-out pick (independent of the other seeded draws)
BRANCH_CHECK_STREAM = 8   # random stream of the branches' check samples
ROUNDING_CANDIDATES = ("gptq", "mse")   # weight methods the low-bit layers are planned with and judged by
WIDE_SAMPLES = 16      # samples the harm of 8-bit activations is measured on ...
WIDE_CHECK = 48        # ... and at most this many of the rest check the choice
CHOICE_SAMPLES = 8     # samples the per-tensor range choice fits (the next as many check it)
POOR_AGREEMENT = 0.9   # below this top-1 agreement (or POOR_SQNR_DB) the summary warns loudly
POOR_SQNR_DB = 10.0
SATURATES = ("this CPU (x86 without VNNI) adds pairs of u8 x s8 products in int16, and the model's INT8 weights "
             "can pass that range: the held-out figures ran with session.x64quantprecision=1 (its u8 x u8 kernels); "
             "a session on such a CPU without that entry may saturate (under ort-cpu, --u8-weights stores the conv "
             "weights as UINT8, which no session saturates)")
SMOOTH_SAMPLES = 32    # calibration samples of the smoothing choice (half fit the maxima, half judge)
SMOOTH_ROWS = 1024     # input rows the choice is judged on
HESSIAN_SHARE = 0.25   # weights on disk: second moments held at once, a share of the weights' bytes


def convert(model: "str | os.PathLike | onnx.ModelProto", config: ConvertConfig | None = None,
            calib: "str | os.PathLike | Sequence[Feed] | None" = None, *,
            preprocess: Preprocess | None = None,
            holdout: "str | os.PathLike | Sequence[Feed] | None" = None,
            stats: Stats | str | None = None, save_stats: str | None = None,
            progress: Progress | None = None) -> "tuple[onnx.ModelProto, Report]":
    """Quantize `model` (a path or a ModelProto, never modified) and return (model, report)."""
    c = Conversion(config or ConvertConfig())
    t0 = time.perf_counter()
    with c.timed("load"):
        load(c, model)
        prepare_model(c)
        c.targets, c.skipped = targets_of(c)
        block_8bit(c)
        if isinstance(stats, str):
            stats = load_stats(stats)
        rotate(c, stats)
        protect_budget(c)
        log.info(f"{len(c.targets)} layers to quantize, {len(c.skipped)} left in float")
        c.placement = plan_placement(c.prepared, c.targets, c.cfg.rules, c.cfg.quantize_acts,
                                     c.cfg.quantize_attention)
        data(c, calib, holdout, preprocess)
    with c.timed("smooth"):
        smooth(c, stats)
    with c.timed("calibrate"):
        calibrate(c, stats, save_stats, progress)
    with c.timed("quantize"), run_as(search_options(c.cfg)):
        plan(c, progress)
        search(c, progress)
        widen(c, progress)
        reconstruct(c, progress)
        branches(c)
        rewrite(c)
    with c.timed("verify"):
        verify(c)
    c.seconds["total"] = time.perf_counter() - t0
    return c.qmodel, build_report(c)


def targets_of(c: Conversion):
    """The prepared model's quantizable nodes and the skipped ones, under the conversion's rules."""
    return find_targets(c.prepared, c.cfg.excluded, c.cfg.rules.tables, c.cfg.rules.input_convs)


def block_8bit(c: Conversion) -> None:
    """Settles cfg.block_8bit: an 8-bit conversion's weight-only Gemm/MatMul weights and tables
    take a scale per block of K (of a row) where asked, or by default where they hold more than
    half of the weights. Per-column 8-bit grids are what bound a transformer's W8 fidelity, and
    the kernels that read them round their input per block anyway; a blocked DequantizeLinear
    needs opset 21, which costs a conv model's W8 output its older runtimes for one classifier.
    With the blocks, cfg.gptq_8bit_matmul: such a model's Gemm/MatMul are rounded second-order
    unless their weights stay on disk (docs/results.md, round 35)."""
    cfg = c.cfg
    if cfg.block_8bit is False or cfg.bits != 8 or cfg.mixed or not cfg.block or not cfg.rules.blocked_weights:
        return
    light = sum(t.params for t in c.targets if _weight_only(cfg.rules, t))
    if not light or (cfg.block_8bit is None and light <= 0.5 * sum(t.params for t in c.targets)):
        return
    if not cfg.rules.ms_kernels:             # MatMulNBits / GatherBlockQuantized need no opset 21
        try:
            c.prepared = upgrade_opset(c.prepared, 21)
        except InputModelError:
            c.warn("8-bit weights stay per column: the model cannot be raised to opset 21, "
                   "which blocked DequantizeLinear needs")
            return
        c.targets, c.skipped = targets_of(c)
    # their second-order rounding gathers a K x K moment a layer: not for weights left on disk
    gptq = cfg.gptq_8bit_matmul if cfg.gptq_8bit_matmul is not None else weights_folder(c.prepared) is None
    c.cfg = dataclasses.replace(cfg, block_8bit=True, gptq_8bit_matmul=gptq,      # the report's config says so
                                block8=cfg.block8 or fine_8bit_block(c))


def fine_8bit_block(c: Conversion) -> int:
    """Blocks of a blocked 8-bit Gemm/MatMul weight: FINE_8BIT_BLOCK where every quantized layer is
    weight-only, so that the weights are all of the conversion's error (an encoder at W8A8), else
    --block. Held out on two sentence encoders, blocks of 16 read +1.7 to +2.1 dB on eight draws
    for 4-7% more bytes; on a model whose activations are rounded too (a CRNN reader) they bought
    nothing for 9% (docs/results.md, round 41)."""
    return FINE_8BIT_BLOCK if _all_weight_only(c) else c.cfg.block


def rotate(c: Conversion, stats: Stats | None = None) -> None:
    """Where every quantized layer reads a float input (an encoder at W8A8 with blocked weights, or
    at W4A8) under a target whose runtime rounds those layers' inputs to int8 per block
    (onnxruntime's MatMulNBits), each Gemm/MatMul input is rotated by a Hadamard matrix per
    ROTATE_BLOCK channels and the weights by its transpose (graph/rotate.py), unless --exact-matmuls
    keeps the inputs float. Held out on all-MiniLM-L6-v2 in a default session: W8A8 34.7 -> 39.0 dB,
    within 0.7 dB of float inputs (docs/results.md, round 43); W4A8 retrieval agreement
    0.885 -> 0.927 (round 44). Statistics loaded from a file bring the rotations they were
    collected under (their second moments are in that basis), and none if they had none."""
    cfg = c.cfg
    wanted = (cfg.rotate and cfg.rules.rotate_inputs and not cfg.exact_matmuls
              and weights_folder(c.prepared) is None and _rotatable(c))
    if stats is not None and bool(stats.rotation) != bool(wanted):
        c.warn("inputs rotated as the loaded statistics were collected (their second moments are in that basis)"
               if stats.rotation else
               "inputs not rotated: the loaded statistics were collected without rotations (as --no-rotate)")
    if not (stats.rotation if stats is not None else wanted):
        return
    groups = smoothable(c.prepared, c.targets, convs=False)        # Gemm/MatMul inputs only
    c.rotated = rotate_inputs(c.prepared, groups, ROTATE_BLOCK, cfg.seed, None if stats is None else stats.rotation)
    if c.rotated:
        c.targets, c.skipped = targets_of(c)
        log.info(f"rotated {len(c.rotated)} Gemm/MatMul inputs per {ROTATE_BLOCK} channels")


def _rotatable(c: Conversion) -> bool:
    """Every layer reads a float input whatever bits it gets: W8 with blocked weights, or 2-4 bits
    (a layer protected at 8 bits too)."""
    if c.cfg.bits > 4:
        return bool(c.cfg.block_8bit) and _all_weight_only(c)
    return _all_weight_only(c, (4, 8))


def protect_budget(c: Conversion) -> None:
    """Settles cfg.protect where not given: ENCODER_PROTECT where every layer of a 2-4-bit
    conversion reads a float input (an encoder at W4A8, whose 8-bit layers then cost no activation
    rounding), else PROTECT. Held out with rotated inputs, 0.18 -> 0.30 raised the 3-layer cut's
    answers on four draws of four (round 44); 0.28 since the tables' hot rows are paid from it (round 51):
    the budget spent whole, a 3-layer MiniLM's file is then at most 0.18x FP32 (its uniform 4-bit
    weights 9.59 MB x 1.28 plus 0.15 MB of the rest, of 69.0 MB), where 0.30 held it there only by
    what the purchase left unspent. On convnets 0.30 was not
    better at its size (docs/results.md, rounds 42 and 44)."""
    if c.cfg.protect is None:
        wide = c.cfg.bits <= 4 and bool(c.targets) and _all_weight_only(c, (4, 8))
        c.cfg = dataclasses.replace(c.cfg, protect=ENCODER_PROTECT if wide else PROTECT)


def _all_weight_only(c: Conversion, bits: tuple[int, ...] = (8,)) -> bool:
    """Every quantized layer of the conversion reads a float input at each of `bits` (an encoder
    at W8A8; with (4, 8), at W4A8 whichever layers protection keeps at 8 bits)."""
    return all(_weight_only(c.cfg.rules, t, bits) for t in c.targets)


def _weight_only(rules, t, bits: tuple[int, ...] = (8,)) -> bool:
    """A layer whose input stays float at each of `bits`: a table, or a Gemm/MatMul on a weight-only
    kernel."""
    return t.op == "Gather" or all(float_input(rules, t, b) for b in bits)


def load(c: Conversion, model) -> None:
    if hasattr(model, "graph"):            # an onnx.ModelProto
        c.source, c.name = model, model.graph.name or "model"
        if opset_of(c.source) < 11:
            raise InputModelError(f"model uses opset {opset_of(c.source)}; onnxq needs 11 or newer")
    else:
        c.source, c.name = load_model(model), str(model)
    validate(c.source, c.name)
    c.src_opset = opset_of(c.source)


def needed_opset(cfg: ConvertConfig) -> int:
    """21 where int4 weights or int16 activations are emitted, else 13 (per-channel QDQ)."""
    low = (cfg.bits <= 4 or any(b <= 4 for _, b in cfg.bits_overrides) or cfg.act_bits == 16
           or (cfg.mixed and min(cfg.bit_choices) <= 4))
    return 21 if low else (14 if cfg.rules.simplify else 13)


def prepare_model(c: Conversion) -> None:
    prepared, c.prep_info = prepare(c.source)
    c.prepared = upgrade_opset(prepared, needed_opset(c.cfg))
    if c.cfg.rules.simplify:
        c.prep_info["identities_dropped"] = drop_identities(c.prepared)
        c.prep_info["affine_folded"] = fold_affine(c.prepared)
        c.prep_info["hardswish_fused"] = fuse_hardswish(c.prepared)
    if c.cfg.rules.fold_into_readers:
        c.prep_info["affine_folded_into_readers"] = fold_affine_into_readers(c.prepared)


def data(c: Conversion, calib, holdout, preprocess: Preprocess | None) -> None:
    """Calibration and held-out loaders (random feeds, with a warning, when there is no data)."""
    specs = input_specs(c.prepared)
    if calib is None:
        c.warn("no calibration data given: using random inputs, so the fidelity figures "
               "say nothing about real data — pass --calib")
        loaders = random_feeds(specs, RANDOM_SAMPLES, c.cfg.seed)
    else:
        loaders = open_source(calib, specs, preprocess)
    held = open_source(holdout, specs, preprocess) if holdout is not None else None
    c.calib, c.held, notes = split(loaders, c.cfg, held)
    c.warnings += notes
    if c.cfg.rank_budget > 0 and len(c.calib) >= BRANCH_CHECK_MIN:
        c.calib, c.branch_check = pick(c.calib, min(PROBE_SAMPLES, len(c.calib) // BRANCH_CHECK_FRACTION),
                                       [c.cfg.seed, BRANCH_CHECK_STREAM])
    constant = constant_inputs(c.calib) if calib is not None else []
    if constant:
        c.warn(f"calibration input(s) {', '.join(constant)} hold a single value in every sample checked "
               "(all zeros?): the ranges and the fidelity figures will not reflect real data")


def smooth(c: Conversion, stats: Stats | None) -> None:
    """Per-channel smoothing of the quantized Gemm/MatMul and pointwise/depthwise-conv inputs where the
    readers' quantized outputs come closer to float (algos/smoothing.py), judged on samples the
    channel maxima were not taken from; then the layers and placement are found again on the
    rewritten graph.
    Statistics loaded from a file bring the smoothing they were collected under."""
    if not (c.cfg.smooth and c.cfg.quantize_acts) or weights_folder(c.prepared) is not None:
        return
    bits = {t.node: c.cfg.bits_for(t.node, t.depthwise)[0] for t in c.targets}
    # depthwise and pointwise convs in 8-bit conversions under generic, and under ort-cpu where the
    # division folds into the ops that make the input (PP-OCR rec strings +0.04 over four draws, det
    # and cls level: docs/results.md, round 32); at W4A8 it lost on PP-OCR cls, under openvino it cost
    # 3-8% of the latency the target is for (round 8). Pointwise convs likewise (round 24). Under
    # ort-cpu an input a HardSwish makes from a conv's output folds into that conv (round 37:
    # PP-PicoDet F1 0.61 -> 0.90, its depthwise inputs spanning channels 100-fold and more).
    convs = c.cfg.bits >= 8 and c.cfg.rules.smooth_convs
    groups = {a: ts for a, ts in smoothable(c.prepared, c.targets, convs).items()
              if not any(float_input(c.cfg.rules, t, bits[t.node]) for t in ts)}
    if c.cfg.rules.smooth_folds:        # a conv input only where no Mul would part the conv from its unit
        groups = {a: ts for a, ts in groups.items()
                  if channel_axis(ts[0]) != 1 or folds(c.prepared, a, ts, through_hardswish=True)}
    if not groups:
        return
    if stats is not None:
        chosen = {a: Smoothing(*v) for a, v in stats.smoothing.items() if a in groups}
    else:
        found = channel_stats(c.prepared, list(groups), c.calib[:SMOOTH_SAMPLES], SMOOTH_ROWS, c.cfg.seed,
                              {a: channel_axis(ts[0]) for a, ts in groups.items()})
        chosen = {a: choose_smoothing(*found[a], [_proxy_weight(c.prepared, t) for t in ts],
                                      [bits[t.node] for t in ts], c.cfg.act_bits, c.cfg.rules.act_signed,
                                      DEPTHWISE_ALPHAS if all(t.depthwise for t in ts) else ALPHAS,
                                      POINTWISE_GAIN if any(pointwise(t) for t in ts) else GAIN)
                  for a, ts in groups.items() if a in found}
    c.smoothed = {a: ch for a, ch in chosen.items() if ch.alpha is not None}
    for act, ch in chosen.items():
        readers = groups[act]
        new = (apply_smoothing(c.prepared, act, readers, ch.scales, c.cfg.rules.smooth_folds)
               if ch.alpha is not None else "")
        c.smoothing.append(SmoothReport(act, [t.node for t in readers], ch.alpha, ch.error_before, ch.error_after,
                                        new))
    if any(s.alpha is not None for s in c.smoothing):
        c.targets, c.skipped = targets_of(c)
        c.placement = plan_placement(c.prepared, c.targets, c.cfg.rules, c.cfg.quantize_acts,
                                     c.cfg.quantize_attention)
        log.info(f"smoothing: {sum(s.alpha is not None for s in c.smoothing)} of {len(c.smoothing)} "
                 f"Gemm/MatMul and conv inputs smoothed")


def _proxy_weight(model, t) -> np.ndarray:
    """The weight a smoothing proxy multiplies a reader's input by: [O, K]."""
    w = initializer_array(model, "", t.weight)
    return depthwise_proxy(w, t.groups) if t.depthwise else to_matrix(w, t.weight_layout)


def split(loaders: list, cfg: ConvertConfig, holdout_source) -> tuple[list, list, list[str]]:
    """Calibration loaders and held-out loaders."""
    if holdout_source is not None:
        return loaders[:cfg.calib_size], holdout_source, []
    n = len(loaders)
    h = cfg.holdout if cfg.holdout is not None else (min(HOLDOUT_MAX, max(1, n // HOLDOUT_FRACTION))
                                                     if n > 1 else 0)
    h = min(h, n - 1)
    if h <= 0:
        return (loaders[:cfg.calib_size], loaders[:1],
                ["only one calibration sample: fidelity is measured on that same sample"])
    rest, held = pick(loaders, h, [cfg.seed, HOLDOUT_STREAM])
    return rest[:cfg.calib_size], held, []


def pick(loaders: list, k: int, seed: list[int]) -> tuple[list, list]:
    """(the rest, k loaders drawn at random (seeded) across the data, not its last files by name)."""
    picked = set(np.random.default_rng(seed).choice(len(loaders), size=k, replace=False).tolist())
    return ([f for i, f in enumerate(loaders) if i not in picked], [f for i, f in enumerate(loaders) if i in picked])


def calibrate(c: Conversion, stats: Stats | None, save_stats: str | None,
              progress: Progress | None) -> None:
    on_disk = weights_folder(c.prepared) is not None
    c.weights = (WeightMap(c.prepared, c.targets) if on_disk
                 else {t.node: initializer_array(c.prepared, t.graph, t.weight) for t in c.targets})
    c.biases = {t.node: initializer_array(c.prepared, t.graph, t.bias) for t in c.targets if t.bias}
    if stats is None:
        hessians = True if save_stats else needs_hessians(c.cfg, c.targets)
        if hessians and on_disk and not save_stats and one_pass_plan(c.cfg):
            stats = calibrate_in_chunks(c, hessians, progress)
        else:
            stats = collect(c.prepared, c.targets, c.calib, hessians=hessians, rows_per_sample=c.cfg.rows_per_sample,
                            seed=c.cfg.seed, progress=progress, extra=c.placement.observe)
    stats.acts = saturate(stats.acts, c.placement.bounds)
    stats.smoothing = {a: (ch.alpha, ch.scales, ch.error_before, ch.error_after) for a, ch in c.smoothed.items()}
    stats.rotation = dict(c.rotated)
    if save_stats:
        try:
            stats.save(save_stats)
        except OSError as e:
            raise OutputError(f"could not save the statistics to {save_stats}: {e.strerror or e}") from None
    pool_stats(c.targets, stats.layers)
    c.stats = stats
    c.tails = tails_for(sum(target_macs(c.targets, stats.acts).values()) / max(stats.samples, 1))


def one_pass_plan(cfg: ConvertConfig) -> bool:
    """Each layer planned from its own statistics alone (no mixed precision, sequential mode asked
    for, or branches, which need every layer's statistics at once). The default sequential mode
    of a model whose weights stay on disk is skipped, like the network probes."""
    return not (cfg.mixed or cfg.sequential is True or cfg.rank_budget > 0)


def calibrate_in_chunks(c: Conversion, hessians: bool | set[str], progress: Progress | None) -> Stats:
    """For weights left on disk: one calibration pass per group of layers whose H fit in
    HESSIAN_SHARE of the weights' bytes; each group is planned as soon as its H is known and the
    H dropped, so second moments never take more memory than that share."""
    budget = HESSIAN_SHARE * model_bytes(c.prepared)
    chunks = hessian_chunks([t for t in c.targets if hessians is True or t.node in hessians], budget)
    stats = None
    for nodes in chunks:
        part = collect(c.prepared, c.targets, c.calib, hessians=nodes, rows_per_sample=c.cfg.rows_per_sample,
                       seed=c.cfg.seed, progress=progress, extra=c.placement.observe)
        stats = stats or part                 # ranges and means: the same from every pass
        for t in c.targets:
            ls = part.layers.get(t.node)
            if t.node in nodes and ls is not None:
                lp = plan_layer(t, c.weights[t.node], c.biases.get(t.node), ls, c.cfg)
                c.early[t.node] = dataclasses.replace(lp, fit_hessian=None)
                stats.layers[t.node] = LayerStats(None, ls.mean, ls.rows)
        del part
        give_back_memory()
    log.info(f"weights on disk: {len(chunks)} calibration passes, second moments of at most "
             f"{budget / 1e9:.2f} GB at a time")
    return stats


def needs_hessians(cfg: ConvertConfig, targets) -> bool | set[str]:
    """The layers that gather second moments: all (True) for branches, mixed precision, sequential
    mode and low-bit second-order rounding (its report weighs every layer's error by H); in an
    8-bit conversion only those that gptq rounds. Plain 8-bit layers need only their means (bias
    correction), and gathering K x K moments is most of a layer's calibration time."""
    gptq = {t.node for t in targets
            if cfg.weight_method_for(cfg.bits_for(t.node, t.depthwise)[0], t.op) == "gptq"}
    if cfg.mixed or cfg.rank_budget > 0 or cfg.sequential_on or (cfg.bits < 8 and gptq):
        return True
    return gptq


def load_stats(path: str) -> Stats:
    try:
        return Stats.load(path)
    except FileNotFoundError:
        raise CalibrationError(f"--load-stats: no such file: {path}") from None
    except Exception as e:
        raise CalibrationError(f"--load-stats: {path} is not a statistics file saved by onnxq "
                               f"({type(e).__name__})") from None


def plan(c: Conversion, progress: Progress | None) -> None:
    """Bits per layer (mixed precision), codes and scales (one-pass or sequential), activation
    ranges, low-rank branches."""
    if c.cfg.mixed:
        choose_mixed(c, progress)
    layers = None
    act_plan = plan_acts(c.stats.acts, c.cfg, c.placement.tied)
    probes = c.cfg.protect_on or c.cfg.rounding_choice
    # weights on disk: planned without the network probes, whether or not calibration was chunked
    if layers is None and (c.early or (probes and weights_folder(c.prepared) is not None)):
        memo: dict = {}
        layers = [c.early.get(t.node) or plan_once(memo, t, c.weights[t.node], c.biases.get(t.node),
                                                   c.stats.layers.get(t.node), c.cfg) for t in c.targets]
        if probes:
            also = "" if c.cfg.sequential or not c.cfg.sequential_on else " and sequential mode"
            c.warn(f"protection of sensitive layers, the choice of rounding{also} were skipped: the model's weights "
                   "stay on disk (over the large-model threshold) and those network probes would hold every "
                   "weight in memory at once")
    elif layers is None and probes:
        layers = low_bits(c, act_plan, progress)
    c.plan = make_plan(c.targets, c.weights, c.biases, c.stats.layers, c.stats.acts, c.cfg,
                       progress=progress, layers=layers, act_plan=act_plan, planned=c.planned)
    c.plan.target, c.plan.readers, c.plan.tied = c.cfg.target, dict(c.placement.readers), dict(c.placement.tied)
    c.plan.u8_weights = c.cfg.rules.u8_weights
    c.shared_weights = share_weights(c.plan.layers, c.weights, c.stats.layers, c.cfg)


def low_bits(c: Conversion, act_plan, progress: Progress | None) -> list:
    """Every layer planned at its bits (by each candidate weight method, the one that leaves the
    network closest to FP32 kept), then the most harmful low-bit layers moved to 8 bits."""
    # the default's own plan (cfg.weight_method_for) and the other candidates' for every layer
    methods = [c.cfg.weight_method_name] + [m for m in ROUNDING_CANDIDATES if m != c.cfg.weight_method_name
                                            and c.cfg.rounding_choice]
    variants = {}
    for m in methods:
        cfg = c.cfg if m == c.cfg.weight_method_name else dataclasses.replace(c.cfg, weight_method=m)
        memo: dict = {}
        variants[m] = [
            plan_once(memo, t, c.weights[t.node], c.biases.get(t.node), c.stats.layers.get(t.node), cfg)
            for t in c.targets]
        if progress:
            progress("quantize", len(variants), len(methods))
    layers = next(iter(variants.values()))
    judge = None
    if len(variants) > 1:
        judge = check_probe(c.prepared, layers, c.weights, c.biases, c.calib, act_plan)
        c.rounding = choose_rounding(judge, variants, c.cfg)
        layers = variants[c.rounding.chosen]
        log.info(f"rounding: {c.rounding.chosen} (network loss {c.rounding.losses})")
    if c.cfg.protect_on:
        layers, c.protect = protect_layers(c.prepared, layers, c.weights, c.biases, c.stats.layers, c.calib,
                                           c.cfg, act_plan, progress, judge,
                                           c.rounding.chosen if c.rounding else None, c.tails)
        if c.protect is not None:
            log.info(f"protect: {len(c.protect.protected)} layers kept at 8 bits, "
                     f"{len(c.protect.per_channel)} per channel "
                     f"({c.protect.used_bytes:.0f} of {c.protect.budget_bytes:.0f} bytes)")
    return layers


def choose_mixed(c: Conversion, progress: Progress | None) -> None:
    overrides, c.mixed, c.planned = choose_bits(c.prepared, c.targets, c.weights, c.biases, c.stats.layers,
                                                c.calib, c.cfg, progress, c.tails)
    if c.mixed.used_bits > c.mixed.budget_bits:
        c.warn(f"the size budget cannot be met: even the smallest bit choice takes "
               f"{c.mixed.used_bits / 8:.0f} bytes of weights against "
               f"{c.mixed.budget_bits / 8:.0f}; the smallest was used")
    c.cfg = dataclasses.replace(c.cfg, bits_overrides=overrides + c.cfg.bits_overrides,
                                depthwise_bits=min(c.cfg.bit_choices))


def search(c: Conversion, progress: Progress | None) -> None:
    """The activation-range searches (per-tensor choice or joint lapq), on samples they fit and
    samples that check them."""
    if c.cfg.act_method_name not in SEARCHED_METHODS or not c.plan.acts:
        return
    n = c.cfg.search_samples if c.cfg.act_method_name == "lapq" else min(CHOICE_SAMPLES, max(1, len(c.calib) // 2))
    feeds = [load() for load in c.calib[:n]]
    check = [load() for load in c.calib[n:2 * n]]        # calibration samples the search does not fit
    ref_sess = session(c.prepared)
    reference = [ref_sess.run(None, f) for f in feeds]
    check_ref = [ref_sess.run(None, f) for f in check]
    del ref_sess                     # its weights leave memory before the search session loads its own
    if c.cfg.act_method_name == "best":
        acts, c.ranges = best_method(c.prepared, c.plan, c.stats.acts, feeds + check, reference + check_ref, c.cfg)
    elif c.cfg.act_method_name == "auto":
        acts, c.ranges = choose_ranges(c.prepared, c.plan, c.stats.acts, feeds, reference, check, check_ref,
                                       c.cfg, progress)
    else:
        acts, c.search = lapq_search(c.prepared, c.plan, c.stats.acts, feeds, reference, c.cfg,
                                     progress, check, check_ref)
    c.plan.acts = tie(keep_tails(acts, c.stats.acts, c.placement.tails), c.placement.tied)
    give_back_memory()
    if c.ranges is not None:
        log.info(f"activation ranges: {c.ranges.chosen}")


def widen(c: Conversion, progress: Progress | None) -> None:
    """The 8-bit activations that cost the network most kept at 16 bits (search/wide.py), judged
    on the calibration samples after the ones their harm is measured on."""
    if not c.cfg.protect_acts_on or not c.plan.acts or len(c.calib) < 2:
        return
    n = min(WIDE_SAMPLES, len(c.calib) // 2)
    fit = [load() for load in c.calib[:n]]
    check = [load() for load in c.calib[n:n + WIDE_CHECK]]
    try:
        acts, c.wide = widen_acts(c.prepared, c.plan, c.stats.acts, fit, check, c.cfg, progress, c.placement.units,
                                   c.tails)
    except Exception as e:    # an optional refinement: the 8-bit model stands without it
        c.warn(f"activations stay at 8 bits: measuring their harm failed ({str(e).splitlines()[0][:160]})")
        return
    if not c.wide.widened:
        return
    try:                      # int16 Q/DQ need opset 21; the model is raised only when it gets some
        c.prepared = upgrade_opset(c.prepared, 21)
    except InputModelError:
        c.warn("activations stay at 8 bits: the model cannot be raised to opset 21, which int16 Q/DQ need")
        c.wide.widened = []
        return
    if c.cfg.act_method_name in SEARCHED_METHODS:      # a score branch kept at 16 bits keeps its room (search)
        acts = keep_tails(acts, c.stats.acts, set(c.wide.widened) & set(c.placement.tails))
    c.plan.acts = tie(acts, c.placement.tied)
    log.info(f"activations kept at 16 bits: {len(c.wide.widened)} of {c.wide.tensors}")


def reconstruct(c: Conversion, progress: Progress | None) -> None:
    """Sequential mode, once the activations' ranges and widths are final: the layers coded again
    stage by stage on the input they really receive (search/sequential.py)."""
    on_disk = weights_folder(c.prepared) is not None and not c.cfg.sequential   # skipped unless asked for
    if not c.cfg.sequential_on or c.early or on_disk or not any(t.act for t in c.targets):
        return
    cfg = c.cfg if c.rounding is None else dataclasses.replace(c.cfg, weight_method=c.rounding.chosen)
    c.plan.layers = sequential_layers(c.prepared, c.plan, c.calib, c.weights, c.biases, cfg, progress)


def branches(c: Conversion) -> None:
    """Low-rank branches on the final codes (sequential mode's included), judged on the network
    the user gets: the probe carries the final activation QDQ (ranges searched, 16-bit ones
    widened), not the first plan's."""
    if c.cfg.rank_budget <= 0:
        return
    # judged on samples the branches were not fitted on where there are enough (fitted ones overfit:
    # PP-OCR cls W4A8 + 2%, calibration divergence 0.0046 -> 0.0008, held-out 0.0042 -> 0.0060)
    check = c.branch_check or c.calib[:PROBE_SAMPLES]
    probe = Probe(c.prepared, c.targets, c.weights, check, c.biases, c.plan.acts, tails=c.tails)
    add_branches(c.plan, c.targets, c.weights, c.cfg, probe)
    c.plan.branch_summary.check_samples, c.plan.branch_summary.check_fitted = len(check), not c.branch_check
    del probe
    give_back_memory()


def rewrite(c: Conversion) -> None:
    c.qmodel = tidy(apply_plan(c.prepared, code_biases(c.plan)))
    c.qmodel.producer_name, c.qmodel.producer_version = "onnxq", VERSION
    if c.early:               # weights on disk: the codes now live in the model; the plan's copy goes
        for lp in c.plan.layers:
            lp.codes = np.zeros(0, np.int8)
        c.plan.biases = {}
        give_back_memory()
    if c.cfg.target != DEFAULT_TARGET:
        set_metadata(c.qmodel, TARGET_KEY, c.cfg.target)
    c.session_options = session_options(c.qmodel, c.cfg.rules.session_options, c.cfg.exact_matmuls)
    if c.session_options != c.cfg.rules.session_options:
        set_metadata(c.qmodel, SESSION_KEY, json.dumps(c.session_options, sort_keys=True))


def session_options(qmodel: "onnx.ModelProto", target_options: dict[str, str], exact: bool = False) -> dict[str, str]:
    """The session config entries the model runs best with on onnxruntime's CPU provider: its
    target's, less QDQ_OFF when a default session keeps no DequantizeLinear of a weight (each is
    fused into an integer or 4-bit kernel, which the entry would replace by a float op on
    weights dequantized at load: all-MiniLM-L6-v2 W4A8 0.86x FP32 in a default session, 1.08x
    with the entry). Where a default session would dequantize weights on every call (convs,
    weights several nodes share) the entry stays; so it does where asked to (`exact`,
    --exact-matmuls): the fused MatMulNBits rounds its input to int8 per block of K as it runs,
    which is most of an 8-bit encoder's error (all-MiniLM-L6-v2 W8A8 34.6 -> 39.7 dB without it,
    1.05x FP32's latency instead of 0.58-0.95x: docs/results.md round 42)."""
    opts = dict(target_options)
    # INT8 weights fused into integer kernels that saturate on this CPU (x86 without VNNI) keep the
    # entry: qnn's and tensorrt's W8A8 LayerNorm test model read 26 and 23 dB fused there, 36 and 37 dB in float
    if opts.get(QDQ_OFF) == "1" and not exact and not (int16_pair_sums() and int8_weight_dequantizes(qmodel)):
        runs = default_session_graph(qmodel)
        if runs is not None and constant_dequantizes(runs) == 0:
            del opts[QDQ_OFF]
    return opts


def run_options(model: "onnx.ModelProto") -> tuple[str | None, dict[str, str]]:
    """(the target an onnxq model was written for, the onnxruntime session config entries it runs
    with: its own where recorded, else its target's, and on this CPU exact_here's); (None, {}) for
    a model onnxq did not write."""
    target = get_metadata(model, TARGET_KEY) or (DEFAULT_TARGET if model.producer_name == "onnxq" else None)
    if target is None:
        return None, {}
    recorded = get_metadata(model, SESSION_KEY)
    options = json.loads(recorded) if recorded else dict(RULES[target].session_options) if target in RULES else {}
    return target, exact_here(model, options)


def exact_here(model: "onnx.ModelProto", options: dict[str, str]) -> dict[str, str]:
    """`options`, and PRECISE where this CPU's u8 x s8 kernels add pairs of products in int16 (x86
    without VNNI) and `model` fuses INT8 weight codes beyond +-64 into them (an `ort-cpu` file
    written with --int8-weights, or on a CPU with VNNI): onnxruntime then runs those layers on its
    u8 x u8 kernels, which compute what the graph says. EfficientNet-Lite1 `ort-cpu` W8A8 with INT8
    weights on an AVX2 EPYC: 7.3 dB fused, 24.8 dB with the entry, as its UINT8 file reads, at the
    UINT8 file's speed (docs/results.md, round 50). Decided on the CPU that runs the model, never
    written into it: a CPU with VNNI would only lose its faster symmetric int8 path."""
    if options.get(QDQ_OFF) != "1" and int16_pair_sums() and int8_weight_dequantizes(model, beyond=PAIR_SAFE_CODE):
        return {**options, PRECISE: "1"}
    return dict(options)


def saturation_note(model: "onnx.ModelProto", options: dict[str, str] | None = None) -> str:
    """For a model run as it is, with `options` (one onnxq did not write: onnxruntime's own W8A8,
    say), a warning where exact_here would add PRECISE, else ''."""
    if PRECISE in exact_here(model, options or {}):
        return ("the candidate fuses INT8 weights into onnxruntime's u8 x s8 kernels, which add pairs of products "
                "in int16 on this CPU (x86 without VNNI) and may saturate; it was run as a default session runs it "
                "(session.x64quantprecision=1 runs those layers exactly, at u8 x u8 speed)")
    return ""


def search_options(cfg: ConvertConfig) -> dict[str, str]:
    """The session entries of the searches' sessions: the target's, and PRECISE where the
    conversion writes INT8 8-bit weights into fused kernels that saturate on this CPU (exact_here)."""
    options = dict(cfg.rules.session_options)
    if options.get(QDQ_OFF) != "1" and not cfg.rules.u8_weights and int16_pair_sums():
        options[PRECISE] = "1"
    return options


def verify(c: Conversion) -> None:
    if not c.cfg.verify:
        return
    try:
        check_model(c.qmodel)
    except Exception as e:
        raise VerificationError(f"the quantized model fails onnx.checker: "
                                f"{str(e).splitlines()[0][:200]}") from None
    options = exact_here(c.qmodel, c.session_options)
    c.fidelity = fidelity(c.source, c.qmodel, c.held, options=options)
    if PRECISE in options:
        c.warnings.append(SATURATES)
    warn_fidelity(c)


def warn_fidelity(c: Conversion) -> None:
    """Say so when the held-out figures mean nothing (a constant reference) or are poor, and
    name the layers and activations that carry the error."""
    f = c.fidelity
    for name, m in f.outputs.items():
        if m.degenerate:
            c.warn(f"reference output '{name}' is constant on the {f.samples} held-out samples: its cosine and "
                   "SQNR say nothing (give --holdout-data with inputs that exercise the model)")
    poor = ((f.top1_agreement is not None and f.top1_agreement < POOR_AGREEMENT)
            or (f.sqnr_db is not None and f.sqnr_db < POOR_SQNR_DB))
    if not poor:
        return
    worst = sorted((lp for lp in c.plan.layers if lp.sqnr_db is not None), key=lambda lp: lp.sqnr_db)[:3]
    clipped = sorted(((a, st) for a, st in c.stats.acts.items() if a in c.plan.acts), key=lambda x: -clipped_share(
        c.plan.acts[x[0]], x[1]))[:3]
    hint = ("try --bits 8 or --bits-override for those layers" if any(lp.bits < 8 for lp in worst)
            else "the weights are already 8-bit: look at the activation ranges and at the held-out data")
    c.warn(f"fidelity is poor on the {f.samples} held-out samples ("
           + (f"top-1 agreement {f.top1_agreement:.3f}, " if f.top1_agreement is not None else "")
           + f"SQNR {f.sqnr_db:.1f} dB); layers with the lowest SQNR: "
           + ", ".join(f"{lp.target.node} ({lp.sqnr_db:.1f} dB at {lp.bits} bits)" for lp in worst)
           + ("; activations clipping most: " + ", ".join(
               f"{a} ({clipped_share(c.plan.acts[a], st):.2%})" for a, st in clipped) if clipped else "")
           + f"; {hint}")


def inspect(model: "str | os.PathLike", config: ConvertConfig | None = None) -> Inspection:
    """What `convert` would do with `model` under `config`, without calibrating: inputs and
    outputs, every quantizable layer with its bits, the layers and ops left in float and why."""
    c = Conversion(config or ConvertConfig())
    load(c, model)
    prepare_model(c)
    c.targets, c.skipped = targets_of(c)
    layers = []
    for t in c.targets:
        bits, _ = c.cfg.bits_for(t.node, t.depthwise)
        why = ("float: embedding lookup (weight-only)" if t.op == "Gather" else
               "quantized" if t.act and c.cfg.quantize_acts else
               "float: weight-only conversion" if t.act else
               "float: inside a Loop/Scan body (weight-only)" if t.graph else "float: not a float32 tensor")
        layers.append(LayerInfo(t.node, t.op, t.graph or "main", list(t.shape), t.params, bits, why))
    return Inspection(model=c.name, opset=c.src_opset, inputs=tensor_infos(c.source.graph.input, c.source),
                      outputs=tensor_infos(c.source.graph.output, c.source), layers=layers,
                      skipped=[SkippedReport(s.node, s.op, s.reason) for s in c.skipped],
                      float_ops=float_op_counts(c.prepared, {t.node for t in c.targets} | {s.node for s in c.skipped}),
                      target=c.cfg.target)


def save(model: "onnx.ModelProto", path: "str | os.PathLike", source: "str | os.PathLike | None" = None) -> None:
    """Write `model` atomically to `path` (refusing to overwrite `source`)."""
    save_model(model, check_output_path(path, source))
