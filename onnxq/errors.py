"""Errors a user can see. Each message says what went wrong and what to do next."""


class OnnxqError(Exception):
    """Base class: the CLI prints str(error) on one line and exits with `exit_code`."""

    exit_code = 2


class InputModelError(OnnxqError):
    """The input model is missing, unreadable, or unsupported."""


class CalibrationError(OnnxqError):
    """Calibration data is missing, empty, or does not match the model."""


class RuntimeModelError(OnnxqError):
    """onnxruntime cannot load or run a model onnxq needs to run."""


class OutputError(OnnxqError):
    """The output path cannot be written."""


class ConfigError(OnnxqError):
    """An option has a value the converter cannot use."""


class VerificationError(OnnxqError):
    """The converted model failed a check or fell below a requested fidelity."""

    exit_code = 3
