"""Calibration: feeds from user data, one streamed onnxruntime pass, statistics reducers."""
