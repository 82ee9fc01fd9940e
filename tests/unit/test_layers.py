"""The catalogue side does not reach into the storage side: no module under edge_agent/lake/
imports edge_agent.transfer (the confirm step asks storage, through the transports' registry)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import edge_agent.lake

FORBIDDEN = "edge_agent.transfer"


def _imports(source: str, package: str) -> set[str]:
    """Every module `source` imports, with relative imports resolved against `package`."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_every_lake_module_is_importable_and_imports_no_transport() -> None:
    found = {}
    for info in pkgutil.iter_modules(edge_agent.lake.__path__, "edge_agent.lake."):
        module = importlib.import_module(info.name)
        assert module.__file__ is not None
        package = info.name if info.ispkg else info.name.rsplit(".", 1)[0]
        found[info.name] = sorted(m for m in _imports(Path(module.__file__).read_text(), package)
                                  if m == FORBIDDEN or m.startswith(FORBIDDEN + "."))
    assert {"edge_agent.lake.base", "edge_agent.lake.local", "edge_agent.lake.rucio"} <= set(found)
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_relative_imports_are_resolved() -> None:
    # the check above must see `from ..transfer.s3 import S3Transport` for what it is
    src = "from ..transfer.s3 import S3Transport\nfrom .. import transfer\nimport edge_agent.transfer.http\n"
    assert {"edge_agent.transfer.s3", "edge_agent.transfer", "edge_agent.transfer.http"} <= _imports(src, "edge_agent.lake")
