"""Command line: thin wrappers over the Python API. Every failure is one line on stderr."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .algos.ranges import RANGE_METHODS
from .algos.weights import DEFAULT_DAMP, WEIGHT_METHODS
from .calib.data import PRESETS, Preprocess
from .config import DEFAULT_RANGE, ROTATE_BLOCK, ConvertConfig
from .plan.layers import TABLE_BLOCK
from .plan.rules import DEFAULT_TARGET
from .plan.rules import RULES as TARGETS
from .errors import ConfigError, InputModelError, OnnxqError, VerificationError

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 140)


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} takes comma-separated numbers, got '{text}'") from None


def _preprocess(preset, size, mean, std, layout, channel_order, resize=None) -> Preprocess | None:
    if preset is None and not any((size, mean, std, layout, channel_order, resize)):
        return None
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown --preprocess '{preset}'; known: {', '.join(PRESETS)}")
    base = PRESETS[preset or "imagenet"]
    kw = {}
    if size:
        hw = _floats(size.replace("x", ","), "--size")
        kw["size"] = (int(hw[0]), int(hw[-1]))
    if mean:
        kw["mean"] = _floats(mean, "--mean")
    if std:
        kw["std"] = _floats(std, "--std")
    if layout:
        kw["layout"] = layout.upper()
    if channel_order:
        kw["channel_order"] = channel_order.upper()
    if resize:
        kw["resize"] = resize
    return Preprocess(**{**base.__dict__, **kw})


LOG_EVERY_S = 5.0      # without a terminal, a stage's progress line at most this often


def _log_lines(log_file, verbose: bool = False):
    """Progress as plain timestamped lines (no terminal: a pipe, a CI job, a --log-file; on the
    terminal too with --verbose)."""
    import time

    last: dict[str, float] = {}
    sinks = [err] if (verbose or not err.is_terminal) else []
    if log_file is not None:
        sinks.append(Console(file=log_file, highlight=False, soft_wrap=True, no_color=True))

    def cb(stage: str, done: int, total: int) -> None:
        key = stage.split()[0]
        now = time.monotonic()
        if done in (1, total) or now - last.get(key, 0.0) >= LOG_EVERY_S:
            last[key] = now
            for s in sinks:
                s.print(f"{time.strftime('%H:%M:%S')} {escape(stage)} {done}/{total}", markup=True)
    return cb if sinks else None


def _progress(quiet: bool, log_file=None, verbose: bool = False):
    """(a rich bar or None, the progress callback): bars on a terminal, plain lines otherwise,
    with --verbose and in the --log-file; nothing with --quiet (the log file still gets its lines)."""
    plain = verbose or not err.is_terminal
    lines = _log_lines(log_file, verbose) if (log_file is not None or (not quiet and plain)) else None
    if quiet or plain:
        return None, lines
    bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def cb(stage: str, done: int, total: int) -> None:
        key = stage.split()[0]                 # "search loss 0.012": one bar, a changing label
        if key not in tasks:
            tasks[key] = bar.add_task(stage, total=total)
        bar.update(tasks[key], completed=done, description=stage)
        if lines:
            lines(stage, done, total)
    return bar, cb


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def _kb(n: int) -> str:
    return f"{n / 1e3:.1f} KB"


def _blocks_8bit(r) -> str:
    wide = sum(1 for q in r.quantized if q.bits == 8 and "blocks of" in q.method)
    return (f"  8-bit blocks: {_layers(wide)} with a scale per {r.config.get('block8') or r.config['block']} "
            f"values along K (a table: per {TABLE_BLOCK} along a row; --no-block-8bit: one per column), so the model "
            f"is opset {r.opset_after}")


def _print_blocks(r) -> None:
    if r.config.get("block_8bit"):
        out.print(_blocks_8bit(r))
    if r.rotated:
        out.print(f"  rotated: {len(r.rotated)} Gemm/MatMul inputs, a Hadamard matrix per {ROTATE_BLOCK} channels "
                  f"(onnxruntime rounds them to int8 per block; --no-rotate to leave them)")
    for q in r.quantized:
        if q.hot_rows:
            out.print(f"  hot rows: {q.hot_rows} rows of {escape(q.node)} read in calibration, corrected by a "
                      f"residual table from --protect's budget (--no-hot-rows to leave them)")


def print_summary(report) -> None:
    r = report
    by_bits = Counter(q.bits for q in r.quantized)
    out.print(f"[bold]onnxq[/] {escape(r.model)} (target {r.config.get('target', DEFAULT_TARGET)})")
    out.print("  quantized: " + (", ".join(f"{_layers(n)} at {b} bits" for b, n in sorted(by_bits.items()))
                                or "nothing"))
    reasons = Counter((s.op, s.reason) for s in r.skipped)
    for (op, why), n in sorted(reasons.items()):
        out.print(f"  left in float: {n} {op} — {escape(why)}")
    notes = Counter(q.note for q in r.quantized if q.note)
    for why, n in sorted(notes.items()):
        out.print(f"  note: {_layers(n)} — {escape(why)}")
    _print_search(r.search)
    _print_ranges(r.ranges)
    if r.rounding is not None:
        ro = r.rounding
        out.print(f"  low-bit rounding: {ro.chosen} (network loss on {ro.samples} unseen samples: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in ro.losses.items()) + ")")
    _print_protect(r.protect)
    _print_wide(r.wide)
    _print_sequential(r)
    _print_smoothing(r.smoothing)
    if r.shared_weights:
        out.print(f"  shared weights: {r.shared_weights} read by several layers, each stored once")
    _print_mixed(r.mixed)
    b = r.branches
    if b is not None and b.layers_with_branch:
        out.print(f"  low-rank branches: {_layers(b.layers_with_branch)}, {b.used_params} extra "
                  f"parameters ({b.used_params / max(r.params, 1):.2%} of the weights; budget "
                  f"{b.budget_params}), {_kb(b.bytes)} in the file")
    if b is not None and b.check_samples and b.divergence_final is not None:
        where = "the calibration samples they were fitted on" if b.check_fitted else \
            "calibration samples kept out of their statistics"
        out.print(f"  branches judged on {b.check_samples} {where}: {len(b.dropped)} dropped")
    weight_only = sum(1 for q in r.quantized if q.activation_bits >= 32)
    if weight_only:
        verb = "reads" if weight_only == 1 else "read"
        out.print(f"  weight-only: {_layers(weight_only)} {verb} a float input (see the report for why)")
    target = TARGETS[r.config.get("target", DEFAULT_TARGET)]
    if target.u8_weights_auto and any(q.bits == 8 for q in r.quantized):
        out.print("  8-bit weights: " + ("UINT8 with zero point 128 (u8 x u8 kernels, exact on x86 CPUs without VNNI)"
                                         if r.config["u8_weights"] else
                                         "INT8 (u8 x s8 kernels; --u8-weights for an x86 CPU without VNNI)"))
    _print_blocks(r)
    out.print(f"  size: {_mb(r.size_before)} -> {_mb(r.size_after)} "
              f"({r.size_before / max(r.size_after, 1):.1f}x smaller)")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items() if k != "total")
    out.print(f"  time: {r.seconds.get('total', 0):.1f} s ({stages}; {r.calib_samples} calibration samples)")
    f = r.fidelity
    if f.cosine is not None:
        parts = [f"cosine {f.cosine:.4f}", f"SQNR {f.sqnr_db:.1f} dB",
                 f"top-1 agreement {f.top1_agreement:.3f}" if f.top1_agreement is not None else ""]
        out.print(f"  fidelity on {f.samples} held-out samples: " + ", ".join(p for p in parts if p))
    out.print("  onnxruntime session: " + (", ".join(f"{k}={v}" for k, v in r.session_options.items())
                                         or "default options (every weight runs on a fused kernel)"))
    for w in r.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}")


def _print_search(sr) -> None:
    if sr is None:
        return
    out.print(f"  lapq: {sr.tensors} ranges searched in {sr.evaluations} evaluations; calibration "
              f"loss {sr.start_loss:.4g} (default ranges) -> {sr.loss_before:.4g} (best single "
              f"method: {sr.start}) -> {sr.loss_after:.4g} (joint search); kept: {sr.kept}"
              + (f" (lowest loss on {sr.check_samples} samples the search did not fit)"
                 if sr.check_samples else ""))


def _print_ranges(ch) -> None:
    if ch is None:
        return
    if ch.chosen:
        out.print(f"  activation ranges: {ch.chosen} (network loss on calibration samples: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in ch.methods.items()) + ")")
        return
    verdict = (f"{len(ch.changed)} changed from the default" if ch.kept else
               "kept the default everywhere" + (" (the changes did not help on samples they were not chosen on)"
                                               if ch.changed else ""))
    out.print(f"  activation ranges chosen per tensor: {ch.tried} of {ch.tensors} tried in {ch.evaluations} "
              f"evaluations; {verdict}")


def _print_smoothing(items) -> None:
    done = [s for s in items if s.alpha is not None]
    if items:
        out.print(f"  smoothing: {len(done)} of {len(items)} Gemm/MatMul/conv inputs smoothed"
                  + (f" (their layers' quantized output error cut to "
                     f"{sum(s.error_after / s.error_before for s in done) / len(done):.0%} on average)"
                     if done else ""))


def _print_protect(p) -> None:
    if p is None:
        return
    if p.protected or p.per_channel:
        flat = f", {_layers(len(p.per_channel))} per channel instead of blocked" if p.per_channel else ""
        out.print(f"  protected: {_layers(len(p.protected))} kept at 8 bits{flat} (+{_kb(p.used_bytes)} of "
                  f"{_kb(p.budget_bytes)} allowed, blocks included; rule: {p.rule}); network loss on unseen samples "
                  f"{p.check_before:.4g} -> {p.check_after:.4g}")
    else:
        out.print("  protected: none (" + ("did not help on samples it was not chosen on)" if p.check_before
                                             is not None else "no layer's harm paid for its bytes)"))


def _print_sequential(r) -> None:
    """How many layers sequential mode coded again (their methods end in "+compensated (share)")."""
    if not r.config.get("sequential"):
        return
    shares = [float(m.group(1)) for q in r.quantized if (m := re.search(r"\+compensated \((\d+)%\)", q.method))]
    n = r.config.get("stages")
    out.print(f"  sequential: {_layers(len(shares))} coded again on their quantized input, "
              + (f"in at most {n} stages" if n else "in stages of whole levels of layers")
              + (f", {sum(shares) / len(shares):.0f}% of the compensation kept on average (judged on held-out "
                 "samples)" if shares else ""))


def _print_wide(w) -> None:
    if w is None or w.budget < 1:
        return
    if w.widened:
        out.print(f"  activations kept at 16 bits: {len(w.widened)} of {w.tensors} (at most {w.budget}); "
                  f"network loss on unseen samples {w.check_before:.4g} -> {w.check_after:.4g}"
                  + (f"; the layers they touch, {w.unfused:.1%} of the multiply-adds, run without integer kernels"
                     if w.unfused is not None else "") + _over_budget(w))
    else:
        out.print("  activations kept at 16 bits: none (" + ("did not help on samples it was not chosen on)"
                                                          if w.check_before is not None else
                                                          "no tensor's rounding cost the network enough)") + _over_budget(w))


def _over_budget(w) -> str:
    return (f"; {w.over_budget} not weighed (each alone would take more than the target's share of the "
            "multiply-adds off integer kernels)" if w.over_budget else "")


def _print_mixed(mx) -> None:
    if mx is None:
        return
    chosen = Counter(mx.layers.values())
    out.print(f"  mixed precision ({mx.allocator}): average {mx.avg_bits:.2f} bits; "
              + ", ".join(f"{_layers(n)} at {b}" for b, n in sorted(chosen.items(), reverse=True))
              + f"; output divergence predicted {mx.predicted_divergence:.4g}, measured "
              f"{mx.measured_divergence:.4g}")


def print_layers(report) -> None:
    t = Table(title="layers", show_lines=False)
    for c in ("node", "op", "bits", "method", "SQNR dB", "RTN dB", "rank", "+branch dB", "activation"):
        t.add_column(c)
    f = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    acts = {a.tensor: a for a in report.activations}
    for q in report.quantized:
        a = acts.get(q.activation)
        act = (f"{'int' if a.signed else 'uint'}{a.bits} [{a.range[0]:.4g}, {a.range[1]:.4g}]"
               if a is not None else "float")
        t.add_row(escape(q.node), q.op, str(q.bits), q.method, f(q.sqnr_db), f(q.sqnr_rtn_db),
                  str(q.branch_rank or ""), f(q.sqnr_with_branch_db), act)
    out.print(t)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxq")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx, debug):
    """Quantize FP32 ONNX models to INT8/INT4 QDQ models that keep their answers.

    \b
    Typical use:
      onnxq convert model.onnx -o model.q.onnx --bits 4 --calib calib/
      onnxq eval model.onnx model.q.onnx --data held_out/
    """
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, format="%(message)s")


def _preprocess_options(f):
    for opt in reversed([
        click.option("--preprocess", "preset", metavar="NAME",
                     help=f"Image preprocessing preset for image folders: {', '.join(PRESETS)}."),
        click.option("--size", help="Image size HxW, e.g. 224x224 (default: the model's input size)."),
        click.option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406 (after /255)."),
        click.option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                     help="Input layout (default NCHW)."),
        click.option("--channel-order", type=click.Choice(["RGB", "BGR"], case_sensitive=False),
                     help="Channel order (default RGB)."),
        click.option("--resize", type=click.Choice(["crop", "letterbox", "stretch"]),
                     help="crop (default: aspect kept, centre crop, for classifiers), letterbox (aspect kept, "
                          "grey padding, for detectors) or stretch."),
    ]):
        f = opt(f)
    return f


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model (default: MODEL with suffix .q.onnx). Written atomically.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True, help="Weight bits: 2, 3, 4 or 8.")
@click.option("--act-bits", type=click.Choice(["4", "6", "8", "16", "32"]), default="8", show_default=True,
              help="Activation bits: 4, 6 (8-bit containers, narrow range), 8, 16, or 32 for weight-only.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: folder of per-sample .npz, one .npz with a leading sample "
                   "axis, or an image folder (with --preprocess). Without it: random data.")
@click.option("--calib-size", type=click.IntRange(min=1), default=256, show_default=True, help="Most samples used.")
@click.option("--holdout-data", type=click.Path(path_type=Path),
              help="Separate samples for the fidelity check (default: the last few calibration samples).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of all sampling: the same input, data and seed give the same bytes.")
@click.option("--weight-method", metavar="NAME",
              help=f"{' | '.join(WEIGHT_METHODS)} | auto (gptq and mse both tried at low bits, the one the "
                   "network prefers on unseen calibration samples kept) (default: gptq at <=4 bits; at 8 bits "
                   "gptq for convs, and for Gemm/MatMul where their weights are blocked (--block-8bit) and held "
                   "in memory, mse for the rest).")
@click.option("--damp", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_DAMP, show_default=True,
              help="gptq: damping added to H, a fraction of its mean diagonal. Smaller follows the "
                   "calibration data more closely, larger is safer with little or unrepresentative "
                   "data (docs/experiments/weights.md).")
@click.option("--act-method", metavar="NAME",
              help=f"{' | '.join(RANGE_METHODS)} | best (the one of percentile:99.99, percentile:99.999, mse the network prefers) | auto (one method "
                   "per tensor, by its measured effect on the outputs) | lapq (joint loss-aware search); percentile:P, lp:P, interval:EPS take a parameter "
                   f"(default: {DEFAULT_RANGE}; auto at W8A8 under --target ort-cpu, whose full node units "
                   f"round many more tensors; interval at 4 and 6 activation bits). Under best, auto and lapq the last two layers "
                   "ahead of a Sigmoid that reaches an output (a detector's class branch) take twice their min-max range.")
@click.option("--search-evals", type=click.IntRange(min=0), default=120, show_default=True,
              help="lapq: network-loss evaluations at most.")
@click.option("--search-samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="lapq: calibration samples the search fits; the next as many check it (fewer "
                   "overfit: dozens of ranges on 16 samples lost on held-out data).")
@click.option("--act-symmetric", is_flag=True, help="Symmetric int activations instead of uint.")
@click.option("--depthwise-bits", type=click.Choice(["2", "3", "4", "8"]), default="8", show_default=True,
              help="Bits of depthwise convs (tiny, and the most sensitive to rounding).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave matching nodes in float (repeatable).")
@click.option("--no-bias-correction", is_flag=True, help="Do not correct the output mean shift.")
@click.option("--sequential/--no-sequential", default=None,
              help="After the one-pass plan, code the layers again stage by stage in graph order, each stage's "
                   "first layers on the input the partly quantized model feeds them, so they undo the error "
                   "upstream layers leave (as much of it as "
                   "holds on samples the fit did not see). Costs about one more calibration pass over the model "
                   "plus the layers' statistics. Default: on for W4A8 and other uniform low-bit weights with "
                   "8-bit activations or float ones (--act-bits 32) (docs/results.md, rounds 13-14 and 40), "
                   "off otherwise.")
@click.option("--stages", type=click.IntRange(min=1), default=None,
              help="Sequential mode in at most this many stages: only each stage's first layers are coded again. "
                   "Stages are whole levels of layers that never read each other's output, of about equal "
                   "weight count. Default: as many as layers (light consecutive levels share a stage; each "
                   "stage runs only the part of the model past the last one).")
@click.option("--protect", type=click.FloatRange(0, 1), default=None,
              help="At 4 bits and below: how much larger (fraction) the weights may be than uniform low bits "
                   "(one scale per output channel). The budget buys, layer by layer, the blocked scales and zero "
                   "points of --block (convs, Gemm/MatMul) or 8 bits (embedding tables too), the most measured "
                   "harm removed per byte first; a second choice pays every layer's blocks first and protects "
                   "with the rest. The one closer to FP32 on samples neither was chosen on is kept, if it beats "
                   "the conversion as planned there. Default: 0.18, or 0.28 where every layer reads a float "
                   "input (a sentence encoder: its file stays within 0.18x FP32; docs/results.md, rounds 44 "
                   "and 51). A table's hot rows (--hot-rows) are paid from it first.")
@click.option("--no-protect", is_flag=True, help="Uniform low-bit weights (same as --protect 0).")
@click.option("--protect-acts", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="8-bit activations (generic and ort-cpu targets): the share of them that may be kept at 16 "
                   "bits where rounding them costs the network most; kept only if it helps on samples it was "
                   "not chosen on. Runtimes without 16-bit kernels run their readers in float: under ort-cpu "
                   "only as many as leave at most 2% of the multiply-adds without integer kernels.")
@click.option("--no-protect-acts", is_flag=True, help="Every activation at --act-bits (same as --protect-acts 0).")
@click.option("--rank-budget", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Low-rank residual branches: extra parameters as a fraction of the weights "
                   "(0 = none). 0.02 measured best at 4 bits, 0.05 at 3 (docs/experiments/branches.md). "
                   "Roughly doubles conversion time.")
@click.option("--branch-init", default="whitened", show_default=True,
              help="Branch factors: whitened (minimise the layer output error) or svd (weight error).")
@click.option("--branch-bits", type=click.Choice(["8", "16", "32"]), default="8", show_default=True,
              help="Branch weight and middle-activation bits: 8, 16, or 32 (float).")
@click.option("--branch-weighting", default="network", show_default=True,
              help="Rank allocation: network (each layer's gains weighted by its measured effect on the "
                   "output, then branches that do not help end to end are dropped, judged on calibration "
                   "samples kept out of the statistics) or layer (layer output error only, no session runs).")
@click.option("--max-rank", type=click.IntRange(min=1), default=64, show_default=True,
              help="Highest rank any one layer's branch may take (with --exclude, a budget and "
                   "--max-rank 4 give exactly one layer a rank-4 branch).")
@click.option("--branch-refine", type=click.IntRange(0, 10), default=0, show_default=True,
              help="Joint refinement rounds of layers with a branch: re-round W - B·A, refit the branch "
                   "to what is left; kept only where the layer's output error falls.")
@click.option("--target", type=click.Choice(list(TARGETS)), default=DEFAULT_TARGET, show_default=True,
              help="Runtime the model is for; decides where Q/DQ go and the weight containers. "
                   + " ".join(f"{k}: {v.summary}." for k, v in TARGETS.items()))
@click.option("--quantize-attention", is_flag=True,
              help="Also 8-bit Q/DQ on both inputs of every MatMul of two activations (attention's Q.K^T "
                   "and A.V), ranges from the same calibration pass; off by default (MiniLM: "
                   "docs/results.md). Input-side targets only.")
@click.option("--block", type=click.Choice(["0", "32", "64", "128"]), default="32", show_default=True,
              help="2- to 4-bit weights: one scale per this many values along K of a Gemm/MatMul (a 32-bit "
                   "scale: +25% on its bytes at 32), and under --target generic per this many input channels "
                   "at each kernel tap of a conv (a 16-bit scale: +12.5%); 0: one per output channel. Counted "
                   "in --protect's budget. 8-bit weight-only layers too where --block-8bit applies, in blocks "
                   "of --block-8bit-size. "
                   "Measured: docs/results.md.")
@click.option("--block-8bit/--no-block-8bit", default=None,
              help="8-bit conversions: weight-only Gemm/MatMul weights and embedding tables take a scale per "
                   "16 values along K where every quantized layer is weight-only (the weights are the whole "
                   "error: all-MiniLM-L6-v2 W8A8 32.6 -> 34.7 dB held out, +7% bytes), else per --block; per "
                   "32 along a row of a table; the model is raised to opset 21. Default: where those layers "
                   "hold most of the weights (a transformer; 28 -> 31 dB), per column in a conv model.")
@click.option("--block-8bit-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Values along K per scale of the blocked 8-bit Gemm/MatMul weights (--block-8bit). Default: 16 "
                   "where every quantized layer is weight-only, else --block; 16 costs 4-6% latency against 32 "
                   "on a 3-layer encoder (docs/results.md, round 41).")
@click.option("--exact-matmuls", is_flag=True,
              help="Record that onnxruntime should run weight-only Gemm/MatMul on float inputs "
                   "(session.disable_quant_qdq: the weights dequantized once at load) instead of fusing them "
                   "into MatMulNBits, which rounds each input to int8 per block as it runs. The weights are "
                   "the same; `onnxq eval` and the report's check run it so, and the summary prints the entry. "
                   "all-MiniLM-L6-v2 W8A8 held out: 38.9-39.7 dB against 38.3-39.0 with the default rotated "
                   "inputs (--rotate) and 34.5-34.7 without; 1.05x FP32's latency instead of 0.58x (8 tokens) to "
                   "0.95x (32) (docs/results.md, rounds 42-43). Not under --target ort-cpu.")
@click.option("--rotate/--no-rotate", default=True, show_default=True,
              help="Conversions whose every layer is weight-only (a sentence encoder at W4A8, or at W8A8 with "
                   "blocked weights), under generic and ort-cpu: rotate each Gemm/MatMul input by a Hadamard matrix per 16 "
                   "channels (the weights by its transpose: the same function in float), so onnxruntime's "
                   "MatMulNBits, which rounds the input to int8 per block, is not held to the step of its "
                   "largest channel. all-MiniLM-L6-v2 held out: 34.5-34.7 -> 38.3-39.0 dB; the rotations cost 3-6% "
                   "of the latency at 8 tokens, ~10% at 32 (docs/results.md, round 43); at W4A8 retrieval agreement "
                   "0.885 -> 0.927 (round 44). Not with --exact-matmuls, whose inputs stay float.")
@click.option("--hot-rows/--no-hot-rows", default=True, show_default=True,
              help="Embedding tables at 4 bits and below: the rows calibration read (a text's common words) are "
                   "looked up once more in a small residual table, so they come out about as close as 8-bit "
                   "rows; paid from --protect's budget (none under --no-protect). Only where calibration read at "
                   "most a quarter of the table's rows. 3-layer MiniLM / all-MiniLM-L6-v2 W4A8 held out: see "
                   "docs/results.md, round 51.")
@click.option("--u8-weights/--int8-weights", default=None,
              help="8-bit conv/Gemm/MatMul weights as UINT8 with zero point 128 (onnxruntime's u8 x u8 kernels: "
                   "exact on every x86 CPU) or as INT8 (its u8 x s8 kernels and symmetric conv path: under "
                   "--target ort-cpu 1.2-2.3x faster on a VNNI CPU, but x86 CPUs without VNNI add pairs of "
                   "products in int16 and may saturate). Default: UINT8 under generic; under ort-cpu as the "
                   "CPU the conversion runs on wants (INT8 where it has VNNI or is not x86). Blocked 8-bit "
                   "weights (--block-8bit) are INT8 without zero points either way.")
@click.option("--zero-points/--no-zero-points", default=True, show_default=True,
              help="Blocked weights (--block) on affine grids: each block's codes span its own [min, max], "
                   "with a zero point (4 bits a block) beside its scale. Under --target generic and openvino, "
                   "and inside ort-cpu's MatMulNBits; tensorrt and qnn keep symmetric weights.")
@click.option("--no-smooth", is_flag=True,
              help="Leave Gemm/MatMul, pointwise- and depthwise-conv inputs as they are. By default a quantized "
                   "input with outlier channels (transformers; a conv after a BatchNorm, affine or squeeze-excite "
                   "block) is divided per channel by s and the weights it meets multiplied by s (exact in float), "
                   "where that halves the layers' quantized output error on samples not fitted on (a pointwise "
                   "conv's: cuts it 5 times). Convs only in 8-bit conversions, under --target generic, and under "
                   "ort-cpu where the division folds into the ops that make the input (no new node).")
@click.option("--avg-bits", type=click.FloatRange(2, 8),
              help="Mixed precision: choose each layer's bits so the parameter-weighted average is at most this.")
@click.option("--max-size", help="Mixed precision: quantized weights at most this big, e.g. 2.5MB or 800KB.")
@click.option("--bit-choices", default="8,4,3,2", show_default=True, help="Candidate bits for mixed precision.")
@click.option("--bits-override", multiple=True, metavar="PATTERN=BITS",
              help="Per-layer weight bits by node-name pattern, e.g. 'conv1*=8' (repeatable).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write the full report: PATH.json as JSON plus a self-contained page PATH.html beside it "
                   "(charts of every layer and activation); a PATH ending in .html writes the page alone.")
@click.option("--save-stats", type=click.Path(path_type=Path), help="Save calibration statistics (.npz).")
@click.option("--load-stats", type=click.Path(path_type=Path), help="Reuse saved statistics instead of calibrating; they bring the smoothing and "
                   "input rotations they were collected under.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="Fail (exit 3, nothing written) below this top-1 agreement.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), help="Fail (exit 3, nothing written) below this output cosine.")
@click.option("--layers", "show_layers", is_flag=True, help="Print a per-layer table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary (warnings and errors still print).")
@click.option("-v", "--verbose", is_flag=True,
              help="Timestamped progress lines, each stage's time and decisions as they happen, and the per-layer table.")
@click.option("--log-file", type=click.File("a"), help="Also append timestamped progress lines to this file.")
@_preprocess_options
def convert(model, output, calib, holdout_data, report_path, save_stats, load_stats, min_agreement,
            min_cosine, show_layers, quiet, verbose, log_file, **opts):
    """Quantize MODEL and write a QDQ ONNX model."""
    if not Path(model).exists():
        raise InputModelError(f"input model not found: {model}")
    pre = _preprocess(*(opts.pop(k) for k in ("preset", "size", "mean", "std", "layout", "channel_order", "resize")))
    cfg = _config(opts)
    # the conversion's modules (onnx, onnxruntime: about a second) load once the options are known good
    from . import api
    from .graph.io import check_output_path

    output = output or model.with_suffix(".q.onnx")
    check_output_path(output, model)
    for extra in (report_path, report_path and report_path.with_suffix(".html"), save_stats):
        if extra:
            check_output_path(extra, model)
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose contradict each other: give one")
    if verbose:
        _verbose_log()
        show_layers = True
    bar, cb = _progress(quiet, log_file, verbose)
    if bar:
        bar.start()
    try:
        qmodel, report = api.convert(model, cfg, calib, preprocess=pre, holdout=holdout_data,
                                     stats=str(load_stats) if load_stats else None,
                                     save_stats=str(save_stats) if save_stats else None, progress=cb)
    finally:
        if bar:
            bar.stop()
    if report_path:          # written even when a fidelity gate below refuses the model
        _write_report(report_path, report)
    _gate(report.fidelity, min_agreement, min_cosine)
    api.save(qmodel, output, model)
    if not quiet:
        print_summary(report)
        if show_layers:
            print_layers(report)
        out.print(f"  wrote {escape(str(output))}")
    else:                    # -q hides the summary, never a warning
        for w in report.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}")


def _config(o: dict) -> ConvertConfig:
    """The ConvertConfig of the convert command's options."""
    return ConvertConfig(
        bits=int(o["bits"]), act_bits=int(o["act_bits"]), weight_method=o["weight_method"], act_method=o["act_method"],
        search_evals=o["search_evals"], search_samples=o["search_samples"], act_symmetric=o["act_symmetric"],
        calib_size=o["calib_size"], seed=o["seed"], depthwise_bits=int(o["depthwise_bits"]),
        exclude=tuple(o["exclude"]), damp=o["damp"], bias_correction=not o["no_bias_correction"],
        sequential=o["sequential"], stages=o["stages"], rank_budget=o["rank_budget"],
        protect=0.0 if o["no_protect"] else o["protect"],
        protect_acts=0.0 if o["no_protect_acts"] else o["protect_acts"],
        branch_init=o["branch_init"], branch_bits=int(o["branch_bits"]), branch_weighting=o["branch_weighting"],
        max_rank=o["max_rank"], branch_refine=o["branch_refine"], bits_overrides=_overrides(o["bits_override"]),
        avg_bits=o["avg_bits"], max_size=_size(o["max_size"]), target=o["target"],
        quantize_attention=o["quantize_attention"], smooth=not o["no_smooth"], block=int(o["block"]),
        zero_points=o["zero_points"], block_8bit=o["block_8bit"], u8_weights=o["u8_weights"],
        block8=int(o["block_8bit_size"]) if o["block_8bit_size"] else None, exact_matmuls=o["exact_matmuls"],
        rotate=o["rotate"], hot_rows=o["hot_rows"],
        bit_choices=tuple(int(b) for b in _floats(o["bit_choices"], "--bit-choices")))


