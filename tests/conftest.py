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


@pytest.fixture(scope="session")
def converted():
    """converted(key, path, calib, **config) -> (model, report): a real model's conversion, made
    once per test session for each key and shared by the test files that check it (a PP-OCR rec
    conversion takes about a minute). Each caller gets its own copy of the model; the key must
    name the path, calibration and configuration, which are checked against the first call's."""
    import copy

    import onnxq

    made: dict = {}

    def convert(key: str, path: str, calib: list, **config):
        cfg = onnxq.ConvertConfig(**config)
        if key not in made:
            made[key] = (path, calib, cfg, *onnxq.convert(path, cfg, calib=calib))
        p, c, cfg0, q, rep = made[key]
        assert (p, cfg0) == (path, cfg) and len(c) == len(calib) and all(
            a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(c, calib)), key
        return copy.deepcopy(q), rep
    return convert
