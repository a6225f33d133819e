"""Block reconstruction probe (issue 17, item 2): does rounding each block's weights to the block's
FP32 output, from the block's quantized input, beat onnxq's codes?

    python benchmarks/block_recon.py effl1 --set a --seed 1 --iters 300 --lr 3e-3

Converts a `generalise.py` model with onnxq (W4A8 by default), then once more with one step added
after sequential mode: the prepared float graph runs in torch (`torch_graph.py`), each block
(a run of nodes between single-tensor cuts holding at least `--min-layers` quantized layers) is fed
the output of the quantized blocks before it, and its codes are trained AdaRound-style (a
rectified sigmoid per weight between the code below and above, annealed to 0/1) with QDrop (each
activation's quantization dropped at random while training) against the FP32 block output. Both
models are scored on the held-out pool. Torch is a benchmark dependency, never onnxq's.
"""
import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalise as G  # noqa: E402
import onnxruntime as ort  # noqa: E402
from torch_graph import Net  # noqa: E402

import onnxq  # noqa: E402
import onnxq.api as api  # noqa: E402
from onnxq import runtime  # noqa: E402
from onnxq.algos.matrix import dequantize_rows, from_matrix, to_matrix  # noqa: E402
from onnxq.algos.qmath import act_qrange, weight_qmax  # noqa: E402

GAMMA, ZETA = -0.1, 1.1     # the rectified sigmoid's stretch
CHUNK = 8                   # samples a no-grad run takes at once


