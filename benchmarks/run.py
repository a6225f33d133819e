"""Benchmark: onnxq vs onnxruntime's quantizer on the three PP-OCR models of rapidocr-onnxruntime.

For each model: build seeded calibration feeds (written as an .npz folder, the onnxq --calib
format) and separate held-out evaluation feeds; convert each variant in a child process
(wall time and the child's own peak RSS, VmHWM, are measured); evaluate every variant in
this process against the ground truth and against FP32; print one table per model.

    python benchmarks/run.py                       # all models, default variants
    python benchmarks/run.py --quick --models rec
    python benchmarks/run.py --extra "onnxq-w4a8-rtn=--bits 4 --act-bits 8 --weight-method rtn"

rec accuracy is exact string match after stripping leading/trailing spaces (the recogniser
emits a space for wide margins). Latency: median of batch-1 runs on the first evaluation feed,
onnxruntime CPU with intra_op_num_threads=2, after warm-up runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxq import runtime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import metrics  # noqa: E402
import ocr_data  # noqa: E402

MODEL_FILES = {"rec": "ch_PP-OCRv4_rec_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
               "det": "ch_PP-OCRv4_det_infer.onnx"}
# (name, kind, spec): kind 'fp32' | 'ort' (spec: ort_quantize kwargs; a "method" key overrides
# --ort-method) | 'onnxq' (spec: CLI argv). Only DEFAULT_VARIANTS run unless --variants names more.
VARIANTS: list[tuple[str, str, object]] = [
    ("fp32", "fp32", None),
    ("ort-w8a8", "ort", {"wbits": 8, "abits": 8}),
    ("ort-w4a8", "ort", {"wbits": 4, "abits": 8}),
    ("onnxq-w8a8", "onnxq", ["--bits", "8", "--act-bits", "8"]),
    ("onnxq-w4a8", "onnxq", ["--bits", "4", "--act-bits", "8"]),
    ("ort-w8a8-percentile", "ort", {"wbits": 8, "abits": 8, "method": "percentile"}),
    ("ort-w8a8-entropy", "ort", {"wbits": 8, "abits": 8, "method": "entropy"}),
]
DEFAULT_VARIANTS = ("fp32", "ort-w8a8", "ort-w4a8", "onnxq-w8a8", "onnxq-w4a8")
# evaluation samples: on 200 lines one string is 0.005, and rec W4A8 read 0.930 there against
# 0.939 on 800 (W8A8 0.950 / 0.964): differences of a few strings need the larger set
COUNTS = {"full": {"rec": (64, 800), "cls": (64, 800), "det": (16, 40)},
          "quick": {"rec": (16, 40), "cls": (16, 40), "det": (4, 4)}}
CALIB_SEED, EVAL_SEED = 1, 2  # calibration seeds must differ from EVAL_SEED (held-out data)


def models_dir() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


# ----------------------------------------------------------------------------- data

def build_data(model: str, n_calib: int, n_eval: int, calib_seed: int = CALIB_SEED
               ) -> tuple[list[dict], list[dict], list]:
    """(calibration feeds, evaluation feeds, evaluation labels or None)."""
    if model == "rec":
        cal = [f for f, _ in ocr_data.rec_samples(n_calib, calib_seed)]
        ev = ocr_data.rec_samples(n_eval, EVAL_SEED)
    elif model == "cls":
        cal = [f for f, _ in ocr_data.cls_samples(n_calib, calib_seed)]
        ev = ocr_data.cls_samples(n_eval, EVAL_SEED)
    else:
        cal = ocr_data.det_samples(n_calib, calib_seed)
        ev = [(f, None) for f in ocr_data.det_samples(n_eval, EVAL_SEED)]
    return cal, [f for f, _ in ev], [y for _, y in ev]


def load_npz_folder(folder: Path) -> list[dict[str, np.ndarray]]:
    feeds = []
    for p in sorted(folder.glob("*.npz")):
        with np.load(p) as z:
            feeds.append({k: z[k] for k in z.files})
    return feeds


# ----------------------------------------------------------------------------- conversion

# Runs a module as __main__ and, at exit, writes the process's peak RSS (VmHWM, kB) to a file.
# VmHWM belongs to the address space made by execve, so unlike getrusage's ru_maxrss (which a
# forked child inherits from this large parent process) it counts only the conversion itself.
_WRAPPER = """
import atexit, runpy, sys
def _hwm(path=sys.argv[1]):
    with open('/proc/self/status') as f:
        kb = next(l.split()[1] for l in f if l.startswith('VmHWM'))
    open(path, 'w').write(kb)
