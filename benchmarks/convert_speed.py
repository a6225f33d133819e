"""Conversion time on real models next to onnxruntime's quantize_static, in one run on the same
calibration feeds: onnxruntime W8A8 (QDQ, per-channel, min-max), onnxq W8A8, W4A8 and
`--avg-bits 4` (mixed precision at the size of uniform W4), with the ratios the tool promises:
onnxq W8A8 within 2x of quantize_static, --avg-bits within 3x of uniform W4A8. Each conversion
runs in this process after a garbage collection; the per-stage seconds come from onnxq's report,
and the peak is the process's largest resident memory while it ran (what earlier conversions left
allocated counts too, so the first conversion of a model is the cleanest figure).
Run it on a quiet machine (it prints the other processes' CPU use during each conversion).

    python benchmarks/convert_speed.py --models cls det effl1 M
    python benchmarks/convert_speed.py --json benchmarks/results/convert_speed.json
    python benchmarks/convert_speed.py --models P A --samples 32 --target ort-cpu --variants "onnxq W8A8"
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

import onnxq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import generalise as gen  # noqa: E402
import targets as tg  # noqa: E402
from ort_baseline import ort_quantize  # noqa: E402
from checkout import require_checkout  # noqa: E402

VARIANTS = {"onnxq W8A8": dict(bits=8), "onnxq W4A8": dict(bits=4), "onnxq --avg-bits 4": dict(avg_bits=4.0)}
BARS = {"onnxq W8A8": ("ort W8A8", 2.0), "onnxq --avg-bits 4": ("onnxq W4A8", 3.0)}


def calibration(key: str, n: int) -> tuple[Path, list[dict]]:
    if key in tg.MODELS:
        spec = tg.MODELS[key]
        path = tg.model_path(spec)
        cal, _, _ = tg.build_data(key, spec, path, n, 1, tg.HERE / "out" / "targets" / "wheels")
        return path, cal
    spec = gen.MODELS[key]
    path = Path(spec["path"]) if "path" in spec else tg.package_file(spec["pkg"], spec["file"])
    return path, gen.feeds(key, spec, path, "a", 1, n, "calib", Path(tempfile.gettempdir()) / "onnxq-gen-cache")


def _peak_reset() -> bool:
    """Start this process's peak resident memory (VmHWM) afresh (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_gb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1e6 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration, ValueError):
        return None


def timed(fn) -> dict:
    """Seconds of fn(), the other processes' CPU meanwhile, and this process's largest resident
    memory while fn ran (its peak reset first; Linux only, else None)."""
    gc.collect()
    fresh = _peak_reset()
    bg = tg.Background().start()
    t0 = time.perf_counter()
    out = fn()
    return {"s": time.perf_counter() - t0, "background_cores": bg.stop(), "peak_rss_gb": _peak_gb() if fresh else None,
            **(out or {})}


def run_model(key: str, n: int, target: str = "generic", variants=tuple(VARIANTS)) -> dict:
    path, cal = calibration(key, n)
    rows: dict[str, dict] = {}
    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="speed.") as tmp:
        def ort_w8a8() -> None:
            ort_quantize(path, Path(tmp) / "ort.onnx", cal, 8, 8, "minmax")
        rows["ort W8A8"] = timed(ort_w8a8)
    for name in variants:
        def one(kw=VARIANTS[name]):
            _, rep = onnxq.convert(str(path), onnxq.ConvertConfig(act_bits=8, target=target, **kw), calib=cal)
            return {"stages": {k: round(v, 2) for k, v in rep.seconds.items()}}
        rows[name] = timed(one)
        print(f"   {key} {name} ({target}): {rows[name]['s']:.1f} s", flush=True)
    for name, (ref, bar) in BARS.items():
        if name in rows and ref in rows:
            rows[name]["ratio"] = rows[name]["s"] / rows[ref]["s"]
            rows[name]["bar"] = bar
    return {"samples": len(cal), "rows": rows}


def table(results: dict) -> str:
    lines = ["| model | samples | ort W8A8 s, peak | onnxq W8A8 s (x ort), peak | onnxq W4A8 s, peak | "
             "--avg-bits 4 s (x W4A8), peak | other processes (cores) |", "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        w = r["rows"]
        busy = max(v["background_cores"] or 0.0 for v in w.values())
        def cell(name):
            v = w.get(name)
            if v is None:
                return "-"
            gb = f", {v['peak_rss_gb']:.1f} GB" if v.get("peak_rss_gb") is not None else ""
            return f"{v['s']:.1f}" + (f" ({v['ratio']:.2f}x)" if "ratio" in v else "") + gb
        lines.append(f"| {key} | {r['samples']} | {cell('ort W8A8')} | {cell('onnxq W8A8')} | {cell('onnxq W4A8')} | "
                     f"{cell('onnxq --avg-bits 4')} | {busy:.2f} |")
    return "\n".join(lines)


def main() -> None:
    require_checkout()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cls", "det", "effl1", "M"])
    ap.add_argument("--samples", type=int, default=64, help="calibration samples per model")
    ap.add_argument("--target", default="generic", help="onnxq's --target for its conversions")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    results = {}
    for key in a.models:
        results[key] = run_model(key, a.samples, a.target, a.variants)
        if a.json:
            a.json.write_text(json.dumps({"onnxruntime": ort.__version__, "target": a.target, "results": results},
                                         indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
