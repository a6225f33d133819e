"""Models over the 2 GiB protobuf limit: their size without serializing them, external-data
copies written without touching the model in memory (onnx's own external-data saving moves the
weights out of the in-memory model), and weights left on disk.

An external-data model whose weights reach EXTERNAL_THRESHOLD is loaded without them: each
external tensor keeps its reference, plus a `basepath` entry naming the (checked) folder it was
loaded from, and `tensor_array` reads one tensor from its file when it is needed. Sessions load
such a model from its own folder (runtime.session), and saving copies the bytes file to file, so
the weights are never all in memory at once."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

import onnx
from onnx import numpy_helper

from .walk import graphs

EXTERNAL_THRESHOLD = 1_800_000_000  # bytes; above this a model is written and run with external data


BASEPATH = "basepath"     # external_data key: the folder a weight left on disk is read from


def entries(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def on_disk(t: onnx.TensorProto) -> bool:
    """Whether the tensor's bytes were left on disk at load (read them with tensor_array)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and BASEPATH in entries(t)


def disk_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for _, g in graphs(model) for t in g.initializer if on_disk(t)]


def values_bytes(t: onnx.TensorProto) -> int:
    """The bytes of a tensor's values from its shape and type alone (nothing read or copied)."""
    return math.prod(t.dims) * _itemsize(t.data_type)


@functools.lru_cache(maxsize=None)
def _itemsize(data_type: int) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def external_bytes(t: onnx.TensorProto) -> int:
    e = entries(t)
    if "length" in e:
        return int(e["length"])
    return values_bytes(t)


def raw_bytes(t: onnx.TensorProto) -> bytes:
    """A tensor's little-endian bytes, read from its file when it was left on disk."""
    if on_disk(t):
        e = entries(t)
        with open(Path(e[BASEPATH]) / e["location"], "rb") as f:
            f.seek(int(e.get("offset", 0)))
            return f.read(external_bytes(t))
    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, for tensors in memory and tensors left on disk alike."""
    if not on_disk(t):
        return numpy_helper.to_array(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(raw_bytes(t), dtype=dtype).reshape(tuple(t.dims)).copy()


def weights_folder(model: onnx.ModelProto) -> str | None:
    """The folder the model's on-disk weights come from (None: all in memory)."""
    return next((entries(t)[BASEPATH] for t in disk_tensors(model)), None)


def without_basepath(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external references name only location, offset and length (what
    onnxruntime and the checker accept), to be resolved against weights_folder(model)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in disk_tensors(m):
        keep = [(e.key, e.value) for e in t.external_data if e.key != BASEPATH]
        del t.external_data[:]
        for k, v in keep:
            t.external_data.add(key=k, value=v)
    return m


def payload_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every initializer's values (on disk or in memory), from shapes and types alone:
    nothing is serialized or copied. A lower bound of the model's serialized size (Constant nodes
    and strings not counted)."""
    return sum(values_bytes(t) for _, g in graphs(model) for t in g.initializer
               if t.data_type != onnx.TensorProto.STRING)


PROTOBUF_LIMIT = 2**31


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size with its weights (those left on disk counted too); past the
    protobuf limit (where serializing raises, after it has done the work) the initializers'
    payload."""
    outside = sum(external_bytes(t) for t in disk_tensors(model))
    payload = payload_bytes(model)
    if payload - outside >= PROTOBUF_LIMIT:
        return payload
    try:
        return model.ByteSize() + outside
    except Exception:
        return payload


def is_large(model: onnx.ModelProto) -> bool:
    """Written and run through external data: too big for one protobuf, or weights left on disk.
    Weights past the threshold decide without serializing the model (which, for a model of
    several GB, costs as much as writing it)."""
    if disk_tensors(model) or payload_bytes(model) >= EXTERNAL_THRESHOLD:
        return True
    return model_bytes(model) >= EXTERNAL_THRESHOLD


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
            raw = raw_bytes(t)
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
