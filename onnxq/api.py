"""convert(): load -> prepare -> targets -> collect -> plan -> rewrite -> verify."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Sequence

import onnx

from .calib.collect import collect, session
from .calib.data import Feed, Preprocess, open_source, random_feeds
from .config import ConvertConfig
from .errors import InputModelError, VerificationError
from .graph.io import check_model, check_output_path, input_specs, load_model, opset_of, save_model
from .graph.prepare import prepare
from .graph.rewrite import apply_plan, upgrade_opset
from .graph.tidy import tidy
from .graph.targets import find_targets, initializer_array
from .planner import make_plan, plan_acts
from .report import build_report
from .lapq import lapq_search
from .mixed import choose_bits
from .probe import Probe
from .sequential import sequential_layers
from .types import Report, Stats
from .verify import fidelity

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
RANDOM_SAMPLES = 16
PROBE_SAMPLES = 16  # samples the branch planner's network probe runs


def _needed_opset(cfg: ConvertConfig) -> int:
    low = (cfg.bits <= 4 or any(b <= 4 for _, b in cfg.bits_overrides) or cfg.act_bits == 16
           or (cfg.mixed and min(cfg.bit_choices) <= 4))
    return 21 if low else 13


def _split(loaders: list, cfg: ConvertConfig, holdout_source) -> tuple[list, list, list[str]]:
    """Calibration loaders and held-out loaders."""
    notes = []
    if holdout_source is not None:
        return loaders[:cfg.calib_size], holdout_source, notes
    n = len(loaders)
    h = cfg.holdout if cfg.holdout is not None else (min(16, max(1, n // 8)) if n > 1 else 0)
    h = min(h, n - 1)
    if h <= 0:
        notes.append("only one calibration sample: fidelity is measured on that same sample")
        return loaders[:cfg.calib_size], loaders[:1], notes
    return loaders[:n - h][:cfg.calib_size], loaders[n - h:], notes


def convert(model: str | os.PathLike | onnx.ModelProto, config: ConvertConfig | None = None,
            calib: str | os.PathLike | Sequence[Feed] | None = None, *,
            preprocess: Preprocess | None = None,
            holdout: str | os.PathLike | Sequence[Feed] | None = None,
            stats: Stats | str | None = None, save_stats: str | None = None,
            progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    """Quantize `model` (a path or a ModelProto, never modified) and return (model, report)."""
    cfg = config or ConvertConfig()
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    if isinstance(model, onnx.ModelProto):
        source, name = model, model.graph.name or "model"
        if opset_of(source) < 11:
            raise InputModelError(f"model uses opset {opset_of(source)}; onnxq needs 11 or newer")
    else:
        source, name = load_model(model), str(model)
    src_opset = opset_of(source)
    prepared, prep_info = prepare(source)
    prepared = upgrade_opset(prepared, _needed_opset(cfg))
    specs = input_specs(prepared)
    targets, skipped = find_targets(prepared, cfg)
    warnings: list[str] = []
    if calib is None:
        warnings.append("no calibration data given: using random inputs, so the fidelity figures "
                        "say nothing about real data — pass --calib")
        log.warning(warnings[-1])
        loaders = random_feeds(specs, RANDOM_SAMPLES, cfg.seed)
    else:
        loaders = open_source(calib, specs, preprocess)
    held = open_source(holdout, specs, preprocess) if holdout is not None else None
    cal, held, notes = _split(loaders, cfg, held)
    warnings += notes
    secs["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if isinstance(stats, str):
        stats = Stats.load(stats)
    if stats is None:
        cb = (lambda d, n: progress("calibrate", d, n)) if progress else None
        stats = collect(prepared, targets, cal, hessians=True, rows_per_sample=cfg.rows_per_sample,
                        seed=cfg.seed, progress=cb)
    if save_stats:
        stats.save(save_stats)
    secs["calibrate"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    weights = {t.node: initializer_array(prepared, t.graph, t.weight) for t in targets}
    biases = {t.node: initializer_array(prepared, t.graph, t.bias) for t in targets if t.bias}
    cb = (lambda d, n: progress("quantize", d, n)) if progress else None
    layers, layer_stats = None, stats.layers
    mixed_info: dict = {}
    if cfg.mixed:
        overrides, mixed_info = choose_bits(prepared, targets, weights, biases, stats.layers, cal, cfg,
                                            progress)
        if mixed_info["used_bits"] > mixed_info["budget_bits"]:
            warnings.append(f"the size budget cannot be met: even the smallest bit choice takes "
                            f"{mixed_info['used_bits'] / 8:.0f} bytes of weights against "
                            f"{mixed_info['budget_bits'] / 8:.0f}; the smallest was used")
            log.warning(warnings[-1])
        cfg = dataclasses.replace(cfg, bits_overrides=overrides + cfg.bits_overrides,
                                  depthwise_bits=min(cfg.bit_choices))
    if cfg.sequential_on and any(t.act for t in targets):
        layers = sequential_layers(prepared, targets, cal, stats, weights, biases, cfg, progress)
    act_plan = plan_acts(stats.acts, cfg)
    probe = None
    if cfg.rank_budget > 0:
        # the probe carries the activation QDQ the emitted model will have: a branch is judged
        # on the network the user gets, not on a float one
        probe = Probe(prepared, targets, weights, cal[:PROBE_SAMPLES], biases, act_plan)
    plan = make_plan(targets, weights, biases, layer_stats, stats.acts, cfg, progress=cb,
                     layers=layers, probe=probe, act_plan=act_plan)
    search_info: dict = {}
    if cfg.act_method_name == "lapq" and plan.acts:
        n = cfg.search_samples
        feeds = [load() for load in cal[:n]]
        check = [load() for load in cal[n:2 * n]]        # calibration samples the search does not fit
        ref_sess = session(prepared)
        reference = [ref_sess.run(None, f) for f in feeds]
        check_ref = [ref_sess.run(None, f) for f in check]
        plan.acts, search_info = lapq_search(prepared, plan, stats.acts, feeds, reference, cfg, progress,
                                             check, check_ref)
    qmodel = tidy(apply_plan(prepared, plan))
    qmodel.producer_name, qmodel.producer_version = "onnxq", _version()
    secs["quantize"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    fid: dict = {}
    if cfg.verify:
        try:
            check_model(qmodel)
        except Exception as e:
            raise VerificationError(f"the quantized model fails onnx.checker: "
                                    f"{str(e).splitlines()[0][:200]}") from None
        fid = fidelity(source, qmodel, held)
    secs["verify"] = time.perf_counter() - t3
    secs["total"] = time.perf_counter() - t0
    report = build_report(name, cfg, plan, targets, skipped, stats, source, qmodel, fid, secs,
                          warnings, prep_info, src_opset, len(cal), len(held))
    report.mixed = mixed_info
    report.search = search_info
    return qmodel, report


def _version() -> str:
    from . import __version__
    return __version__


def save(model: onnx.ModelProto, path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Write `model` atomically to `path` (refusing to overwrite `source`)."""
    save_model(model, check_output_path(path, source))
