"""Benchmarks measure this checkout's code: refuse to run on another copy of onnxq.

A CI run (`bash .ci/run`) installs a copy of the package into site-packages; a benchmark started
afterwards, and the `python -m onnxq` children it starts from other folders, would then measure
that copy, not the working tree (a 25-minute large-model run and a baseline were lost this way)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def require_checkout() -> None:
    import onnxq

    here = Path(onnxq.__file__).resolve().parent
    if here != ROOT / "onnxq":
        sys.exit(f"benchmarks: onnxq is imported from {here}, not from this checkout ({ROOT}); "
                 f"run `pip install -e .` in {ROOT} first")
