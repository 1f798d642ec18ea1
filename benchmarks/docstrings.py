"""The docstrings of Python's standard library (its top-level modules'), one text per
line of a JSON lines file: text that ships with every Python, for the language-model
benchmark and tests.

    python benchmarks/docstrings.py OUT.jsonl
"""
from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path


def docstrings() -> list[str]:
    """Each module's, class's and function's docstring longer than 40 characters, its
    whitespace collapsed to single spaces."""
    texts = []
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) > 40:
                    texts.append(" ".join(text.split()))
    return texts


def write(path: Path) -> list[str]:
    """The docstrings, written to path as JSON lines ({"text": ...} each)."""
    texts = docstrings()
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


if __name__ == "__main__":
    print(f"{len(write(Path(sys.argv[1])))} docstrings in {sys.argv[1]}")
