import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

ZOO_INPUT = (2, 3, 12, 12)      # the input of builders.conv_zoo: batch 2


def zoo_feeds(n: int = 24, seed: int = 1, shape: tuple[int, ...] = ZOO_INPUT) -> list[dict[str, np.ndarray]]:
    """`n` random feeds {"x": float32 array of `shape`} for builders.conv_zoo, reproducible by seed."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.fixture
def feeds():
    """The calibration-feed maker of the conv-zoo tests: feeds(n=24, seed=1, shape=(2, 3, 12, 12))."""
    return zoo_feeds


@pytest.fixture
def cli_run(capsys, monkeypatch):
    """Run the command line in this process: cli_run(*argv) -> (exit code, stdout, stderr)."""
    from onnxq import cli

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["onnxq", *map(str, argv)])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run
