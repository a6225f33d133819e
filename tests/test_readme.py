"""The README's quick start runs as written: its first command line, minus `pip install . && `."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
INSTALL = "pip install . && "


def quick_start() -> str:
    """The first line of the README's first ```bash block, without the install step."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no ```bash block"
    line = block.group(1).splitlines()[0]
    assert line.startswith(INSTALL), line
    return line[len(INSTALL):]


def console_script(bin_dir: Path) -> None:
    """An `onnxq` command in bin_dir that runs pyproject's [project.scripts] entry point with this
    interpreter, so the test runs the checkout under test whether or not it is installed."""
    entry = re.search(r'^onnxq\s*=\s*"([\w.]+):(\w+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert entry, "pyproject.toml declares no onnxq console script"
    module, func = entry.groups()
    bin_dir.mkdir()
    script = bin_dir / "onnxq"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)


def test_the_first_command_converts_and_evaluates_the_digits_cnn(tmp_path):
    command = quick_start()
    assert command.startswith("onnxq convert models/") and " && onnxq eval " in command
    shutil.copytree(REPO / "models", tmp_path / "models")         # the relative paths resolve here
    console_script(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "COLUMNS": "200"}
    r = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / re.search(r"-o (\S+)", command).group(1)
    assert out.is_file() and f"wrote {out.name}" in r.stdout
    acc = re.search(r"top-1 accuracy against --labels: (\d\.\d+) \(reference\) -> (\d\.\d+) \(candidate\)", r.stdout)
    assert acc, r.stdout
    reference, candidate = map(float, acc.groups())
    assert reference > 0.9 and candidate > 0.9 and abs(reference - candidate) < 0.05