atexit.register(_hwm)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def run_child(module_argv: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run `python -m module args...` in a child, logging its output; wall seconds, peak RSS (MB)."""
    hwm = log.with_suffix(".hwm")
    hwm.unlink(missing_ok=True)
    argv = [sys.executable, "-c", _WRAPPER, str(hwm), *module_argv]
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as fh:
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=str(HERE.parent),
                             env={**os.environ, **(env or {})})
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            timed_out = True
    peak = int(hwm.read_text()) / 1024 if hwm.exists() else None
    return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "peak_mb": peak, "timed_out": timed_out}


def convert(kind: str, spec, src: Path, dst: Path, calib: Path, log: Path, timeout: float,
            ort_method: str) -> dict:
    if kind == "ort":
        job = {"model": str(src), "out": str(dst), "calib": str(calib), "method": ort_method, **spec}
        argv, env = ["run", "--ort-child", json.dumps(job)], {"PYTHONPATH": os.pathsep.join(
            p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)}
    else:
        report = dst.with_suffix(".report.json")
        env = None
        argv = ["onnxq.cli", "convert", str(src), "-o", str(dst),
                "--calib", str(calib), "--report", str(report), *spec]
    res = run_child(argv, log, timeout, env)
    lines = log.read_text(errors="replace").strip().splitlines()
    if res["rc"] != 0 or not dst.exists():
        why = "timeout" if res["timed_out"] else (lines[-1] if lines else f"exit code {res['rc']}")
        res["error"] = why[:160]
    elif kind == "ort" and lines and lines[-1].startswith("{"):
        res.update(json.loads(lines[-1]))  # the child's own timing and pre-processing info
    elif kind == "onnxq" and dst.with_suffix(".report.json").exists():
        rep = json.loads(dst.with_suffix(".report.json").read_text())
        res["inner_seconds"] = rep.get("seconds", {}).get("total")
        if rep.get("branches"):
            res["extra_params_pct"] = 100.0 * rep["branches"]["used_params"] / max(rep.get("params") or 1, 1)
        if rep.get("search"):
            res["search_evals"] = rep["search"].get("evaluations")
        res["avg_bits"] = nominal_bits(rep)
    if kind == "ort" and "error" not in res:
        res["avg_bits"] = float(spec["wbits"])     # every layer it quantizes, at one bit-width
    return res


def nominal_bits(rep: dict) -> float | None:
    """Parameter-weighted average weight bits of a report's quantized layers, branch
    parameters counted at the branch bits (what --avg-bits budgets)."""
    layers = rep.get("quantized") or []
    params = sum(l["params"] for l in layers)
    branch = sum(l.get("branch_params") or 0 for l in layers)
    if not params:
        return None
    bits = sum(l["params"] * l["bits"] for l in layers) + branch * rep["config"].get("branch_bits", 8)
    return bits / (params + branch)


def ort_child(job_json: str) -> None:
    """Child-process entry for an ORT conversion; prints a JSON line with its own timing."""
    import logging

    from ort_baseline import ort_quantize

    logging.getLogger().setLevel(logging.ERROR)
    job = json.loads(job_json)
    info: dict = {}
    secs = ort_quantize(job["model"], job["out"], load_npz_folder(Path(job["calib"])), job["wbits"],
                        job["abits"], job["method"], info=info)
    print(json.dumps({"inner_seconds": secs, **{f"ort_{k}": v for k, v in info.items()}}))


# ----------------------------------------------------------------------------- evaluation

def session(path: Path) -> ort.InferenceSession:
    return runtime.session(str(path))


def latency_ms(sess: ort.InferenceSession, feed: dict, runs: int, warmup: int = 3) -> float:
    return runtime.median_ms(sess, feed, runs, warmup)


def evaluate(model: str, path: Path, feeds: list[dict], labels: list, ref: dict | None,
             charset: list[str] | None, runs: int) -> tuple[dict, list[np.ndarray]]:
    """Figures of one model file, and its outputs.

    `ref` = the FP32 row ({'outs': outputs, 'texts': rec strings}); None when evaluating FP32."""
    sess = session(path)
    outs = [sess.run(None, f)[0] for f in feeds]
    r: dict = {"size_mb": path.stat().st_size / 1e6, "latency_ms": latency_ms(sess, feeds[0], runs)}
    if model == "rec":
        texts = [t.strip() for o in outs for t in ocr_data.ctc_decode(o, charset)]
        r["accuracy"] = metrics.string_match(texts, labels)
        r["texts"] = texts
    elif model == "cls":
        r["accuracy"] = float(np.mean([int(o.argmax()) == y for o, y in zip(outs, labels)]))
    if ref is not None:
        ro = ref["outs"]
        if model == "rec":
            r["agree_fp32"] = metrics.string_match(r["texts"], ref["texts"])
        elif model == "cls":
            r["agree_fp32"] = metrics.top1_agreement(np.concatenate(ro), np.concatenate(outs))
        else:
            r["iou_fp32"] = float(np.mean([metrics.map_iou(a, b, 0.3) for a, b in zip(ro, outs)]))
        flat_ref = np.concatenate([a.ravel() for a in ro])
        flat = np.concatenate([b.ravel() for b in outs])
        r["sqnr_db"] = metrics.sqnr_db(flat_ref, flat)
        r["cosine"] = metrics.cosine(flat_ref, flat)
        if model in ("rec", "cls"):
            r["kl"] = float(np.mean([metrics.kl_divergence(a, b) for a, b in zip(ro, outs)]))
    return r, outs


# ----------------------------------------------------------------------------- reporting

def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(model: str, rows: list[dict]) -> str:
    second = {"rec": "str=FP32", "cls": "top1=FP32", "det": "IoU FP32"}[model]
    head = ["variant", "accuracy", second, "SQNR dB", "size MB", "bits", "extra %", "conv s", "peak MB", "lat ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["name"], f"error: {r['error']}"] + [""] * (len(head) - 2)
        else:
            cells = [r["name"], fmt(r.get("accuracy"), ".3f"),
                     fmt(r.get("agree_fp32", r.get("iou_fp32")), ".3f"), fmt(r.get("sqnr_db"), ".1f"),
                     fmt(r.get("size_mb"), ".2f"), fmt(r.get("avg_bits"), ".2f"),
                     fmt(r.get("extra_params_pct"), ".2f"),
                     fmt(r.get("seconds"), ".1f"),
                     fmt(r.get("peak_mb"), ".0f"), fmt(r.get("latency_ms"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="rec,cls,det")
    ap.add_argument("--variants", help="comma-separated variant names (default: "
                    + ", ".join(DEFAULT_VARIANTS) + ", and every --extra); known: "
                    + ", ".join(v[0] for v in VARIANTS))
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                    help="extra onnxq variant: name and CLI options, e.g. 'gptq=--bits 4 --weight-method gptq'")
    ap.add_argument("--quick", action="store_true", help="few samples, few latency runs")
    for m in MODEL_FILES:
        ap.add_argument(f"--{m}-calib", type=int)
        ap.add_argument(f"--{m}-eval", type=int)
    ap.add_argument("--calib-seed", type=int, default=CALIB_SEED,
                    help=f"seed of the calibration samples (evaluation always uses seed {EVAL_SEED})")
    ap.add_argument("--ort-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--latency-runs", type=int)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per conversion")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="work folder (models, logs)")
    ap.add_argument("--json", type=Path, help="also write all figures as JSON")
    ap.add_argument("--ort-child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.ort_child:
        return ort_child(args.ort_child)
    variants = list(VARIANTS) + [(e.split("=", 1)[0], "onnxq", shlex.split(e.split("=", 1)[1]))
                                 for e in args.extra]
    if args.variants:
        keep = args.variants.split(",")
        unknown = set(keep) - {v[0] for v in variants}
        if unknown:
            sys.exit(f"unknown variants: {', '.join(sorted(unknown))}")
        variants = [v for v in variants if v[0] in keep or v[0] == "fp32"]  # FP32 is the reference
    else:
        extras = {e.split("=", 1)[0] for e in args.extra}
        variants = [v for v in variants if v[0] in DEFAULT_VARIANTS or v[0] in extras]
    if args.calib_seed == EVAL_SEED:
        sys.exit(f"--calib-seed {EVAL_SEED} is the evaluation seed; pick another")
    counts = COUNTS["quick" if args.quick else "full"]
    runs = args.latency_runs or (5 if args.quick else 30)
    mdir = models_dir()
    results: dict = {}
    for model in args.models.split(","):
        if model not in MODEL_FILES:
            sys.exit(f"unknown model '{model}'; known: {', '.join(MODEL_FILES)}")
        src = mdir / MODEL_FILES[model]
        n_cal = getattr(args, f"{model}_calib") or counts[model][0]
        n_ev = getattr(args, f"{model}_eval") or counts[model][1]
        work = args.out / model
        work.mkdir(parents=True, exist_ok=True)
        cal, feeds, labels = build_data(model, n_cal, n_ev, args.calib_seed)
        calib_dir = work / "calib"
        for old in calib_dir.glob("*.npz"):
            old.unlink()
        ocr_data.write_npz_folder(cal, calib_dir)
        ort_calib = calib_dir
        histogram = args.ort_method != "minmax" or any(
            k == "ort" and sp.get("method", "minmax") != "minmax" for _, k, sp in variants)
        if model == "rec" and histogram:
            # ORT's histogram calibrators stack per-sample arrays: they need one input width
            ort_calib = work / "calib_fixed"
            for old in ort_calib.glob("*.npz"):
                old.unlink()
            ocr_data.write_npz_folder([f for f, _ in ocr_data.rec_samples(n_cal, args.calib_seed, 480, 480)],
                                      ort_calib)
        charset = ocr_data.load_charset(src) if model == "rec" else None
        print(f"\n## {model}: {src.name} ({n_cal} calibration, {n_ev} evaluation samples)", flush=True)
        rows, ref = [], None
        for name, kind, spec in variants:
            method = (spec or {}).get("method", args.ort_method) if kind == "ort" else None
            row: dict = {"name": name if kind != "ort" or method == "minmax" or name.endswith(method)
                         else f"{name} ({method})"}
            path = src
            if kind != "fp32":
                path = work / f"{name}.onnx"
                path.unlink(missing_ok=True)
                cdir = calib_dir if kind != "ort" or method == "minmax" else ort_calib
                row.update(convert(kind, spec, src, path, cdir, work / f"{name}.log", args.timeout,
                                   args.ort_method))
            if "error" not in row:
                try:
                    figs, outs = evaluate(model, path, feeds, labels, ref, charset, runs)
                    row.update(figs)
                    if kind == "fp32":
                        ref = {"outs": outs, "texts": figs.get("texts")}
                except Exception as e:  # noqa: BLE001 - a broken model is a result, not a crash
                    row["error"] = f"eval: {type(e).__name__}: {str(e).splitlines()[0][:140]}"
            row.pop("texts", None)
            rows.append(row)
            print(f"  {name}: " + ("error: " + row["error"] if "error" in row else "done"), flush=True)
        print(table(model, rows), flush=True)
        results[model] = {"calib": n_cal, "eval": n_ev, "rows": rows}
        if args.json:     # after each model: a long run stopped part way keeps what it measured
            args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
