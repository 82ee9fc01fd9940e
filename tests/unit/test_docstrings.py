"""Every public class in edge_agent/ says what it is, and every public method of the seams (the
interfaces a newcomer or a plugin writer works against) says what holds after it or what it
answers. An implementation of a documented base method need not repeat it."""

from __future__ import annotations

import ast
from pathlib import Path

import edge_agent

PACKAGE = Path(edge_agent.__file__).parent

# the seams: their public methods, and those of every class built on them, are documented
SEAMS = {"Catalogue", "Records", "Transport", "Transports", "StepContext", "Ledger", "Runner",
         "Discovery", "StatusServer"}

Functions = (ast.FunctionDef, ast.AsyncFunctionDef)


def _classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Every module-level class of the package by name, with the file it is in."""
    out: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append((str(path.relative_to(PACKAGE.parent)), node))
    return out


def _base_names(cls: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else b.attr for b in cls.bases if isinstance(b, ast.Name | ast.Attribute)]


def _ancestors(cls: ast.ClassDef, classes: dict[str, list[tuple[str, ast.ClassDef]]]) -> list[ast.ClassDef]:
    """The package's own classes `cls` is built on, nearest first (a base outside the package ends the walk)."""
    out: list[ast.ClassDef] = []
    todo = _base_names(cls)
    while todo:
        name = todo.pop(0)
        for _, base in classes.get(name, []):
            if base not in out:
                out.append(base)
                todo.extend(_base_names(base))
    return out


def _documented_in(bases: list[ast.ClassDef], method: str) -> bool:
    return any(isinstance(f, Functions) and f.name == method and ast.get_docstring(f)
               for base in bases for f in base.body)


def missing() -> list[str]:
    """Where a docstring is missing, as "path:line Class" or "path:line Class.method"."""
    classes = _classes()
    out = []
    for name, defs in classes.items():
        for path, cls in defs:
            if name.startswith("_"):
                continue
            if not ast.get_docstring(cls):
                out.append(f"{path}:{cls.lineno} {name}")
            bases = _ancestors(cls, classes)
            if name not in SEAMS and not SEAMS & {b.name for b in bases}:
                continue
            for f in cls.body:
                if (isinstance(f, Functions) and not f.name.startswith("_") and not ast.get_docstring(f)
                        and not _documented_in(bases, f.name)):
                    out.append(f"{path}:{f.lineno} {name}.{f.name}")
    return sorted(out)


def test_public_classes_and_seam_methods_have_docstrings() -> None:
    assert missing() == []


def test_the_scan_sees_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    # the scan itself: an undocumented class, an undocumented seam method, and an override of a
    # documented base method (which needs none)
    pkg = tmp_path / "edge_agent"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        'class Transport:\n    """Seam."""\n    def put(self):\n        """Sent."""\n    def close(self):\n        pass\n'
        'class Plain:\n    def helper(self):\n        pass\n'
        'class Http(Transport):\n    """An implementation."""\n    def put(self):\n        pass\n'
        '    def extra(self):\n        pass\n')
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    assert missing() == ["edge_agent/mod.py:14 Http.extra", "edge_agent/mod.py:5 Transport.close",
                         "edge_agent/mod.py:7 Plain"]
