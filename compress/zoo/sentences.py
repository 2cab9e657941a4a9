"""English sentences gathered offline from the Python standard library's docstrings.

Every module, class and function docstring of the stdlib's .py files is read with `ast` (nothing is
imported); its first paragraph is kept when it looks like English prose. The result is deduplicated,
sorted, shuffled with a fixed seed and cut into disjoint splits, so it is the same on every run of the
same Python version.
"""

from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

from .base import check_split

SPLIT_SIZES = {"test": 600, "val": 300, "train": 2000}  # test: evaluation; train: calibration / distillation
SPLIT_SEED = 1234
MIN_WORDS, MAX_WORDS = 6, 60
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_CODE_CHARS = re.compile(r"[{}\[\]<>=|\\`$#@*~^]|::|->|\(\)|__")


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph with whitespace collapsed to single spaces."""
    return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())


def is_prose(text: str) -> bool:
    """English-looking prose: 6-60 words, starts with a letter, ends like a sentence, mostly letters,
    no doctest or markup/code characters."""
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not text[0].isalpha() or ">>>" in text:
        return False
    if not text.endswith((".", "!", "?")) or _CODE_CHARS.search(text):
        return False
    chars = text.replace(" ", "")
    if sum(c.isalpha() for c in chars) / len(chars) < 0.85:
        return False
    return all(w.isascii() for w in words)


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=1)
def all_sentences() -> tuple[str, ...]:
    """Every distinct prose first-paragraph found in the stdlib, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = sorted(
        {p for f in _stdlib_files(root) for d in _docstrings(f) if is_prose(p := first_paragraph(d))}
    )
    # the encoder is uncased: keep one of each case-insensitive duplicate so no two embeddings coincide
    unique = {s.casefold(): s for s in reversed(found)}
    return tuple(sorted(unique.values()))


@lru_cache(maxsize=4)
def _splits(seed: int) -> dict[str, tuple[str, ...]]:
    pool = list(all_sentences())
    need = sum(SPLIT_SIZES.values())
    if len(pool) < need:
        from pocketfleet import PocketfleetError

        raise PocketfleetError(
            f"found only {len(pool)} docstring sentences under {sysconfig.get_paths()['stdlib']}, need {need}"
        )
    random.Random(seed).shuffle(pool)
    out, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        out[split] = tuple(pool[start : start + size])
        start += size
    return out


def stdlib_sentences(split: str, seed: int = SPLIT_SEED) -> list[str]:
    """The sentences of one split ("train", "val" or "test"); the splits are disjoint."""
    return list(_splits(seed)[check_split(split)])
