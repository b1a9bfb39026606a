"""The shape of the code, checked: import layers (import-linter, configured in pyproject.toml), short
functions, and no function-level import that only dodges a cycle inside a method module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tunesmith"
MAX_LINES = 80


def test_method_modules_never_import_the_run_layer():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_method_modules_import_tunesmith_at_the_top():
    """A function-level import of tunesmith's own modules in a method module only hides a cycle or a layer
    breach; heavy third-party libraries (peft, transformers) may still be imported where they are used."""
    late = []
    for folder in ("tuning", "objectives", "regimes"):
        for path in sorted((SRC / folder).glob("*.py")):
            for fn in ast.walk(ast.parse(path.read_text())):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    late += [f"{folder}/{path.name}:{n.lineno} in {fn.name}" for n in ast.walk(fn)
                             if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not late, "move to the top of the module:\n" + "\n".join(late)
