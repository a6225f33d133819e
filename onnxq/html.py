"""The conversion report as one self-contained HTML page (no network, no external files): the
summary, the fidelity table, a per-layer chart of SQNR coloured by bit width, the layers ranked
by their harm at low bits (when --protect measured it), the activations by their harm at 8
bits (--protect-acts), every layer with its bits, method and
branch, every quantized activation with its histogram, range and clipping, and what stayed float.
Input is the report's JSON form (Report.to_dict()); a small script sorts the tables."""

from __future__ import annotations

import math
from html import escape

BIT_COLOURS = {2: "#b2182b", 3: "#d6604d", 4: "#f4a582", 5: "#fddbc7", 6: "#d1e5f0", 8: "#4393c3", 16: "#2166ac"}
CHART_WIDTH, ROW, LABEL = 760, 13, 300
MAX_DB = 60.0
STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f2f2f2;cursor:pointer}.warn{background:#fff4e5;border-left:4px solid #e08000;padding:6px 10px}
.muted{color:#777}svg text{font:11px system-ui,sans-serif}"""
SCRIPT = """document.querySelectorAll('table.sort th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows), up = th.dataset.up !== '1';
  const key = r => { const t = r.cells[i].dataset.v ?? r.cells[i].textContent, n = parseFloat(t);
                     return isNaN(n) ? t : n; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1));
  th.dataset.up = up ? '1' : '0'; rows.forEach(r => body.appendChild(r));
}));
document.body.dataset.ready = '1';"""


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else escape(str(v))


def _table(head: list[str], rows: list[list[str]], sortable: bool = True) -> str:
    cls = ' class="sort"' if sortable else ""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{cls}>{thead}<tbody>{body}</tbody></table>"


def _bar_chart(items: list[tuple[str, float | None, str, str]], unit: str, top: float, spec: str = ".1f") -> str:
    """Horizontal bars: (label, value, colour, tooltip) per row, scaled to `top`."""
    h = ROW * len(items) + 24
    out = [f'<svg role="img" width="{LABEL + CHART_WIDTH + 60}" height="{h}" class="chart">']
    for i, (label, value, colour, tip) in enumerate(items):
        y = i * ROW
        w = 0 if value is None else max(1.0, min(value, top) / top * CHART_WIDTH)
        short = label if len(label) <= 46 else "…" + label[-45:]
        out.append(f'<g><title>{escape(tip)}</title><text x="{LABEL - 4}" y="{y + 10}" text-anchor="end">'
                   f'{escape(short)}</text><rect x="{LABEL}" y="{y + 1}" width="{w:.1f}" height="{ROW - 2}" '
                   f'fill="{colour if value is not None else "#ccc"}"/><text x="{LABEL + w + 4:.1f}" y="{y + 10}">'
                   f'{_fmt(value, spec)}</text></g>')
    for k in range(5):
        x = LABEL + k / 4 * CHART_WIDTH
        out.append(f'<text x="{x:.0f}" y="{h - 6}" class="muted">{top * k / 4:.3g} {unit}</text>')
    return "".join(out) + "</svg>"


def _layer_chart(r: dict) -> str:
    items = [(q["node"], q["sqnr_with_branch_db"] if q["sqnr_with_branch_db"] is not None else q["sqnr_db"],
              BIT_COLOURS.get(q["bits"], "#888"),
              f"{q['node']} ({q['op']}): {q['bits']}-bit {q['method']}, SQNR {_fmt(q['sqnr_db'], '.1f')} dB")
             for q in r["quantized"]]
    legend = " ".join(f'<span style="background:{c};padding:0 8px">&nbsp;</span> {b} bits'
                      for b, c in BIT_COLOURS.items() if any(q["bits"] == b for q in r["quantized"]))
    if not items:
        return "<p>No layer was quantized.</p>"
    return (f"<p>Each layer's output SQNR against its FP32 output, estimated from the calibration "
            f"statistics (higher is better; grey: not measured). {legend}</p>" + _bar_chart(items, "dB", MAX_DB))


def _harm_chart(r: dict) -> str:
    """The layers by the harm --protect measured, and the activations by --protect-acts'."""
    layers = _ranked(r.get("protect"), "protected", "at low bits", "kept at 8 bits",
                     "<h2>Layers by harm at low bits</h2><p>The network loss each layer adds when it alone is "
                     "at low bits, activations quantized (blue: kept at 8 bits by --protect).</p>")
    acts = _ranked(r.get("wide"), "widened", "at 8 bits", "kept at 16 bits",
                   "<h2>Activations by harm at 8 bits</h2><p>The network loss each activation's rounding adds "
                   "when it alone is rounded (blue: kept at 16 bits by --protect-acts).</p>")
    return layers + acts


def _ranked(p: dict | None, kept_key: str, at: str, kept_text: str, head: str) -> str:
    harm = sorted(((p or {}).get("harm") or {}).items(), key=lambda kv: -kv[1])[:40]
    if not harm:
        return ""
    kept = set(p.get(kept_key) or ())
    top = max(v for _, v in harm) or 1.0
    items = [(n, v, "#4393c3" if n in kept else "#f4a582", f"{n}: network loss {v:.3g} {at}"
              + (f" ({kept_text})" if n in kept else "")) for n, v in harm]
    return head + _bar_chart(items, "", top, ".3g")


def _spark(a: dict) -> str:
    """The activation's calibration histogram (log counts) with its quantization range marked."""
    counts, span = a.get("histogram") or [], a.get("histogram_range") or [None, None]
    if not counts or span[0] is None or span[1] <= span[0]:
        return ""
    w, h, top = 160, 28, max(max(counts), 1)
    scale = lambda v: (min(max(v, span[0]), span[1]) - span[0]) / (span[1] - span[0]) * w  # noqa: E731
    bw = w / len(counts)
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{h - hh:.1f}" width="{bw:.1f}" height="{hh:.1f}" fill="#888"/>'
                   for i, c in enumerate(counts) if (hh := (0 if c <= 0 else (1 + math.log10(c)) / (1 + math.log10(top)) * h)))
    lo, hi = a["range"]
    marks = "".join(f'<line x1="{scale(v):.1f}" x2="{scale(v):.1f}" y1="0" y2="{h}" stroke="#d00"/>'
                    for v in (lo, hi) if v is not None)
    return f'<svg width="{w}" height="{h}" class="spark">{bars}{marks}</svg>'


def _summary(r: dict) -> str:
    cfg, f = r.get("config", {}), r.get("fidelity", {})
    size = f"{r['size_before'] / 1e6:.2f} MB → {r['size_after'] / 1e6:.2f} MB"
    if r["size_after"]:
        size += f" ({r['size_before'] / r['size_after']:.1f}× smaller)"
    rows = [["model", escape(str(r.get("model", "")))], ["weights / activations",
            f"{_fmt(cfg.get('bits'))} / {_fmt(cfg.get('act_bits'))} bits, target {escape(str(cfg.get('target')))}"],
            ["size", size], ["layers", f"{len(r['quantized'])} quantized, {len(r['skipped'])} left in float"],
            ["samples", f"{r['calib_samples']} calibration, {f.get('samples', 0)} held out"],
            ["seconds", ", ".join(f"{escape(k)} {v:.1f}" for k, v in r.get("seconds", {}).items())],
            ["opset", f"{r['opset_before']} → {r['opset_after']}"], ["report schema", escape(r.get("schema", ""))]]
    return _table(["", ""], rows, sortable=False)


def _fidelity(r: dict) -> str:
    outs = (r.get("fidelity") or {}).get("outputs") or {}
    rows = [[escape(name), _fmt(o["cosine"], ".5f"), _fmt(o["sqnr_db"], ".1f"), _fmt(o.get("top1_agreement"), ".3f"),
             _fmt(o.get("kl"), ".3g"), "reference is constant: cosine and SQNR mean nothing" if o.get("degenerate") else ""]
            for name, o in outs.items()]
    if not rows:
        return "<p>No held-out samples: fidelity was not measured.</p>"
    return _table(["output", "cosine", "SQNR dB", "top-1 agreement", "KL", "note"], rows)


def _layers(r: dict) -> str:
    rows = [[escape(q["node"]), escape(q["op"]), str(q["bits"]), escape(q["method"]), str(q["params"]),
             _fmt(q["sqnr_db"], ".1f"), "float" if q["activation_bits"] >= 32 else f"{q['activation_bits']}-bit",
             str(q["branch_rank"] or ""), escape(q["note"] or q["float_input_reason"] or "")] for q in r["quantized"]]
    return _table(["layer", "op", "bits", "method", "params", "SQNR dB", "input", "branch rank", "note"], rows)


def _activations(r: dict) -> str:
    rows = []
    for a in r["activations"]:
        clipped = a.get("clipped_fraction")
        rows.append([escape(a["tensor"]), escape(a["method"]), f"{'int' if a['signed'] else 'uint'}{a['bits']}",
                     f"[{_fmt(a['range'][0])}, {_fmt(a['range'][1])}]",
                     f"[{_fmt(a['observed'][0])}, {_fmt(a['observed'][1])}]",
                     _fmt(None if clipped is None else 100 * clipped, ".3f"), _spark(a)])
    return _table(["tensor", "method", "type", "range", "observed", "clipped %", "histogram (log), range in red"], rows)


def _smoothing(r: dict) -> str:
    items = r.get("smoothing") or []
    if not items:
        return ""
    rows = [[escape(m["tensor"]), escape(", ".join(m["readers"])), _fmt(m["alpha"], ".2f") if m["alpha"] is not None
             else "none", _fmt(m["error_before"], ".3g"), _fmt(m["error_after"], ".3g")] for m in items]
    return ("<h2>Smoothing</h2><p>Gemm/MatMul and conv inputs divided per channel (the weights multiplied back) where "
            "that lowered the layers' quantized output error on rows not fitted on.</p>"
            + _table(["input", "read by", "alpha", "error without", "error with"], rows))


def render(r: dict) -> str:
    """The page for one report (its JSON form)."""
    warnings = "".join(f'<p class="warn">{escape(w)}</p>' for w in r.get("warnings", []))
    skipped = _table(["node", "op", "why it stays float"],
                     [[escape(s["node"]), escape(s["op"]), escape(s["reason"])] for s in r["skipped"]]) \
        if r["skipped"] else "<p>Every layer with a weight was quantized.</p>"
    parts = [f"<h1>onnxq report: {escape(str(r.get('model', '')))}</h1>", warnings, _summary(r),
             "<h2>Fidelity on held-out samples</h2>", _fidelity(r), "<h2>Layers</h2>", _layer_chart(r),
             _harm_chart(r), "<h2>Every layer</h2>", _layers(r),
             "<h2>Activations</h2>", _activations(r), _smoothing(r), "<h2>Left in float</h2>", skipped]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>onnxq report</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script></body></html>")
