"""`python -m onnxq`: the same command line as `onnxq`."""

from .cli import main

main()
