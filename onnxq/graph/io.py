"""The one place that loads and saves models: validation, external data, atomic writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ..errors import InputModelError, OutputError
from ..types import InputSpec
from . import large
from .large import BASEPATH, external_bytes, is_large, weights_folder, without_basepath, write_external
from .walk import graphs

MIN_OPSET = 11


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and sanity-check an FP32 model (external data included). Raises InputModelError."""
    p = Path(path)
    if not p.exists():
        raise InputModelError(f"input model not found: {p}")
    if p.is_dir():
        raise InputModelError(f"input model is a folder, not an .onnx file: {p}")
    if p.stat().st_size == 0:
        raise InputModelError(f"input model is an empty file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeError) as e:
        raise InputModelError(f"{p} is not a readable ONNX model (protobuf parse failed: "
                              f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if not model.graph.node or not model.opset_import:
        raise InputModelError(f"{p} is not an ONNX model (no graph nodes or opset found); "
                              "is it truncated or a different file type?")
    _load_external(model, p)
    _check_float32(model, p)
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise InputModelError(f"{p} uses opset {opset}; onnxq needs opset {MIN_OPSET} or newer "
                              "(upgrade it with onnx.version_converter first)")
    return model


TARGET_KEY = "onnxq.target"      # metadata: the emission rules a model was written for
SESSION_KEY = "onnxq.session_options"   # metadata (JSON): onnxruntime session entries, where not the target's


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def get_metadata(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def constant_dequantizes(data: bytes) -> int:
    """DequantizeLinear nodes of a serialized model (every graph) that read a constant: a runtime
    that runs them dequantizes those weights on every call."""
    m = onnx.load_from_string(data)
    count = 0
    for _, g in graphs(m):
        consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        count += sum(n.op_type == "DequantizeLinear" and n.input[0] in consts for n in g.node)
    return count


PAIR_SAFE_CODE = 64      # INT8 codes within +-64: no pair of u8 x s8 products passes 32767 (2 x 255 x 64 = 32640)


def int8_weight_dequantizes(model: onnx.ModelProto, beyond: int = 0) -> int:
    """DequantizeLinear nodes of `model` (every graph) that read INT8 constant codes for a layer
    whose input is dequantized too: fused into onnxruntime's u8 x s8 integer kernels, which add
    pairs of products in int16 on x86 CPUs without VNNI and may saturate there
    (plan.rules.int16_pair_sums). A weight-only layer (float input, MatMulNBits) is not counted,
    nor, with `beyond`, one whose codes all lie within +-beyond (PAIR_SAFE_CODE: 2-4-bit codes in
    INT8 containers)."""
    count = 0
    for _, g in graphs(model):
        consts = {t.name: t for t in g.initializer if t.data_type == onnx.TensorProto.INT8}
        made_by = {o: n.op_type for n in g.node for o in n.output}
        weights = {n.output[0]: n.input[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
        for n in g.node:
            if (n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose") and len(n.input) > 1 and n.input[1] in weights
                    and made_by.get(n.input[0]) == "DequantizeLinear"):
                if beyond:
                    codes = large.tensor_array(consts[weights[n.input[1]]]).astype(np.int16)
                    if int(np.abs(codes).max(initial=0)) <= beyond:
                        continue
                count += 1
    return count


def _external_locations(model: onnx.ModelProto) -> set[str]:
    out = set()
    for _, g in graphs(model):
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                out.update(e.value for e in t.external_data if e.key == "location")
    return out


def _load_external(model: onnx.ModelProto, p: Path) -> None:
    """Read the external data of `model`, refusing any location outside the model's folder."""
    folder = p.resolve().parent
    for loc in sorted(_external_locations(model)):
        where = (folder / loc).resolve()
        if Path(loc).is_absolute() or ".." in Path(loc).parts or folder not in where.parents:
            raise InputModelError(f"refused: {p} asks to read external data from '{loc}', outside its own "
                                  "folder; onnxq reads only files beside the model")
        if not where.is_file():
            raise InputModelError(f"external data file '{loc}' of {p} is missing: keep it beside the model")
    if _leave_on_disk(model, folder):
        return
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError) as e:
        raise InputModelError(f"external data of {p} could not be read: {str(e).splitlines()[0][:160]}") from None


def _leave_on_disk(model: onnx.ModelProto, folder: Path) -> bool:
    """Weights of EXTERNAL_THRESHOLD or more stay in their files (graph/large.py); each main-graph
    external tensor is marked with the folder to read it from. False when the model is small
    enough to load whole (or keeps external tensors in subgraphs)."""
    main = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inner = [t for path, g in graphs(model) if path for t in g.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL]
    if inner or sum(external_bytes(t) for t in main) < large.EXTERNAL_THRESHOLD:
        return False
    for t in main:
        t.external_data.add(key=BASEPATH, value=str(folder))
        e = large.entries(t)
        end = int(e.get("offset", 0)) + external_bytes(t)
        if (folder / e["location"]).stat().st_size < end:
            raise InputModelError(f"external data file '{e['location']}' is shorter than tensor '{t.name}' "
                                  "needs: is it truncated?")
    return True


def _check_float32(model: onnx.ModelProto, p: Path) -> None:
    """onnxq quantizes float32 models; a float64 (or float16) model's inputs say so up front."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        t = i.type.tensor_type.elem_type if i.type.HasField("tensor_type") else 0
        if i.name not in inits and t in (onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            kind = onnx.TensorProto.DataType.Name(t).lower()
            raise InputModelError(f"{p} computes in {kind} (input '{i.name}'); onnxq quantizes float32 "
                                  "models: export the model in float32")


def _utf8(text) -> None:
    """Raise UnicodeError unless `text` is a string protobuf can write back (invalid UTF-8 in a
    file comes back as bytes or with surrogates)."""
    if not isinstance(text, str):
        raise UnicodeError("not a string")
    text.encode("utf-8")


def validate(model: onnx.ModelProto, name: str) -> None:
    """onnx.checker on an input model: a model it rejects gets one clear line, not a crash later."""
    try:
        for _, g in graphs(model):           # every name is read: invalid UTF-8 fails here, not later
            for n in g.node:
                for text in [n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute)]:
                    _utf8(text)
            for v in list(g.initializer) + list(g.input) + list(g.output) + list(g.value_info):
                _utf8(v.name)
    except UnicodeError:
        raise InputModelError(f"{name} holds names that are not valid UTF-8: is the file corrupt?") from None
    try:
        check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputModelError(f"{name} is not a valid ONNX model: {first[:200]}") from None


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on the model (through an external-data copy when it is too large for one
    protobuf; the model in memory is left as it is)."""
    if weights_folder(model) is not None:
        # weights left on disk: their files were checked at load (_leave_on_disk); the graph is
        # checked with empty stand-ins (the checker would look for the files in the working folder)
        m = without_basepath(model)
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                del t.external_data[:], t.dims[:]
                t.data_location = onnx.TensorProto.DEFAULT
                t.dims.append(0)
        onnx.checker.check_model(m)
        return
    if not is_large(model):
        onnx.checker.check_model(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxq-") as d:
        onnx.checker.check_model(str(write_external(model, d, "m.onnx")))


def check_output_path(out: str | os.PathLike, src: str | os.PathLike | None) -> Path:
    o = Path(out)
    if src is not None and o.resolve() == Path(src).resolve():
        raise OutputError(f"output path equals the input ({o}); the input is never overwritten — "
                          "choose another -o")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder is not writable: {parent}")
    if o.is_dir():
        raise OutputError(f"output path is a folder: {o}")
    if o.exists() and not (o.stat().st_mode & 0o222 and os.access(o, os.W_OK)):    # mode bits: root too
        raise OutputError(f"output file {o} exists and is read-only; it is not replaced: remove it or choose another -o")
    return o


def save_model(model: onnx.ModelProto, out: str | os.PathLike) -> None:
    """Write atomically: a temporary file (or, for a large model, a temporary folder holding the
    model and its `.data` file) beside the output, then rename; nothing is left on failure."""
    o = Path(out)
    parent = o.parent if str(o.parent) else Path(".")
    if is_large(model):
        _save_large(model, o, parent)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{o.name}.", suffix=".tmp", dir=str(parent))
    os.close(fd)
    done = False
    try:
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
        os.chmod(tmp, 0o644)
        os.replace(tmp, o)
        done = True
    except OSError as e:
        raise OutputError(f"could not write {o}: {e.strerror or e}") from None
    finally:                 # an error or an interrupt leaves no partial file behind
        if not done and os.path.exists(tmp):
            os.unlink(tmp)


def _save_large(model: onnx.ModelProto, o: Path, parent: Path) -> None:
    """The model file and its weights file `<name>.data`, written in a temporary folder beside
    the output and renamed into place (weights first)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{o.name}.", dir=str(parent)))
    try:
        path = write_external(model, tmp, o.name)
        data = tmp / (o.name + ".data")
        for p in (path, data):
            os.chmod(p, 0o644)
        os.replace(data, parent / data.name)
        os.replace(path, o)
    except OSError as e:
        raise OutputError(f"could not write {o}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tensor_infos(values, model: onnx.ModelProto) -> list:
    """Name, element type and shape (ints, symbolic names, or None) of graph inputs or outputs,
    initializers left out."""
    from ..types import TensorInfo

    inits = {t.name for t in model.graph.initializer}
    out = []
    for v in values:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        kind = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "unknown"
        out.append(TensorInfo(v.name, kind, dims))
    return out


def float_op_counts(model: onnx.ModelProto, seen: set[str]) -> dict[str, int]:
    """Op types (and how many nodes) in every graph other than the nodes in `seen`."""
    counts: dict[str, int] = {}
    for _, g in graphs(model):
        for n in g.node:
            if n.name not in seen:
                counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def input_specs(model: onnx.ModelProto):
    """The model's real inputs (initializers excluded) as InputSpec."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        if dtype is None:
            raise InputModelError(f"model input '{i.name}' is not a tensor; not supported")
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in tt.shape.dim)
        specs.append(InputSpec(i.name, np.dtype(dtype), shape))
    return specs
