"""onnxq: post-training quantization of ONNX models to INT8/INT4 QDQ graphs.

The public names are imported on first use, so `import onnxq` (and `onnxq --help`) stay fast."""

from .config import VERSION as __version__

_EXPORTS = {
    "convert": "api", "save": "api", "ConvertConfig": "config", "Report": "types", "Stats": "types",
    "OnnxqError": "errors", "Preprocess": "calib.data", "PRESETS": "calib.data",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnxq' has no attribute '{name}'")
    from importlib import import_module

    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
