"""The one place that imports onnxruntime: CPU sessions and latency."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .errors import RuntimeModelError
from .graph.large import is_large, weights_folder, without_basepath, write_external

if TYPE_CHECKING:
    import onnx

THREADS = 2            # intra-op threads of every session onnxq runs
LOG_FATAL_ONLY = 4     # onnxruntime's own log lines never reach the user's terminal: its errors
                       # come back as exceptions, which onnxq turns into one line
ort.set_default_logger_severity(LOG_FATAL_ONLY)
QDQ_OFF = "session.disable_quant_qdq"   # no QDQ fusions: weight DequantizeLinear nodes fold at load
# INT8 weights of fused integer kernels rewritten as UINT8 at load, so u8 x u8 kernels run them; the
# rewrite happens only on x86 CPUs (where onnxruntime's u8 x s8 and u8 x u8 kernels differ)
PRECISE = "session.x64quantprecision"
# session config entries every session made in the current scope takes (run_as)
_RUN_AS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("run_as", default={})


@contextlib.contextmanager
def run_as(options: dict[str, str] | None):
    """Inside, every session takes these session config entries (a target's, plan/rules.py)
    unless it is given its own: the searches of a conversion then run the partly quantized
    model the way the target's runtime runs the result. Under `generic`, onnxruntime's QDQ
    fusions are off, so weight DequantizeLinear nodes are folded at load instead of running on
    every evaluation (an unrolled BiLSTM dequantized its shared weights 40 times a run: 12-18x the
    float model's time; docs/results.md, round 26)."""
    token = _RUN_AS.set(dict(options or {}))
    try:
        yield
    finally:
        _RUN_AS.reset(token)


def session(model: "onnx.ModelProto | bytes | str", threads: int = THREADS,
            qdq_fusion: bool = True, options: dict[str, str] | None = None) -> ort.InferenceSession:
    """A CPU session with the given session config entries. Without `qdq_fusion` onnxruntime
    skips its QDQ fusions and so constant-folds weight DequantizeLinear nodes at load (what
    input-side Q/DQ placement runs best with on this provider)."""
    so = ort.SessionOptions()
    entries = {**_RUN_AS.get(), **(options or {})}
    if not qdq_fusion:
        entries["session.disable_quant_qdq"] = "1"
    for key, value in entries.items():
        so.add_session_config_entry(key, value)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = LOG_FATAL_ONLY
    try:
        if isinstance(model, (bytes, str)):
            return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        if not is_large(model):
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        # a large model's quantized weights stay quantized in memory (dequantized per run, not
        # constant-folded to float at load): memory, not speed, is what bounds a large model.
        # onnxruntime's default order runs every weight's DequantizeLinear first (they read only
        # constants), so all the dequantized weights were alive at once: 2.4x the float weights
        # on a 4-bit stack. Priority order runs each one next to its reader: 0.3x.
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        light = {"providers": ["CPUExecutionProvider"], "disabled_optimizers": ["ConstantFolding"]}
        folder = weights_folder(model)
        if folder is not None:           # weights left on disk: read from their own folder
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            return ort.InferenceSession(without_basepath(model).SerializeToString(), so, **light)
        with tempfile.TemporaryDirectory(prefix="onnxq-") as d:   # read at load, removed right after
            return ort.InferenceSession(str(write_external(model, d, "m.onnx")), so, **light)
    except RuntimeModelError:
        raise
    except Exception as e:   # onnxruntime raises its own types; one line says what it found
        raise RuntimeModelError(f"onnxruntime cannot load the model: {_first_line(e)}") from None


def owned(values) -> list[np.ndarray]:
    """Copies of a session's outputs that own their memory. An array onnxruntime's `run` returns
    holds memory of the session that made it; one kept while later sessions come and go kept every
    such session's memory alive (sequential mode on an 800 x 608 detector: 13.9 GB, not 3.5)."""
    return [np.array(v) for v in values]


def give_back_memory() -> None:
    """Hand freed heap pages back to the system. glibc keeps what a dropped session or a large
    intermediate freed, so a large model's next stage would start from the last one's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to do
        pass


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(" : ", 2)[-1][:240]


def latency_ms(model: "onnx.ModelProto | bytes | str", feed: dict, runs: int = 30, warmup: int = 5,
               qdq_fusion: bool = True, threads: int = THREADS, options: dict[str, str] | None = None) -> float:
    """Median wall time of one run at the given feed (onnxruntime CPU)."""
    return median_ms(session(model, threads, qdq_fusion, options), feed, runs, warmup)


def median_ms(sess: ort.InferenceSession, feed: dict, runs: int, warmup: int = 5) -> float:
    """Median wall time in ms of `runs` runs of an open session, after `warmup` untimed ones."""
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def default_session_graph(model: "onnx.ModelProto") -> bytes | None:
    """The graph onnxruntime's CPU provider runs for `model` in a session with default options
    (QDQ fusions on), serialized (its basic and extended rewrites, not the layout ones, which are
    hardware specific); None for a model too large to serialize in one piece, or one it cannot
    load (verify says so; a measurement does not end the conversion)."""
    if is_large(model):
        return None
    so = ort.SessionOptions()
    so.log_severity_level = LOG_FATAL_ONLY
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory(prefix="onnxq-") as d:
        so.optimized_model_filepath = os.path.join(d, "runs.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception:   # onnxruntime raises its own types
            return None
        with open(so.optimized_model_filepath, "rb") as f:
            return f.read()
