"""Models over the 2 GiB protobuf limit: their size without serializing them, and external-data
copies written without touching the model in memory (onnx's own external-data saving moves the
weights out of the in-memory model)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import numpy_helper

from .walk import graphs

EXTERNAL_THRESHOLD = 1_800_000_000  # bytes; above this a model is written and run with external data


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size; past the protobuf limit (where ByteSize raises) the sum of its
    tensors' bytes."""
    try:
        return model.ByteSize()
    except Exception:
        return sum(t.ByteSize() for _, g in graphs(model) for t in g.initializer)


def is_large(model: onnx.ModelProto) -> bool:
    return model_bytes(model) >= EXTERNAL_THRESHOLD


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def write_external(model: onnx.ModelProto, folder: str | os.PathLike, name: str) -> Path:
    """`folder/name` (the graph, small) and `folder/name.data` (every main-graph initializer's
    bytes) for `model`, which is left as it is. Returns the model file's path."""
    folder = Path(folder)
    data_name = name + ".data"
    stub = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(stub, field, getattr(model, field))
    stub.opset_import.extend(model.opset_import)
    stub.metadata_props.extend(model.metadata_props)
    stub.functions.extend(model.functions)
    g, s = model.graph, stub.graph
    s.name, s.doc_string = g.name, g.doc_string
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(s, field).extend(getattr(g, field))
    offset = 0
    with open(folder / data_name, "wb") as f:
        for t in g.initializer:
            raw = _tensor_bytes(t)
            ref = s.initializer.add()
            ref.name, ref.data_type = t.name, t.data_type
            ref.dims.extend(t.dims)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                ref.external_data.add(key=key, value=value)
            f.write(raw)
            offset += len(raw)
    path = folder / name
    path.write_bytes(stub.SerializeToString(deterministic=True))
    return path
