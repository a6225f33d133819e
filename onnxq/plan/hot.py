"""Hot rows: the rows of a low-bit embedding table that calibration read, looked up once more in a
small residual table.

A 4-bit table row is about 22 dB from its float value. The rows a model reads most are the ones
every text repeats (a sentence encoder's common words and punctuation): a few hundred rows read in
64 calibration sentences are 72-82% of the tokens of sentences the calibration never saw. Each such
row's rounding error, W[r] - Ŵ[r], is coded again (on the table's own grid, or at 8 bits a row where
the lookup is made of plain ops: residual_bits) into a residual table R [n + 1, D] whose row 0 is
zero, and the lookup becomes

    y = Gather(Ŵ, ids) + Gather(R, Gather(map, ids))

where map [V] sends each hot row to its row of R and every other row to 0. A hot row then comes
out about as close as an 8-bit row, for 4.6 or 8.1 bits a value of R and 2 bytes a table row for the map.
Only where calibration read a small share of the table (a vocabulary, not a position table whose
every row the samples read), and only while --protect has a budget: R and the map are paid from it,
a quarter of it at most (search/protect.cap_hot_rows keeps the most read rows that fit).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..algos.matrix import dequantize_rows
from ..config import ConvertConfig
from ..types import HotRows, LayerPlan, Target

HOT_SHARE = 0.25     # a table gets hot rows where calibration read at most this share of its rows


def hot_rows(lp: LayerPlan, w: np.ndarray, reads: np.ndarray | None, cfg: ConvertConfig, plan_table,
             keep: int | None = None) -> HotRows | None:
    """The hot rows of table plan `lp` (float table `w` [V, D], `reads` [V] how often calibration
    read each row; `keep`: only that many, the most read), their residual planned by
    `plan_table(target, residual, cfg, bits)`; None where the table gets none."""
    t = lp.target
    if not (cfg.hot_rows and cfg.protect_on and lp.bits <= 4 and reads is not None and not t.graph):
        return None
    rows = np.flatnonzero(reads)
    if not len(rows) or len(rows) > HOT_SHARE * len(reads):
        return None
    if keep is not None:
        rows = np.sort(rows[np.argsort(-reads[rows], kind="stable")[:keep]])
    residual = np.zeros((len(rows) + 1, w.shape[1]), np.float64)
    residual[1:] = w[rows] - dequantize_rows(lp.codes[rows].astype(np.float64), lp.scales[rows])
    rt = Target(node=f"{t.node}/hot", op="Gather", graph=t.graph, weight=f"{t.node}/hot_rows", act=None,
                bias=None, weight_layout="rows", shape=residual.shape)
    return HotRows(rows=rows.astype(np.int64), plan=plan_table(rt, residual, cfg, residual_bits(lp, cfg)),
                   reads=reads[rows])


def residual_bits(lp: LayerPlan, cfg: ConvertConfig) -> int:
    """8 bits (one scale a row) where the lookup reads codes in plain ops (generic: a 4-bit blocked
    table's takes some 20 of them to unpack its nibbles and zero points, an 8-bit one's 4; a
    3-layer MiniLM at 8 tokens ran 7.5% slower with 4-bit residuals), else the table's own grid
    (onnxruntime's GatherBlockQuantized, or a DequantizeLinear folded at load)."""
    return 8 if cfg.rules.table_codes else lp.bits


HOT_NOTE = ", the rows read in calibration corrected by a residual table"


def with_hot(lp: LayerPlan, hot: HotRows | None) -> LayerPlan:
    """`lp` with hot rows `hot` (or none), its method saying so."""
    base = lp.method.removesuffix(HOT_NOTE)
    return dataclasses.replace(lp, hot=hot, method=base + (HOT_NOTE if hot is not None else ""))


def within(lp: LayerPlan, w: np.ndarray, cfg: ConvertConfig, cap: float, plan_table, weight_bytes) -> LayerPlan:
    """`lp` with at most `cap` bytes of hot rows: the most read rows that fit, or none where the
    map and one row do not (a small model's budget is not all spent on them)."""
    if lp.hot is None or hot_bytes(lp, weight_bytes) <= cap:
        return lp
    n = len(lp.hot.rows)
    per_row = weight_bytes(lp.hot.plan) / (n + 1)
    keep = int((cap - _map_bytes(lp)) // per_row) - 1
    if keep < 1:
        return with_hot(lp, None)
    reads = np.zeros(lp.target.shape[0], np.int64)
    reads[lp.hot.rows] = lp.hot.reads
    return with_hot(lp, hot_rows(lp, w, reads, cfg, plan_table, keep))


def add_hot(lp: LayerPlan, m: np.ndarray) -> np.ndarray:
    """The table [V, D] the lookup computes: `m` (the table's own codes, dequantized) with the hot
    rows' residuals added."""
    if lp.hot is None:
        return m
    h = lp.hot.plan
    out = np.array(m, dtype=np.float64, copy=True)
    out[lp.hot.rows] += dequantize_rows(h.codes.astype(np.float64), h.scales)[1:]
    return out


def map_dtype(n: int):
    """The map's integer type for n hot rows (row 0 of R is the cold rows')."""
    return np.uint16 if n < np.iinfo(np.uint16).max else np.int32


def hot_bytes(lp: LayerPlan, weight_bytes) -> float:
    """What the hot rows add to the file: the residual table and the map."""
    if lp.hot is None:
        return 0.0
    return weight_bytes(lp.hot.plan) + _map_bytes(lp)


def _map_bytes(lp: LayerPlan) -> int:
    """The map's bytes: one index a table row."""
    return lp.target.shape[0] * np.dtype(map_dtype(len(lp.hot.rows))).itemsize
