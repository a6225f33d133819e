"""Calibration sources. A source is a list of lazy loaders; each loader returns one complete
feed {input name: array} that has been checked against the model's inputs.

Accepted: a folder of per-sample .npz files; one .npz whose arrays have a leading sample axis;
a folder of images with a preprocessing preset; in Python, any iterable of feed dicts (a
generator is read once, into memory) or an onnxruntime CalibrationDataReader; nothing (random
data, with a warning that fidelity is then unknown).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import CalibrationError
from ..types import Feed, InputSpec

log = logging.getLogger(__name__)

def image_suffixes() -> set[str]:
    """Every file suffix Pillow can open."""
    from PIL import Image

    Image.init()
    return {s for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
MAX_ABS = 1e15     # larger calibration values overflow float32 second moments


LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
RESIZES = ("crop", "letterbox", "stretch")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input. size None: the model's own input size. resize: crop
    (aspect kept, shorter side to the size, centre crop: for classifiers), letterbox (aspect kept,
    padded with grey: for detectors) or stretch. `transform`, when given, maps the decoded RGB
    uint8 array [H, W, 3] to the input array itself and replaces every other step."""

    size: tuple[int, int] | None = None         # H, W
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0
    resize: str = "crop"
    transform: "Callable[[np.ndarray], np.ndarray] | None" = None

    def __post_init__(self) -> None:
        for name, value, known in (("layout", self.layout, LAYOUTS), ("channel_order", self.channel_order, CHANNEL_ORDERS),
                                   ("resize", self.resize, RESIZES)):
            if value not in known:
                raise CalibrationError(f"preprocess {name} must be one of {', '.join(known)}, got '{value}'")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise CalibrationError(f"preprocess size must be (height, width) in pixels, got {self.size}")


PRESETS = {
    "imagenet": Preprocess(),
    "unit": Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    "symmetric": Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}


def check_feed(feed: Feed, specs: Sequence[InputSpec], where: str) -> Feed:
    names = {s.name for s in specs}
    missing = sorted(names - set(feed))
    if missing:
        raise CalibrationError(f"{where}: missing model input(s) {', '.join(missing)} "
                               f"(found {', '.join(sorted(feed)) or 'nothing'})")
    extra = sorted(set(feed) - names)
    if extra:
        raise CalibrationError(f"{where}: array(s) {', '.join(extra)} are not model inputs "
                               f"(model inputs: {', '.join(sorted(names))})")
    out = {}
    for s in specs:
        a = np.asarray(feed[s.name])
        if a.ndim != s.rank:
            raise CalibrationError(f"{where}: input '{s.name}' has rank {a.ndim}, model expects "
                                   f"rank {s.rank} {_shape_str(s.shape)}")
        for d, (got, want) in enumerate(zip(a.shape, s.shape)):
            if want is not None and got != want:
                raise CalibrationError(f"{where}: input '{s.name}' dimension {d} is {got}, model "
                                       f"expects {want} {_shape_str(s.shape)}")
        if a.dtype != s.dtype:
            if a.dtype.kind == s.dtype.kind == "f":
                a = a.astype(s.dtype)
            else:
                raise CalibrationError(f"{where}: input '{s.name}' has dtype {a.dtype}, model "
                                       f"expects {s.dtype}")
        if a.size == 0:
            raise CalibrationError(f"{where}: input '{s.name}' is empty (shape {list(a.shape)})")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise CalibrationError(f"{where}: input '{s.name}' contains NaN or Inf")
        if a.dtype.kind == "f" and float(np.max(np.abs(a))) > MAX_ABS:
            raise CalibrationError(f"{where}: input '{s.name}' holds values up to {float(np.max(np.abs(a))):.3g}; "
                                   f"calibration values must stay below {MAX_ABS:g} (is the data scaled?)")
        out[s.name] = a
    return out


def _shape_str(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _load_npz(path: Path) -> Feed:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise CalibrationError(f"{path.name}: not a readable .npz file ({e})") from None


def _npz_folder(folder: Path, specs) -> list[Callable[[], Feed]]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npz")
    return [lambda p=p: check_feed(_load_npz(p), specs, p.name) for p in files]


def _stacked_npz(path: Path, specs) -> list[Callable[[], Feed]]:
    arrays = _load_npz(path)
    if not arrays:
        raise CalibrationError(f"{path}: the .npz holds no arrays")
    rank = {s.name: s.rank for s in specs}
    lens = {k: v.shape[0] if v.ndim else 0 for k, v in arrays.items()}
    n = min(lens.values())
    if n == 0 or len(set(lens.values())) != 1:
        raise CalibrationError(f"{path}: arrays need one common leading sample axis, got "
                               + ", ".join(f"{k}: {v}" for k, v in lens.items()))

    def item(i: int) -> Feed:
        feed = {}
        for k, v in arrays.items():
            # entry i is the feed itself when it has the model's rank; otherwise keep a batch of 1
            feed[k] = v[i] if v[i].ndim == rank.get(k, v.ndim - 1) else v[i:i + 1]
        return check_feed(feed, specs, f"{path.name}[{i}]")

    return [lambda i=i: item(i) for i in range(n)]


def model_size(spec: InputSpec, layout: str) -> tuple[int, int] | None:
    """(H, W) of a 4-D image input when both are static."""
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h, w) if h and w else None


