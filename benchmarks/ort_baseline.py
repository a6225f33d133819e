"""Baseline: onnxruntime's own static quantizer (QDQ, per-channel, QUInt8 activations).

W8A8 uses QInt8 weights, W4A8 QInt4 weights. Two things are needed on these opset 11/12 PP-OCR
models that quantize_static does not do by itself (found with onnxruntime 1.31):

* per-channel weights need opset >= 13 (DequantizeLinear's `axis`); at opset 12 ORT writes a
  model that fails to load ("Unrecognized attribute: axis for operator DequantizeLinear"),
  so the model is converted to opset 13 first;
* int4 Q/DQ are standard ONNX only from opset 21, so W4 models are converted to opset 21
  (otherwise ORT falls back to com.microsoft-domain Q/DQ nodes; `opset=0` keeps the source opset).

The model goes through `quant_pre_process` first (shape inference plus ORT's basic graph
optimisations, e.g. BatchNormalization folded into Conv), as ORT recommends; see _pre_process.
MinMax calibration copes with feeds of different shapes; Percentile and Entropy do not (their
histogram collector stacks the per-sample arrays), so give those same-shape feeds.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}
WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}
ACT_TYPES = {8: QuantType.QUInt8, 16: QuantType.QUInt16}


class ListReader(CalibrationDataReader):
    """Calibration reader over an in-memory list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.pos = 0
        self.end = len(self.feeds)

    def get_next(self) -> dict | None:
        if self.pos >= self.end:
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, min(end_index, len(self.feeds))

    def rewind(self) -> None:
        self.pos, self.end = 0, len(self.feeds)


def _pre_process(src: Path, dst: Path) -> str:
    """quant_pre_process with the mildest settings that work: plain symbolic shape inference
    fails on all three PP-OCR models ("Incomplete symbolic shape inference"); auto_merge fixes rec
    and det, cls needs the symbolic pass skipped (ONNX shape inference + optimisation still run)."""
    last: Exception | None = None
    cwd = os.getcwd()
    os.chdir(dst.parent)  # a failed symbolic pass leaves sym_shape_infer_temp.onnx in the cwd
    try:
        for name, kw in (("symbolic", {}), ("symbolic+auto_merge", {"auto_merge": True}),
                         ("onnx-shapes-only", {"skip_symbolic_shape": True})):
            try:
                quant_pre_process(str(Path(src).resolve()), str(dst.resolve()), **kw)
                return name
            except Exception as e:  # noqa: BLE001 - ORT raises bare Exception here
                last = e
    finally:
        os.chdir(cwd)
    raise RuntimeError(f"quant_pre_process failed: {last}")


def ort_quantize(model_path: str | Path, out_path: str | Path, feeds: list[dict[str, np.ndarray]],
                 wbits: int, abits: int = 8, method: str = "minmax", preprocess: bool = True,
                 opset: int | None = None, info: dict | None = None,
                 op_types: tuple[str, ...] | None = None) -> float:
    """Quantize `model_path` to `out_path` with ORT's quantize_static; returns the seconds taken.

    opset: convert the model up to this opset first (default 13 for 8-bit weights, 21 for 4-bit).
    `info`, if given, receives how the model was pre-processed and the opset it was quantized at.
    `op_types`: quantize only these ops (onnxruntime's op_types_to_quantize; default: all it knows).
    """
    opset = (21 if wbits == 4 else 13) if opset is None else opset
    info = {} if info is None else info
    if wbits not in WEIGHT_TYPES or abits not in ACT_TYPES:
        raise ValueError(f"unsupported bits W{wbits}A{abits}")
    if method.lower() not in METHODS:
        raise ValueError(f"unknown calibration method '{method}'; known: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ortq.") as tmp:
        src = Path(model_path)
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            info["preprocess"] = _pre_process(src, pre)
            src = pre
        m = onnx.load(str(src))
        have = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        info["opset"] = max(have, opset)
        if have < opset:
            src = Path(tmp) / "opset.onnx"
            onnx.save(onnx.version_converter.convert_version(m, opset), str(src))
        del m
        quantize_static(str(src), str(out_path), ListReader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=ACT_TYPES[abits],
                        weight_type=WEIGHT_TYPES[wbits], calibrate_method=METHODS[method.lower()],
                        op_types_to_quantize=list(op_types) if op_types else None)
    return time.perf_counter() - t0
