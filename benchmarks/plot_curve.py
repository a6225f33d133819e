"""Fidelity against model size from a `run.py --json` file, drawn with Pillow (no plotting
dependency): one panel per model, onnxq uniform bits, onnxq mixed precision and onnxruntime's
points in different marks.

    python benchmarks/plot_curve.py results.json [more.json ...] -o curve.png

Several result files are merged per model (a later file's row replaces an earlier row of the
same name), so points from separate runs can share a panel. `--exclude REGEX` drops rows whose
"model:name" matches (e.g. branch variants, or a point superseded by a later run).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from PIL import Image, ImageDraw, ImageFont

W, H, PAD = 420, 320, 48
STYLE = {"ort": ((200, 60, 40), "x"), "mixed": ((30, 110, 200), "o"), "uniform": ((40, 140, 60), "s")}


def kind(name: str) -> str:
    return "ort" if name.startswith("ort") else "mixed" if "avg" in name or "mixed" in name else "uniform"


def fidelity(row: dict) -> float | None:
    for key in ("agree_fp32", "iou_fp32"):
        if row.get(key) is not None:
            return float(row[key])
    return None


def panel(draw: ImageDraw.ImageDraw, x0: int, title: str, rows: list[dict], font) -> None:
    pts = [(r["size_mb"], fidelity(r), r["name"]) for r in rows
           if r.get("size_mb") and fidelity(r) is not None and r["name"] != "fp32"]
    draw.rectangle([x0 + PAD, PAD, x0 + W - 10, H - PAD], outline=(0, 0, 0))
    draw.text((x0 + PAD, 12), title, fill=(0, 0, 0), font=font)
    if not pts:
        return
    smax = max(p[0] for p in pts) * 1.1
    ymin = min(0.0, min(p[1] for p in pts))
    sx = lambda s: x0 + PAD + (W - 10 - PAD) * s / smax  # noqa: E731
    sy = lambda y: H - PAD - (H - 2 * PAD) * (y - ymin) / (1.0 - ymin + 1e-9)  # noqa: E731
    for v in (0.0, 0.5, 1.0):
        if v >= ymin:
            draw.text((x0 + 8, sy(v) - 6), f"{v:.1f}", fill=(0, 0, 0), font=font)
    draw.text((x0 + W // 2 - 30, H - PAD + 14), f"size MB (max {smax:.2f})", fill=(0, 0, 0), font=font)
    for s, y, name in pts:
        color, mark = STYLE[kind(name)]
        cx, cy = sx(s), sy(y)
        if mark == "x":
            draw.line([cx - 5, cy - 5, cx + 5, cy + 5], fill=color, width=2)
            draw.line([cx - 5, cy + 5, cx + 5, cy - 5], fill=color, width=2)
        elif mark == "o":
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], outline=color, width=2)
        else:
            draw.rectangle([cx - 4, cy - 4, cx + 4, cy + 4], outline=color, width=2)
        draw.text((cx + 6, cy - 12), name.replace("onnxq-", ""), fill=color, font=font)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("-o", "--output", default="curve.png")
    ap.add_argument("--exclude", help='drop rows whose "model:name" matches this regular expression')
    args = ap.parse_args()
    data: dict[str, dict] = {}
    for path in args.results:
        with open(path) as fh:
            for model, d in json.load(fh).items():
                rows = {r["name"]: r for r in data.get(model, {}).get("rows", [])}
                rows.update({r["name"]: r for r in d["rows"]
                             if not (args.exclude and re.search(args.exclude, f"{model}:{r['name']}"))})
                data[model] = {"rows": list(rows.values())}
    img = Image.new("RGB", (W * len(data), H + 20), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)
    for i, (model, d) in enumerate(data.items()):
        panel(draw, i * W, f"{model}: agreement with FP32 vs size", d["rows"], font)
    draw.text((10, H + 2), "green squares: onnxq uniform bits; blue circles: onnxq mixed precision; "
              "red crosses: onnxruntime", fill=(0, 0, 0), font=font)
    img.save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
