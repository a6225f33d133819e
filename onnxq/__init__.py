"""onnxq: post-training quantization of ONNX models to INT8/INT4 QDQ graphs."""

__version__ = "0.1.0"

from .api import convert, save  # noqa: E402
from .calib.data import PRESETS, Preprocess  # noqa: E402
from .config import ConvertConfig  # noqa: E402
from .errors import OnnxqError  # noqa: E402
from .types import Report, Stats  # noqa: E402

__all__ = ["convert", "save", "ConvertConfig", "Report", "Stats", "OnnxqError", "Preprocess",
           "PRESETS", "__version__"]