def _gate(f, min_agreement: float | None, min_cosine: float | None) -> None:
    """Refuse the model (exit 3) when a requested fidelity is not met."""
    if min_agreement is not None and f.top1_agreement is None:
        raise VerificationError("--min-agreement needs a classifier-like first output (scores over classes "
                                "on the last axis); this model's is not: use --min-cosine; the model was not written")
    if min_agreement is not None and f.top1_agreement < min_agreement:
        raise VerificationError(f"top-1 agreement {f.top1_agreement:.4f} is below "
                                f"--min-agreement {min_agreement}; the model was not written")
    if min_cosine is not None and f.cosine is not None and f.cosine < min_cosine:
        raise VerificationError(f"output cosine {f.cosine:.4f} is below --min-cosine "
                                f"{min_cosine}; the model was not written")


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * mult)
            except ValueError:
                break
    raise ConfigError(f"--max-size takes a size like 2.5MB or 800KB, got '{text}'")


def _overrides(items) -> tuple[tuple[str, int], ...]:
    out = []
    for item in items:
        pattern, _, bits = item.rpartition("=")
        if not pattern or not bits.isdigit():
            raise ConfigError(f"--bits-override takes PATTERN=BITS, got '{item}'")
        out.append((pattern, int(bits)))
    return tuple(out)


