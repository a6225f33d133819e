"""Searches with onnxruntime in the loop: probe, lapq, mixed precision, sequential."""
