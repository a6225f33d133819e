"""Quantization algorithms: pure functions over numpy arrays, no graph objects, no I/O."""
