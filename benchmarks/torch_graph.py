"""A torch interpreter of a float ONNX graph (the convnet ops onnxq's prepared models use), with
hooks that swap a node's constant inputs and its activation inputs: what `block_recon.py` trains
through. Benchmark code: torch is a benchmark dependency, never onnxq's."""
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper as nh


def attrs(n):
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def _pads(x, p, value=0.0):
    k = len(p) // 2
    if not any(p):
        return x
    # onnx pads [b1, b2, .., e1, e2, ..] -> torch reversed pairs
    tp = []
    for i in reversed(range(k)):
        tp += [p[i], p[i + k]]
    return F.pad(x, tp, value=value)


def conv(x, w, b, a):
    k = len(w.shape) - 2
    strides = a.get("strides", [1] * k); dil = a.get("dilations", [1] * k); g = a.get("group", 1)
    ap = a.get("auto_pad", b"NOTSET"); ap = ap.decode() if isinstance(ap, bytes) else ap
    pads = a.get("pads", [0] * 2 * k)
    if ap in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(k):
            ins = x.shape[2 + i]; out = -(-ins // strides[i]); ks = (w.shape[2 + i] - 1) * dil[i] + 1
            tot = max(0, (out - 1) * strides[i] + ks - ins); pads.append(tot)
        pads = [p // 2 if ap == "SAME_UPPER" else p - p // 2 for p in pads] + \
               [p - p // 2 if ap == "SAME_UPPER" else p // 2 for p in pads]
    if k == 1:
        x = _pads(x, pads); return F.conv1d(x, w, b, strides, 0, dil, g)
    if pads[:k] == pads[k:]:
        return F.conv2d(x, w, b, strides, tuple(pads[:k]), dil, g)
    return F.conv2d(_pads(x, pads), w, b, strides, 0, dil, g)


def pool(x, a, kind):
    k = a["kernel_shape"]; s = a.get("strides", [1] * len(k)); p = a.get("pads", [0] * 2 * len(k))
    if kind == "max":
        x = _pads(x, p, value=-float("inf"))
        return F.max_pool2d(x, k, s, 0, a.get("dilations", [1, 1]), ceil_mode=bool(a.get("ceil_mode", 0)))
    x = _pads(x, p) if a.get("count_include_pad", 0) else x
    if not a.get("count_include_pad", 0) and any(p):
        return F.avg_pool2d(x, k, s, tuple(p[:2]), ceil_mode=bool(a.get("ceil_mode", 0)), count_include_pad=False)
    return F.avg_pool2d(x, k, s, 0, ceil_mode=bool(a.get("ceil_mode", 0)))


def _elementwise(op, ins, a):
    """One-output elementwise ops, or None."""
    x = ins[0] if ins else None
    if op == "Relu":
        return F.relu(x)
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min", None)
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max", None)
        lo = None if lo is None else float(lo); hi = None if hi is None else float(hi)
        return torch.clamp(x, lo, hi)
    if op in ("Add", "Sub", "Mul", "Div", "Pow"):
        f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow}[op]
        return f(ins[0], ins[1])
    if op == "Sigmoid":
        return torch.sigmoid(x)
    if op == "Tanh":
        return torch.tanh(x)
    if op == "HardSigmoid":
        return torch.clamp(x * a.get("alpha", 0.2) + a.get("beta", 0.5), 0, 1)
    if op == "HardSwish":
        return x * torch.clamp(x / 6 + 0.5, 0, 1)
    if op == "LeakyRelu":
        return F.leaky_relu(x, a.get("alpha", 0.01))
    return None


def run_node(n, ins, a):
    op = n.op_type
    x = ins[0] if ins else None
    elementwise = _elementwise(op, ins, a)
    if elementwise is not None:
        return [elementwise]
    if op == "Conv":
        return [conv(x, ins[1], ins[2] if len(ins) > 2 else None, a)]
    if op == "GlobalAveragePool":
        return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]
    if op == "MaxPool":
        return [pool(x, a, "max")]
    if op == "AveragePool":
        return [pool(x, a, "avg")]
    if op == "Flatten":
        ax = a.get("axis", 1); return [x.reshape(int(np.prod(x.shape[:ax])), -1)]
    if op == "Reshape":
        shp = [int(v) for v in ins[1].tolist()]
        shp = [x.shape[i] if v == 0 else v for i, v in enumerate(shp)]
        return [x.reshape(shp)]
    if op == "Gemm":
        A = ins[0].T if a.get("transA", 0) else ins[0]; B = ins[1].T if a.get("transB", 0) else ins[1]
        y = a.get("alpha", 1.0) * A @ B
        if len(ins) > 2 and ins[2] is not None:
            y = y + a.get("beta", 1.0) * ins[2]
        return [y]
    if op == "MatMul":
        return [ins[0] @ ins[1]]
    if op == "Concat":
        return [torch.cat(ins, dim=a["axis"])]
    if op == "Transpose":
        return [x.permute(*a["perm"])]
    if op == "Softmax":
        return [torch.softmax(x, dim=a.get("axis", -1))]
    if op == "Identity":
        return [x]
    if op == "Split":
        ax = a.get("axis", 0)
        sp = ins[1].tolist() if len(ins) > 1 and ins[1] is not None else a.get("split")
        if sp is None:
            sp = x.shape[ax] // len(n.output)
        return list(torch.split(x, sp, dim=ax))
    if op == "Resize":
        sc = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
        size = ins[3].tolist()[2:] if len(ins) > 3 else None
        mode = a.get("mode", b"nearest"); mode = mode.decode() if isinstance(mode, bytes) else mode
        if sc is not None:
            return [F.interpolate(x, scale_factor=[float(v) for v in sc.tolist()[2:]], mode=mode)]
        return [F.interpolate(x, size=[int(v) for v in size], mode=mode)]
    raise NotImplementedError(op)


class Net:
    """Runs a topologically sorted node range of `model`, with hooks:
    weight(node_name, input_index, tensor) -> tensor and act(tensor_name, reader, tensor) -> tensor."""

    def __init__(self, model):
        g = model.graph
        self.consts = {i.name: torch.from_numpy(nh.to_array(i).copy()) for i in g.initializer}
        self.nodes = []
        for n in g.node:
            if n.op_type == "Constant":
                v = nh.to_array(attrs(n)["value"])
                self.consts[n.output[0]] = torch.from_numpy(np.array(v).copy())
                continue
            self.nodes.append(n)
        self.attrs = [attrs(n) for n in self.nodes]
        for k, v in list(self.consts.items()):
            if v.dtype == torch.float64:
                self.consts[k] = v.float()
        self.outputs = [o.name for o in g.output]

    def run(self, env, lo, hi, wanted, weight=None, act=None):
        env = dict(env)
        for i in range(lo, hi):
            n, a = self.nodes[i], self.attrs[i]
            ins = []
            for k, name in enumerate(n.input):
                if name == "":
                    ins.append(None); continue
                if name in self.consts:
                    v = self.consts[name]
                    if weight is not None:
                        v = weight(n.name, k, name, v)
                else:
                    v = env[name]
                    if act is not None:
                        v = act(name, n.name, v)
                ins.append(v)
            for o, v in zip(n.output, run_node(n, ins, a)):
                env[o] = v
        return {w: env[w] for w in wanted}
