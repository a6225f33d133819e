"""The package layout's import rules (README, "How it works"), checked on the source with `ast`.

Imports inside `if TYPE_CHECKING:` blocks are annotations only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "onnxq"
ROOT_MODULES = {"__init__", "__main__", "api", "cli", "config", "types", "errors", "runtime", "verify", "report", "html"}
MAX_FUNCTION_LINES = 60
ONNX_LIBS = ("onnx", "onnx_graphsurgeon", "google.protobuf")
PURE_FORBIDDEN = ("onnx", "onnx_graphsurgeon", "google.protobuf", "onnxruntime",
                  "onnxq.graph", "onnxq.runtime", "onnxq.search")


def module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk_runtime(node: ast.AST):
    """Every node below `node` except the bodies of `if TYPE_CHECKING:` (their `else:` counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _walk_runtime(other)
            continue
        yield child
        yield from _walk_runtime(child)


def imports(path: Path, pkg: Path = PKG) -> list[tuple[int, str]]:
    """(line, absolute module name) of every runtime import of a source file of package `pkg`;
    `from X import y` yields X and X.y (y may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, pkg)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
    return out


def within(mod: str, packages) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def violations(rule) -> list[str]:
    """'file:line imports module' for every import `rule(file module, imported)` refuses."""
    found = []
    for path in sources():
        me = module_name(path)
        for line, mod in imports(path):
            if rule(me, mod):
                found.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}")
    return found


def test_the_import_walker_resolves_relative_imports_and_skips_type_checking(tmp_path):
    """The rules below are only as good as the walker: check it on a package made for it."""
    pkg = tmp_path / "onnxq"
    (pkg / "plan").mkdir(parents=True)
    src = pkg / "plan" / "mod.py"
    src.write_text(
        "from __future__ import annotations\n"
        "import typing\n"
        "from typing import TYPE_CHECKING\n"
        "import numpy as np, onnx.helper\n"
        "from ..graph.rewrite import apply_plan\n"
        "from .. import runtime\n"
        "from . import acts\n"
        "if TYPE_CHECKING:\n"
        "    import onnxruntime\n"
        "    from ..search import lapq\n"
        "else:\n"
        "    import scipy\n"
        "if typing.TYPE_CHECKING:\n"
        "    import onnx_graphsurgeon\n"
        "def f():\n"
        "    from google.protobuf import message\n"
        "    return message\n")
    (pkg / "plan" / "__init__.py").write_text("from .mod import f\n")
    got = {m for _, m in imports(src, pkg)}
    assert {"numpy", "onnx.helper", "onnxq.graph.rewrite", "onnxq.graph.rewrite.apply_plan", "onnxq",
            "onnxq.runtime", "onnxq.plan", "onnxq.plan.acts", "scipy", "google.protobuf",
            "google.protobuf.message"} <= got
    assert not {"onnxruntime", "onnxq.search", "onnxq.search.lapq", "onnx_graphsurgeon"} & got
    assert dict((m, line) for line, m in imports(src, pkg))["onnxq.graph.rewrite"] == 5
    assert {m for _, m in imports(pkg / "plan" / "__init__.py", pkg)} == {"onnxq.plan.mod", "onnxq.plan.mod.f"}
    assert within("onnx.helper", ONNX_LIBS) and not within("onnxq", ONNX_LIBS) and not within("onnx_x", ["onnx"])


def test_only_graph_imports_onnx_and_onnx_graphsurgeon():
    bad = violations(lambda me, mod: within(mod, ONNX_LIBS) and not within(me, ["onnxq.graph"]))
    assert bad == [], "\n".join(bad)


def test_only_runtime_imports_onnxruntime():
    bad = violations(lambda me, mod: within(mod, ["onnxruntime"]) and me != "onnxq.runtime")
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("package", ["onnxq.algos", "onnxq.plan"])
def test_pure_packages_import_no_onnx_runtime_graph_or_search(package):
    bad = violations(lambda me, mod: within(me, [package]) and within(mod, PURE_FORBIDDEN))
    assert bad == [], "\n".join(bad)


def test_package_root_holds_only_the_listed_modules():
    root = {p.stem for p in PKG.glob("*.py")}
    assert root <= ROOT_MODULES, f"unexpected modules in onnxq/: {sorted(root - ROOT_MODULES)}"


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function and method in a source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def test_function_lengths_are_measured_from_def_to_last_line(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("@staticmethod\ndef a():\n    x = 1\n\n    return x\n\n\nclass C:\n    def b(self):\n"
                   "        def inner():\n            pass\n        return inner\n")
    assert function_lengths(src) == [("a", 2, 4), ("C.b", 9, 4), ("C.b.inner", 10, 2)]


def test_no_function_is_longer_than_60_lines():
    long = [f"{path.relative_to(PKG.parent)}:{line} {name} ({n} lines)"
            for path in sources() for name, line, n in function_lengths(path) if n > MAX_FUNCTION_LINES]
    assert long == [], "\n".join(long)