def _fit(img, size: tuple[int, int], how: str):
    """The image at `size` (H, W): centre crop or letterbox keep the aspect, stretch does not."""
    from PIL import Image

    h, w = size
    if how == "stretch":
        return img.resize((w, h), Image.BILINEAR)
    k = (max if how == "crop" else min)(w / img.width, h / img.height)
    scaled = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.BILINEAR)
    canvas = Image.new("RGB", (w, h), (114, 114, 114))
    canvas.paste(scaled, ((w - scaled.width) // 2, (h - scaled.height) // 2))
    return canvas


def _image_feed(path: Path, specs, pre: Preprocess) -> Feed:
    from PIL import Image, ImageOps

    if len(specs) != 1 or specs[0].rank != 4:
        raise CalibrationError("image calibration needs a model with one 4-D input")
    size = pre.size or model_size(specs[0], pre.layout)
    if size is None:
        raise CalibrationError(f"the model's input '{specs[0].name}' has no fixed height and width: give --size HxW")
    try:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except Exception as e:
        raise CalibrationError(f"{path.name}: unreadable image ({e})") from None
    if pre.transform is not None:
        return check_feed({specs[0].name: np.asarray(pre.transform(np.asarray(img)))}, specs, path.name)
    a = np.asarray(_fit(img, size, pre.resize), dtype=np.float32) * pre.scale
    if pre.channel_order.upper() == "BGR":
        a = a[..., ::-1]
    a = (a - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    a = a[None] if pre.layout.upper() == "NHWC" else a.transpose(2, 0, 1)[None]
    return check_feed({specs[0].name: np.ascontiguousarray(a, dtype=np.float32)}, specs, path.name)


def random_feeds(specs, n: int, seed: int, dims: int = 32) -> list[Callable[[], Feed]]:
    """Standard-normal floats (zeros for integer inputs); dynamic dims become 1 (batch) or `dims`."""
    def make(i: int) -> Feed:
        rng = np.random.default_rng([seed, i])
        feed = {}
        for s in specs:
            shape = tuple(d if d is not None else (1 if k == 0 else dims) for k, d in enumerate(s.shape))
            feed[s.name] = (rng.standard_normal(shape).astype(s.dtype) if s.dtype.kind == "f"
                            else np.zeros(shape, s.dtype))
        return feed
    return [lambda i=i: make(i) for i in range(n)]


def constant_inputs(loaders: Sequence[Callable[[], Feed]], n: int = 8) -> list[str]:
    """Float inputs that hold one value in every one of the first `n` samples (all-zero data, a
    broken pipeline): calibrating on them says nothing about real inputs."""
    seen: dict[str, set[float]] = {}
    for load in loaders[:n]:
        for k, v in load().items():
            if v.dtype.kind == "f":
                flat = v.reshape(-1)
                seen.setdefault(k, set()).update({float(flat.min()), float(flat.max())})
    return sorted(k for k, vals in seen.items() if len(vals) == 1)


def open_source(source, specs: Sequence[InputSpec], preprocess: Preprocess | None = None
                ) -> list[Callable[[], Feed]]:
    """Lazy loaders for every sample of `source` (see module doc). Raises CalibrationError."""
    if hasattr(source, "get_next"):              # an onnxruntime CalibrationDataReader
        source = list(iter(source.get_next, None))
    elif not isinstance(source, (str, bytes, os.PathLike, dict)) and hasattr(source, "__iter__"):
        source = list(source)                    # any iterable of feeds, a generator too: read once
    if isinstance(source, list):
        if not source:
            raise CalibrationError("calibration data holds no samples")
        bad = next((i for i, f in enumerate(source) if not isinstance(f, dict)), None)
        if bad is not None:
            raise CalibrationError(f"calibration sample {bad} is a {type(source[bad]).__name__}, not a dict "
                                   "of input name -> array")
        return [lambda f=f, i=i: check_feed(f, specs, f"feed {i}") for i, f in enumerate(source)]
    if not isinstance(source, (str, os.PathLike)):
        raise CalibrationError(f"calib must be a path, an iterable of feed dicts or a CalibrationDataReader, "
                               f"not {type(source).__name__}")
    p = Path(os.fspath(source))
    if not p.exists():
        raise CalibrationError(f"calibration path not found: {p}")
    if p.is_file():
        if p.suffix != ".npz":
            raise CalibrationError(f"calibration file must be .npz (or a folder): {p}")
        return _stacked_npz(p, specs)
    loaders = _npz_folder(p, specs)
    images = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in image_suffixes())
    if loaders and images:
        raise CalibrationError(f"{p} mixes .npz files and images; keep one kind per folder")
    if images:
        if preprocess is None:
            raise CalibrationError(f"{p} holds images: say how to preprocess them with "
                                   "--preprocess (e.g. imagenet) or --size/--mean/--std")
        return [lambda q=q: _image_feed(q, specs, preprocess) for q in images]
    if not loaders:
        raise CalibrationError(f"calibration folder {p} holds no .npz or image files")
    return loaders
