"""The HTML report: one self-contained page from a real conversion's report, checked as text and
in a real headless browser (Debian's Chromium: the README's test command installs it)."""

import json
from html import escape
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import onnxq
from onnxq.html import render

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A W8A8 conversion of the digits CNN (Gemms at 4 bits) with a layer name that needs escaping."""
    import onnx
    m = onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))
    m.graph.node[0].name = "<stem> & co"
    calib = sorted((ROOT / "models" / "digits_calib").glob("*.npz"))[:16]
    # an 8-bit conversion, whose depthwise and pointwise conv inputs the smoothing considers (the
    # Gemms, weight-only, read float), with 4-bit Gemms so that both bar colours are drawn
    cfg = onnxq.ConvertConfig(bits=8, bits_overrides=(("*Gemm*", 4),))
    _, rep = onnxq.convert(m, cfg, calib=[dict(np.load(p)) for p in calib])
    return json.loads(json.dumps(rep.to_dict(), default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def test_the_page_holds_a_bar_per_layer_and_a_histogram_per_activation(report):
    page = render(report)
    assert page.startswith("<!DOCTYPE html>") and "http" not in page.replace("http-equiv", "")   # nothing fetched
    chart = re.search(r'<svg role="img"[^>]*class="chart">(.*?)</svg>', page, re.S).group(1)
    assert chart.count("<rect") == len(report["quantized"]) > 0
    assert page.count('class="spark"') == sum(1 for a in report["activations"] if a["histogram"]) > 0
    assert "&lt;stem&gt; &amp; co" in page and "<stem>" not in page
    # every input the smoothing considered is listed, smoothed or not
    assert report["smoothing"] and all(escape(m["tensor"]) in page for m in report["smoothing"])
    assert page.count("<h2>Smoothing</h2>") == 1
    # the 8-bit activations ranked by the harm --protect-acts measured, one bar each
    harm = re.search(r"<h2>Activations by harm at 8 bits</h2>.*?<svg[^>]*>(.*?)</svg>", page, re.S).group(1)
    assert harm.count("<rect") == len(report["wide"]["harm"]) > 0
    for a in report["activations"]:          # numbers, not formatted strings
        assert all(isinstance(v, (int, float)) for v in a["range"] + a["observed"] + a["histogram"])


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (the README's test command installs it)")
def test_the_page_renders_in_chromium_without_console_errors(report, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(report), encoding="utf-8")
    run = lambda *extra: subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra,  # noqa: E731
                                         page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = run("--dump-dom")
    assert 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]          # the script ran to its end
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    shot = tmp_path / "shot.png"
    run("--window-size=1280,1600", f"--screenshot={shot}")
    from PIL import Image
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the layer chart's bars are drawn: pixels of the 4-bit and 8-bit colours are on the page
    for colour in ((0xf4, 0xa5, 0x82), (0x43, 0x93, 0xc3)):
        assert np.sum(np.all(np.abs(img - colour) <= 2, axis=-1)) > 500, colour