def _verbose_log() -> None:
    """The onnxq logger's information lines (not its warnings: the summary prints those) on stderr."""
    log = logging.getLogger("onnxq")
    for h in [h for h in log.handlers if getattr(h, "onnxq_verbose", False)]:
        log.removeHandler(h)           # one handler however often convert runs in a process
    handler = logging.StreamHandler(sys.stderr)
    handler.onnxq_verbose = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(lambda rec: rec.levelno < logging.WARNING)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False          # the root handler (--debug) would print each line twice


def _write_text(path: Path, text: str) -> None:
    """Atomically (a temporary file renamed), readable like any file the user makes (umask)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=str(path.parent or "."), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def _write_json(path: Path, data) -> None:
    _write_text(path, json.dumps(data, indent=2, default=_jsonable))


def _write_report(path: Path, report) -> None:
    """PATH.html alone, or the JSON at PATH and the page beside it."""
    from .html import render

    data = json.loads(json.dumps(report.to_dict(), default=_jsonable))
    if path.suffix.lower() != ".html":
        _write_json(path, data)
    _write_text(path.with_suffix(".html"), render(data))


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True,
              help="Weight bits to show per layer (as convert would give them).")
@click.option("--act-bits", type=click.Choice(["4", "6", "8", "16", "32"]), default="8", show_default=True)
@click.option("--exclude", multiple=True, metavar="PATTERN", help="As in convert.")
@click.option("--bits-override", multiple=True, metavar="PATTERN=BITS", help="As in convert.")
@click.option("--target", type=click.Choice(list(TARGETS)), default=DEFAULT_TARGET, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_cmd(model, bits, act_bits, exclude, bits_override, target, as_json):
    """List MODEL's inputs, outputs and every quantizable layer by the name --exclude and
    --bits-override match, with what convert would do to it; and what stays float, and why."""
    from . import api

    if not Path(model).exists():
        raise InputModelError(f"input model not found: {model}")
    cfg = ConvertConfig(bits=int(bits), act_bits=int(act_bits), exclude=tuple(exclude),
                        bits_overrides=_overrides(bits_override), target=target)
    info = api.inspect(model, cfg)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(info), indent=2))
        return
    out.print(f"[bold]{escape(info.model)}[/] (opset {info.opset}; target {info.target})")
    for kind, values in (("input", info.inputs), ("output", info.outputs)):
        for v in values:
            out.print(f"  {kind} {escape(v.name)}: {v.dtype} {[d if d is not None else '?' for d in v.shape]}")
    t = Table(title=f"{len(info.layers)} quantizable layers")
    for c in ("node", "op", "graph", "weight", "params", "bits", "input"):
        t.add_column(c)
    for q in info.layers:
        t.add_row(escape(q.node), q.op, escape(q.graph), "x".join(map(str, q.weight_shape)), str(q.params),
                  str(q.bits), q.input)
    out.print(t)
    for s in info.skipped:
        out.print(f"  left in float: {escape(s.node)} ({s.op}) — {escape(s.reason)}")
    if info.float_ops:
        out.print("  other ops (float unless the target fuses them): "
                  + ", ".join(f"{k} {n}" for k, n in info.float_ops.items()))


@cli.command("eval")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Feeds: folder of .npz, one stacked .npz, or images with --preprocess.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the figures as JSON.")
@click.option("--labels", type=click.Path(path_type=Path),
              help="Ground-truth class per sample (.npy of ints) for a top-1 accuracy of both models.")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Timed runs for the latency figure.")
@click.option("--no-qdq-fusion", is_flag=True,
              help="Run CANDIDATE with onnxruntime's session.disable_quant_qdq = 1 whatever it was "
                   "made for (by default the session options recorded in an onnxq model are applied: "
                   "none for ort-cpu, this one for generic and openvino models whose weights a default "
                   "session would dequantize on every call).")
@_preprocess_options
def eval_cmd(reference, candidate, data, json_path, labels, runs, no_qdq_fusion, preset, size, mean, std, layout,
             channel_order, resize):
    """Fidelity of CANDIDATE against REFERENCE on the given feeds, sizes, and batch-1 latency at
    one thread and at all threads, both with the session options the candidate's target needs."""
    from .calib.data import open_source
    from .graph.io import input_specs, load_model
    from .verify import fidelity

    ref = load_model(reference)
    cand = load_model(candidate)
    loaders = open_source(data, input_specs(ref), _preprocess(preset, size, mean, std, layout, channel_order, resize))
    truth = _load_labels(labels, len(loaders)) if labels else None
    target, options = _run_options(cand, no_qdq_fusion)
    if target is None:
        from .api import saturation_note
        if note := saturation_note(cand, options):
            err.print(f"[yellow]warning:[/] {escape(note)}")
    fid = fidelity(ref, cand, loaders, labels=truth, options=options)
    res = {"reference": str(reference), "candidate": str(candidate), "fidelity": dataclasses.asdict(fid),
           "size_reference": reference.stat().st_size, "size_candidate": candidate.stat().st_size,
           "candidate_target": target, "candidate_session_options": options,
           **_latencies(ref, cand, loaders[0](), runs, options)}
    t = Table(title=f"{escape(candidate.name)} vs {escape(reference.name)} on {fid.samples} samples")
    t.add_column("output")
    for c in ("cosine", "SQNR dB", "top-1 agree", "KL"):
        t.add_column(c, justify="right")
    for name, m in fid.outputs.items():
        t.add_row(escape(name), f"{m.cosine:.5f}", f"{m.sqnr_db:.2f}",
                  f"{m.top1_agreement:.4f}" if m.top1_agreement is not None else "",
                  f"{m.kl:.5f}" if m.kl is not None else "")
    out.print(t)
    out.print(f"size: {_mb(res['size_reference'])} -> {_mb(res['size_candidate'])}")
    out.print(f"candidate target: {target or 'not an onnxq model'}; session options: "
              + (", ".join(f"{k}={v}" for k, v in options.items()) or "none"))
    for n in sorted({1, res["threads_all"]}):
        r, c = res[f"latency_ms_reference_{n}t"], res[f"latency_ms_candidate_{n}t"]
        out.print(f"latency at batch 1, {n} thread{'s' if n > 1 else ''}: {r:.2f} ms -> {c:.2f} ms "
                  f"({c / max(r, 1e-9):.2f}x)")
    if fid.accuracy_reference is not None:
        out.print(f"top-1 accuracy against --labels: {fid.accuracy_reference:.4f} (reference) -> "
                  f"{fid.accuracy_candidate:.4f} (candidate)")
    if json_path:
        _write_json(json_path, res)


