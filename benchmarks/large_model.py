"""A model over the 2 GiB protobuf limit, converted at W8 and W4 through the CLI: wall time, peak
RSS against the weights' bytes, the output's size, whether it runs in onnxruntime and agrees with
FP32, and whether any temporary file is left.

    python benchmarks/large_model.py --layers 152 --width 2048   # 2.55 GB (the default: 38 layers of 4096)
    python benchmarks/large_model.py --layers 4 --json out.json

The model is a stack of residual blocks x + tanh(x W + b) with random (seeded) weights scaled like a
trained layer's, written straight into external data (the builder never holds the whole model).
Each conversion runs in its own child process; its peak RSS comes from the kernel (wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import matmul_stack  # noqa: E402
from checkout import require_checkout  # noqa: E402


def samples(folder: Path, n: int, width: int, tokens: int, seed: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.savez(folder / f"s{i:03d}.npz", x=rng.standard_normal((1, tokens, width)).astype(np.float32))


def run_child(cmd: list[str]) -> tuple[int, float, float, str]:
    """Exit code, wall seconds, peak RSS in GB and the last line of stderr of one child process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()
    return p.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1e6, (tail[-1] if tail else "")


def leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("onnxq-*")}


def agreement(src: Path, out: Path, feed: dict) -> float:
    """Cosine between FP32's and the quantized model's outputs on one held-out feed."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    want = ort.InferenceSession(str(src), so).run(None, feed)[0].ravel()
    got = ort.InferenceSession(str(out), so).run(None, feed)[0].ravel()
    return float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got) + 1e-30))


def main() -> None:
    require_checkout()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=38)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--threshold", type=float, help="GB: lower onnxq's large-model threshold (default "
                    "1.8 GB) to measure the large-model path on a smaller stand-in")
    ap.add_argument("--json")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    a = ap.parse_args()
    work = Path(a.keep or tempfile.mkdtemp(prefix="large-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src, weight_bytes = matmul_stack(work, a.layers, a.width)
    samples(work / "calib", a.samples, a.width, a.tokens, 1)
    print(f"built {src} ({weight_bytes / 1e9:.2f} GB of weights) in {time.perf_counter() - t0:.0f} s", flush=True)
    feed = {"x": np.random.default_rng(99).standard_normal((1, a.tokens, a.width)).astype(np.float32)}
    rows = []
    for bits in (int(b) for b in a.bits.split(",")):
        before = leftovers()
        out = work / f"big.w{bits}.onnx"
        start = ["-m", "onnxq"] if a.threshold is None else [
            "-c", f"import sys, onnxq.graph.large as L; L.EXTERNAL_THRESHOLD = {int(a.threshold * 1e9)}; "
                  "from onnxq.cli import main; sys.argv[0] = 'onnxq'; main()"]
        cmd = [sys.executable, *start, "convert", str(src), "--bits", str(bits),
               "--calib", str(work / "calib"), "-o", str(out)]
        rc, secs, peak, tail = run_child(cmd)
        row = {"bits": bits, "rc": rc, "seconds": round(secs, 1), "peak_rss_gb": round(peak, 2),
               "peak_over_weights": round(peak * 1e9 / weight_bytes, 2), "weights_gb": round(weight_bytes / 1e9, 2)}
        if rc == 0:
            data = out.with_name(out.name + ".data")
            row["output_gb"] = round((out.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e9, 3)
            row["cosine_vs_fp32"] = round(agreement(src, out, feed), 5)
        else:
            row["error"] = tail
        row["temp_left"] = sorted(leftovers() - before)
        rows.append(row)
        print(json.dumps(row), flush=True)
        for p in work.glob(f"big.w{bits}.onnx*"):
            p.unlink()
    print("\n| bits | weights GB | exit | conv s | peak RSS GB | peak / weights | output GB | cosine | temp left |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| W{r['bits']} | {r['weights_gb']} | {r['rc']} | {r['seconds']} | {r['peak_rss_gb']} | "
              f"{r['peak_over_weights']} | {r.get('output_gb', '-')} | {r.get('cosine_vs_fp32', '-')} | "
              f"{len(r['temp_left'])} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
