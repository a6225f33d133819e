"""A sentence encoder's retrieval agreement on a data set's whole sentence pool less its 64
calibration sentences (set a: 655 licence sentences, set b: 6730 docstring sentences), for each
configuration, judged in the session each file records: the 400-sentence draws of generalise.py
move by a sentence or two, the pools by fractions of that.

    python benchmarks/text_pool.py --model M --set a --seed 1 --configs 'w8=bits:8' 'w8n=bits:8,rotate:false'
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as g  # noqa: E402
import text_data  # noqa: E402
from checkout import require_checkout  # noqa: E402

import onnxq  # noqa: E402
from onnxq import runtime  # noqa: E402

SOURCES = {"a": "licences", "b": "docs"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="M", choices=[k for k, v in g.MODELS.items() if v["kind"] == "text"])
    ap.add_argument("--set", default="a", choices=sorted(SOURCES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--configs", nargs="+", required=True)
    a = ap.parse_args()
    require_checkout()
    names = [g.parse_config(c) for c in a.configs]
    spec = g.MODELS[a.model]
    path = g.model_path(spec)
    texts = text_data.sentences(SOURCES[a.set])
    inputs = tuple(i.name for i in onnx.load(str(path), load_external_data=False).graph.input)
    pick = set(g.text_calib_picks(a.model, len(texts), a.seed, 64))      # generalise.py's calibration draw
    cal = text_data.feeds([texts[i] for i in sorted(pick)], inputs)
    ev = text_data.feeds([t for i, t in enumerate(texts) if i not in pick], inputs)
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = [fp32.run(None, f) for f in ev]
    with tempfile.TemporaryDirectory(prefix="pool.") as tmp:
        for name in names:
            q, rep = onnxq.convert(str(path), onnxq.ConvertConfig(**g.CONFIGS[name]), calib=cal)
            dst = Path(tmp) / f"{name}.onnx"
            onnxq.save(q, dst)
            fid, db = g.judge(runtime.session(str(dst), options=rep.session_options), ev, ref, "text")
            print(f"{a.model} {a.set}{a.seed} {name:>10}: retrieval {fid:.4f} on {len(ev)} held-out sentences, "
                  f"{db:.1f} dB", flush=True)


if __name__ == "__main__":
    main()