def _run_options(model, no_qdq_fusion: bool) -> tuple[str | None, dict[str, str]]:
    """(target, onnxruntime session options) a candidate runs with on the CPU provider."""
    from .api import run_options

    target, options = run_options(model)
    if no_qdq_fusion:
        options["session.disable_quant_qdq"] = "1"
    return target, options


def _latencies(ref, cand, feed: dict, runs: int, options: dict[str, str]) -> dict:
    """Batch-1 medians of both models at one thread and at all threads, alternated model by model."""
    import os

    from .runtime import latency_ms

    res: dict = {"threads_all": os.cpu_count() or 1}
    for n in sorted({1, res["threads_all"]}):
        res[f"latency_ms_reference_{n}t"] = latency_ms(ref, feed, runs, threads=n)
        res[f"latency_ms_candidate_{n}t"] = latency_ms(cand, feed, runs, threads=n, options=options)
    return res


def _load_labels(path: Path, n: int):
    import numpy as np

    try:
        y = np.load(path, allow_pickle=False).reshape(-1)
    except Exception as e:
        raise ConfigError(f"--labels {path}: not a readable .npy file ({e})") from None
    if y.shape[0] != n or y.dtype.kind not in "iu":
        raise ConfigError(f"--labels {path}: need {n} integer labels, got {y.shape[0]} of {y.dtype}")
    return y


def main() -> None:
    import signal

    import warnings

    debug = "--debug" in sys.argv
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not debug:            # numpy's overflow notes are not for users: what matters is raised as an error
        warnings.simplefilter("ignore", RuntimeWarning)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("onnxq: interrupted")
        sys.exit(130)
    except click.ClickException as e:
        err.print(f"onnxq: error: {_one_line(e.format_message())}")
        sys.exit(e.exit_code)
    except OnnxqError as e:
        err.print(f"onnxq: error: {_one_line(str(e))}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("onnxq: interrupted; nothing was written")
        sys.exit(130)
    except Terminated:
        err.print("onnxq: terminated; nothing was written")
        sys.exit(143)
    except Exception as e:  # the last line of defence: one line, not a traceback
        if debug:
            raise
        err.print(f"onnxq: internal error: {type(e).__name__}: {_one_line(str(e))} "
                  "(rerun with --debug for the traceback and report it)", soft_wrap=True)
        sys.exit(1)


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that the same clean-up as Ctrl-C runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _one_line(text: str) -> str:
    """The first line of a message, with rich markup in it shown as text (paths may hold '[')."""
    return escape(text.strip().splitlines()[0] if text.strip() else "")


if __name__ == "__main__":
    main()
