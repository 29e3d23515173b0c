"""The modules a source file imports, for the layering tests (which parts may import what)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports (``import a.b`` and ``from a.b import c`` give ``a.b``)."""
    return _modules(ast.parse(path.read_text()))


def _modules(tree: ast.AST) -> list[str]:
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def runtime_imports(path: Path) -> list[str]:
    """As ``imported_modules``, without the imports under ``if TYPE_CHECKING:`` (types only:
    never executed)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    return _modules(tree)
