"""Small ONNX graphs built in code for graph-level tests (real onnxruntime runs them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, inits, opset=13, ir=8) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def conv_zoo(rng: np.random.Generator, opset: int = 13) -> onnx.ModelProto:
    """Conv+BN, Conv as Constant node, depthwise, grouped, auto_pad SAME, ConvTranspose, Gemm both
    ways, MatMul weight on the right and on the left: everything the converter must handle."""
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {
        "w0": r(16, 3, 3, 3), "b0": r(16),
        "bn_g": (1 + 0.1 * rng.standard_normal(16)).astype(np.float32), "bn_b": r(16),
        "bn_m": r(16), "bn_v": (0.5 + rng.random(16)).astype(np.float32),
        "wdw": r(16, 1, 3, 3), "wg": r(32, 4, 3, 3), "wt": r(32, 8, 2, 2),
        "wfc": r(10, 8), "bfc": r(10), "wfc2": r(10, 12), "wl": r(6, 12),
    }
    const_w = helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(r(16, 16, 1, 1)))
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn_g", "bn_b", "bn_m", "bn_v"], ["bn0"]),
        helper.make_node("Relu", ["bn0"], ["r0"]),
        const_w,
        helper.make_node("Conv", ["r0", "w1"], ["c1"]),
        helper.make_node("Conv", ["c1", "wdw"], ["c2"], group=16, auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "wg"], ["c3"], group=4, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["c3", "wt"], ["c4"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c4"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wfc", "bfc"], ["g1"], transB=1),
        helper.make_node("Gemm", ["g1", "wfc2"], ["g2"]),
        helper.make_node("Relu", ["g2"], ["g2r"]),
        helper.make_node("Transpose", ["g2r"], ["g2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["wl", "g2t"], ["m2"]),
        helper.make_node("Transpose", ["m2"], ["y"], perm=[1, 0]),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 12, 12])], [vi("y", ["N", 6])], inits, opset=opset)


def matmul_stack(folder: Path, layers: int, width: int, seed: int = 0) -> tuple[Path, int]:
    """`folder/big.onnx` + `folder/big.onnx.data`: `layers` residual blocks x + tanh(x W + b)
    with seeded weights scaled like a trained layer's, written straight into external data (the
    whole model is never in memory). Returns the model path and the weights' bytes."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    offset = 0
    data = folder / "big.onnx.data"
    with open(data, "wb") as f:
        def external(name: str, arr: np.ndarray) -> None:
            nonlocal offset
            raw = arr.astype(np.float32).tobytes()
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
            f.write(raw)
            offset += len(raw)
            inits.append(t)

        x = "x"
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32) * np.float32(1.0 / np.sqrt(width))
            external(f"w{i}", w)
            external(f"b{i}", rng.standard_normal(width, dtype=np.float32) * np.float32(0.1))
            del w
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                      helper.make_node("Tanh", [f"a{i}"], [f"t{i}"], name=f"tanh{i}"),
                      helper.make_node("Add", [x, f"t{i}"], [f"h{i}"], name=f"res{i}")]
            x = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "T", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path, offset
