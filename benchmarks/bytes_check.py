"""Output-byte fingerprints of a fixed set of conversions, to show that a refactor changes
nothing: run before and after, compare the printed hashes (`--json` keeps them).

    python benchmarks/bytes_check.py --json before.json
    python benchmarks/bytes_check.py --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import onnxq  # noqa: E402
from onnxq import ConvertConfig  # noqa: E402
from checkout import require_checkout  # noqa: E402

CONFIGS = {
    "w8a8": dict(bits=8),
    "w4a8": dict(bits=4),
    "w3a8+branches": dict(bits=3, rank_budget=0.05),
    "w4a4-lapq": dict(bits=4, act_bits=4, act_method="lapq", search_evals=20, search_samples=8),
    "sequential": dict(bits=4, sequential=True),
    "mixed": dict(avg_bits=4.0),
    "weight-only": dict(bits=4, act_bits=32),
    "w3a8+svd-refine": dict(bits=3, rank_budget=0.05, branch_init="svd", branch_refine=1,
                            branch_weighting="layer"),
    "w4a8-nobiascorr": dict(bits=4, bias_correction=False),
}


def models():
    from builders import conv_zoo
    from realdata import ocr_path, silero_path
    digits = str(ROOT / "models" / "digits_cnn.onnx")
    calib = str(ROOT / "models" / "digits_calib")
    yield "digits", digits, calib, list(CONFIGS)
    yield "zoo", conv_zoo(np.random.default_rng(0)), None, ["w8a8", "w4a8", "w3a8+branches", "sequential",
                                                              "weight-only", "w3a8+svd-refine"]
    yield "cls", str(ocr_path("cls")), None, ["w8a8", "w4a8", "w3a8+branches", "mixed", "weight-only"]
    from realdata import silero_stream, speech_like
    _, feeds = silero_stream(silero_path(), speech_like(2.0, 0))
    yield "vad", str(silero_path()), feeds[::4], ["w8a8", "w4a8"]


def main() -> None:
    require_checkout()
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--compare")
    args = ap.parse_args()
    out = {}
    for name, model, calib, configs in models():
        for c in configs:
            q, _ = onnxq.convert(model, ConvertConfig(**CONFIGS[c]), calib)
            h = hashlib.sha256(q.SerializeToString()).hexdigest()[:16]
            out[f"{name}:{c}"] = h
            print(f"{name:8s} {c:18s} {h}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.compare:
        ref = json.loads(Path(args.compare).read_text())
        bad = [k for k in ref if out.get(k) != ref[k]]
        print("identical" if not bad else f"DIFFERENT: {bad}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
