"""Train the small digits CNN shipped in models/ and export it to ONNX (developer tool).

    pip install torch==2.13.0        # CPU wheel; torch is NOT a dependency of onnxq
    python models/train_digits.py

Data: scikit-learn's bundled `load_digits` (1797 8x8 grayscale digits, no download), pixels
scaled to 0..1 (/16), split 75/25 with train_test_split(random_state=0, stratified).

Writes, next to this script:
  digits_cnn.onnx        opset 13, input `input` [N,1,8,8] float32, output `logits` [N,10];
                         BatchNormalization nodes are kept (not folded into the convs) so the
                         quantizer has to handle them; single file, no external data.
  digits_calib/          32 per-sample calibration feeds sample_000.npz ... (key `input`,
                         [1,1,8,8] float32), taken from the TRAINING split.
  digits_eval.npz        held-out split: `input` [M,1,8,8] float32 (a feed file onnxq reads).
  digits_eval_labels.npy its labels [M] int64.

The graph exercises: plain, depthwise, pointwise and grouped/strided Conv, unfolded
BatchNormalization, Relu, a residual Add, GlobalAveragePool, Flatten and Gemm.

Everything is seeded and runs single-threaded, so reruns give the same weights and
byte-identical .npz files (fixed zip timestamps).
"""

from __future__ import annotations

import io
import random
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3
N_CALIB = 32
OPSET = 13


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def cbr(cin, cout, k, stride=1, groups=1):
            return nn.Sequential(
                nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(1, 16, 3)                       # 8x8
        self.dw = cbr(16, 16, 3, groups=16)              # depthwise
        self.pw = cbr(16, 32, 1)                         # pointwise
        self.down = cbr(32, 32, 3, stride=2, groups=4)   # grouped, strided -> 4x4
        self.res = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32, 32)
        self.fc_relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.pw(self.dw(self.stem(x))))
        x = self.relu(x + self.res(x))                   # residual Add
        x = self.flatten(self.pool(x))
        return self.fc2(self.fc_relu(self.fc1(x)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_data():
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]      # [1797,1,8,8], 0..1
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez, but byte-reproducible (fixed timestamps in the zip entries)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}")


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, 8, 8)
    # Legacy (TorchScript) exporter: with training=EVAL it fuses Conv+BatchNorm even without
    # constant folding; PRESERVE on an eval-mode model keeps BatchNormalization nodes in
    # inference form (running statistics), which is what we want to ship.
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
        export_params=True, keep_initializers_as_inputs=False)


def check_export(path: Path, model: nn.Module, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    m = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(m, full_check=True)
    ops = Counter(n.op_type for n in m.graph.node)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    print(f"onnx: ir_version {m.ir_version}, opset {opset}")
    print("ops:", dict(sorted(ops.items())))
    assert ops["BatchNormalization"] == 5, "BatchNormalization nodes were folded away"
    assert m.ir_version <= 10, m.ir_version
    assert opset["ai.onnx"] == OPSET, opset
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, 8, 8], dims

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x_eval})[0]
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x_eval)).numpy()
    diff = float(np.abs(got - ref).max())
    print(f"onnxruntime vs torch (eval), batch {len(x_eval)}: max abs diff {diff:.2e}")
    assert diff < 1e-4, diff
    one = sess.run(["logits"], {"input": x_eval[:1]})[0]                  # batch 1 works too
    assert np.abs(one - ref[:1]).max() < 1e-4
    return float((got.argmax(1) == y_eval).mean())


def main() -> int:
    seed_everything(SEED)
    x_tr, x_te, y_tr, y_te = load_data()
    print(f"train {len(x_tr)}  held-out {len(x_te)}")

    model = DigitsCNN()
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    train(model, x_tr, y_tr)
    model.eval()
    with torch.no_grad():
        acc_torch = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    print(f"held-out accuracy (torch): {acc_torch:.4f}")

    onnx_path = HERE / "digits_cnn.onnx"
    export(model, onnx_path)
    acc_ort = check_export(onnx_path, model, x_te, y_te)
    print(f"held-out accuracy (onnxruntime): {acc_ort:.4f}")

    calib = HERE / "digits_calib"
    calib.mkdir(exist_ok=True)
    for old in calib.glob("sample_*.npz"):
        old.unlink()
    for i in range(N_CALIB):
        save_npz(calib / f"sample_{i:03d}.npz", input=x_tr[i:i + 1])
    save_npz(HERE / "digits_eval.npz", input=x_te)
    np.save(HERE / "digits_eval_labels.npy", y_te)
    print(f"wrote {onnx_path.name}, {N_CALIB} files in {calib.name}/, digits_eval.npz")

    if acc_torch < 0.95 or acc_ort < 0.95:
        print("held-out accuracy below 0.95", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