def soft(v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def v_for(h0):
    h0 = np.clip(h0, 0.01, 0.99)
    return -np.log((ZETA - GAMMA) / (h0 - GAMMA) - 1)


class Layer:
    """One quantized layer's codes as base + h, h in [0, 1] trained, on the plan's own grid."""

    def __init__(self, lp, w_fp: np.ndarray, h0: float):
        t = lp.target
        self.lp = lp
        shape = lambda m: from_matrix(m, t.weight_layout, t.shape)   # noqa: E731
        ones = np.ones(to_matrix(lp.codes, t.weight_layout).shape)
        step = shape(dequantize_rows(ones, lp.scales))              # one code's worth, per weight
        affine = lp.zero_points is not None
        zp = shape(dequantize_rows(ones, lp.zero_points.astype(np.float64))) if affine else 0 * step
        # onnxq's grids: affine codes 0..2^b - 1 before their zero point, symmetric ones -qmax..qmax
        qmin, qmax = act_qrange(lp.bits, False) if affine else (-weight_qmax(lp.bits), weight_qmax(lp.bits))
        codes = lp.codes.astype(np.float64)
        below = np.floor(w_fp / np.where(step == 0, 1.0, step))
        up = codes == below + 1                 # start from onnxq's codes: up from the code below,
        base = np.where(up, below, codes)       # else the code itself (which may move one up)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)    # noqa: E731
        self.base, self.step, self.lo, self.hi = f32(base), f32(step), f32(qmin - zp), f32(qmax - zp)
        self.v = torch.nn.Parameter(f32(v_for(np.where(up, 1 - h0, h0))))
        self.start = codes
        self.bias = None if lp.bias is None else f32(lp.bias)      # the plan's corrected bias
        self.hard = False

    def weight(self):
        h = (self.v >= 0).float() if self.hard else soft(self.v)
        return torch.minimum(torch.maximum(self.base + h, self.lo), self.hi) * self.step

    def reg(self, beta: float):
        return (1 - (2 * soft(self.v) - 1).abs().pow(beta)).sum()

    def codes(self) -> np.ndarray:
        q = torch.minimum(torch.maximum(self.base + (self.v >= 0).float(), self.lo), self.hi)
        return q.detach().numpy()


def fake_quant(x, a):
    qmin, qmax = act_qrange(a.bits, a.signed)
    q = torch.clamp(torch.round(x / a.scale) + a.zero_point, qmin, qmax)
    return x + ((q - a.zero_point) * a.scale - x).detach()        # straight through


def cuts(net: Net, inputs: list[str]) -> list[tuple[int, str]]:
    """(node index, tensor): the points after which one tensor alone is live."""
    last = {}
    for i, n in enumerate(net.nodes):
        for t in n.input:
            if t and t not in net.consts:
                last[t] = i
    for o in net.outputs:
        last[o] = len(net.nodes)
    live, out = {t for t in inputs if t in last}, []
    for i, n in enumerate(net.nodes):
        live = {t for t in live | {o for o in n.output if o in last} if last[t] > i}
        if len(live) == 1 and i < len(net.nodes) - 1:
            out.append((i, next(iter(live))))
    return out


def blocks_of(net: Net, inputs: list[str], layer_nodes, min_layers: int):
    """(first node, end node, input tensor, output tensor or None for the graph's outputs)."""
    pos = {n.name: i for i, n in enumerate(net.nodes)}
    lpos = sorted(pos[n] for n in layer_nodes)
    blocks, start, tin = [], 0, inputs[0]
    for i, t in cuts(net, inputs):
        if sum(1 for p in lpos if start <= p <= i) >= min_layers:
            blocks.append((start, i + 1, tin, t))
            start, tin = i + 1, t
    blocks.append((start, len(net.nodes), tin, None))
    return blocks


class Recon:
    """The conversion's plan, its prepared graph in torch, and the hooks that quantize it."""

    def __init__(self, c, args):
        self.c, self.args, self.plan = c, args, c.plan
        self.net = Net(c.prepared)
        shared = Counter(lp.target.weight for lp in self.plan.layers)
        self.layers = {lp.target.node: Layer(lp, self.net.consts[lp.target.weight].numpy(), args.h0)
                       for lp in self.plan.layers
                       if lp.codes is not None and not lp.target.graph and lp.branch is None
                       and lp.target.op in ("Conv", "Gemm", "MatMul") and shared[lp.target.weight] == 1}
        self.reads = {lp.target.node: lp.target.act for lp in self.plan.layers}
        self.quantized, self.training = True, False

    def weight(self, node, k, name, v):
        layer = self.layers.get(node)
        if self.quantized and layer is not None and name == layer.lp.target.weight:
            return layer.weight()
        if self.quantized and layer is not None and k == 2 and layer.bias is not None:
            return layer.bias
        return v

    def act(self, name, reader, v):
        a = self.plan.acts.get(self.plan.tied.get(name, name))
        if not self.quantized or a is None or not (self.reads.get(reader) == name
                                                   or reader in self.plan.readers.get(name, ())):
            return v
        y = fake_quant(v, a)
        if self.training and self.args.drop > 0:
            y = torch.where(torch.rand_like(v) < self.args.drop, v, y)
        return y

    def run(self, block, x, quantized: bool):
        s, e, tin, tout = block
        self.quantized = quantized
        wanted = [tout] if tout else self.net.outputs
        hooks = (self.weight, self.act) if quantized else (None, None)
        return self.net.run({tin: x}, s, e, wanted, *hooks), wanted

    def batched(self, block, x, quantized: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            parts = [self.run(block, x[j:j + CHUNK], quantized) for j in range(0, len(x), CHUNK)]
        return [torch.cat([p[0][w] for p in parts]) for w in parts[0][1]]

    def sqnr(self, block, xq, ys) -> float:
        out = self.batched(block, xq, True)
        num = sum(float(((o - y) ** 2).sum()) for o, y in zip(out, ys))
        return 10 * math.log10(sum(float((y ** 2).sum()) for y in ys) / max(num, 1e-30))

    def batch(self, block, xq, xf, ys):
        """A training batch (quantized input, FP32 targets); with --crop, one random window of
        the inputs, its targets computed from the FP32 input's same window."""
        idx = torch.randint(0, len(xq), (self.args.batch,))
        c = self.args.crop
        if not c or xq.dim() != 4 or min(xq.shape[2:]) <= c:
            return xq[idx], [y[idx] for y in ys]
        i, j = (int(torch.randint(0, n - c + 1, ())) for n in xq.shape[2:])
        window = (Ellipsis, slice(i, i + c), slice(j, j + c))
        with torch.no_grad():
            out, wanted = self.run(block, xf[idx][window], False)
        return xq[idx][window], [out[w] for w in wanted]

    def train(self, block, layers: list[Layer], xq, xf, ys) -> None:
        opt = torch.optim.Adam([L.v for L in layers], lr=self.args.lr)
        n = self.args.iters
        for it in range(n):
            x, targets = self.batch(block, xq, xf, ys)
            self.training = True
            out, wanted = self.run(block, x, True)
            rec = sum(((out[w] - y) ** 2).sum(1).mean() for w, y in zip(wanted, targets))
            frac = it / n
            beta = 20 - 18 * max(0.0, (frac - 0.2) / 0.8)          # anneal after a 20% warm-up
            reg = sum(L.reg(beta) for L in layers) if frac >= 0.2 else torch.zeros(())
            opt.zero_grad()
            (rec + self.args.lam * reg).backward()
            opt.step()
        self.training = False

    def block(self, i, block, xq, xf):
        names = [self.net.nodes[k].name for k in range(block[0], block[1])]
        layers = [self.layers[n] for n in names if n in self.layers]
        ys = self.batched(block, xf, False)
        if layers and i < self.args.max_blocks:
            for L in layers:
                L.hard = True
            before = self.sqnr(block, xq, ys)
            for L in layers:
                L.hard = False
            self.train(block, layers, xq, xf, ys)
            for L in layers:
                L.hard = True
                L.lp.codes = L.codes().astype(np.int8)
            moved = np.mean([np.mean(L.lp.codes != L.start) for L in layers])
            print(f"  block {i} ({len(layers)} layers): fitted-sample SQNR {before:.2f} -> "
                  f"{self.sqnr(block, xq, ys):.2f} dB, {moved:.1%} of codes moved", flush=True)
        xq = self.batched(block, xq, True)[0] if block[3] else None
        return xq, ys[0]

    def all(self) -> None:
        torch.manual_seed(0)
        feeds = [load() for load in self.c.calib]
        name = next(iter(feeds[0]))
        x = torch.from_numpy(np.concatenate([f[name] for f in feeds]))
        xq = xf = x
        blocks = blocks_of(self.net, [name], self.layers, self.args.min_layers)
        print(f"  {len(blocks)} blocks, {len(self.layers)} layers trained", flush=True)
        for i, b in enumerate(blocks):
            xq, xf = self.block(i, b, xq, xf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["effl1"], help="the model measured so far (others need their ops in torch_graph.py)")
    ap.add_argument("--set", default="a", choices=["a", "b"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lam", type=float, default=0.01, help="weight of the rounding regulariser")
    ap.add_argument("--drop", type=float, default=0.5, help="QDrop: share of activations left float in training")
    ap.add_argument("--h0", type=float, default=0.25, help="start: h = h0 for the code kept, 1 - h0 for one up")
    ap.add_argument("--crop", type=int, default=0, help="train on random windows of this size (0: whole maps)")
    ap.add_argument("--min-layers", type=int, default=3)
    ap.add_argument("--max-blocks", type=int, default=10 ** 6, help="train only the first N blocks")
    ap.add_argument("--cache", default="/tmp/onnxq-bench-cache")
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = G.MODELS[args.model]
    path = Path(spec["path"]) if "path" in spec else G.tg.package_file(spec["pkg"], spec["file"])
    n_cal, n_ev = spec["counts"]
    ev = G.feeds(args.model, spec, path, args.set, G.EVAL_SEED[args.set], n_ev, "eval", Path(args.cache))
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = [fp32.run(None, f) for f in ev]
    cal = G.feeds(args.model, spec, path, args.set, args.seed, n_cal, "calib", Path(args.cache))
    plain = api.reconstruct
    for variant in ("onnxq", "onnxq+blocks"):
        def step(c, progress, _plain=plain, _on=variant != "onnxq"):
            _plain(c, progress)
            if _on:
                Recon(c, args).all()
        api.reconstruct = step
        t0 = time.perf_counter()
        q, _ = onnxq.convert(str(path), onnxq.ConvertConfig(bits=args.bits, act_bits=8), calib=cal)
        seconds = time.perf_counter() - t0
        dst = Path(f"/tmp/block_recon_{args.model}_{variant}.onnx")
        onnxq.save(q, dst)
        sess = runtime.session(str(dst))
        outs = [sess.run(None, f) for f in ev]
        print(f"{args.model} set {args.set} seed {args.seed} {variant}: held-out fidelity "
              f"{G.score(spec['kind'], outs, ref):.3f}, SQNR {G.tg.metrics.sqnr_db(G.tg.flat(ref), G.tg.flat(outs)):.2f} dB, "
              f"conversion {seconds:.0f} s", flush=True)
    api.reconstruct = plain


if __name__ == "__main__":
    main()
