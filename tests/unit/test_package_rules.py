"""The package rules of docs/architecture.md, checked on the source: they drift otherwise (issue #10)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "dbops"


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        yield p, ast.parse(p.read_text(), str(p))


def test_psycopg_is_imported_only_inside_dbops_pg():
    offenders = []
    for p, tree in _modules():
        rel = p.relative_to(PKG)
        if rel.parts[0] == "pg":
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "psycopg" or n.startswith("psycopg.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == [], f"psycopg imported outside dbops/pg: {offenders}"


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for p, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dbops"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{p.relative_to(PKG)}:{node.lineno} {a.name}")
    assert offenders == [], f"private names imported across modules: {offenders}"
