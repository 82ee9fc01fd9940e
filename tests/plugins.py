"""Extractor plug-ins registered for a test, as an installed package would register them: a
`.dist-info` directory with an entry_points.txt in a directory put on sys.path (a test's own
process: monkeypatch.syspath_prepend; the daemon: PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

# what the tests register: the package's two examples, and plug-ins that fail in each way
ENTRY_POINTS = {
    "linecount": "edge_agent.extractors.examples:LineCount",
    "firstline": "edge_agent.extractors.examples:FirstLine",
    "broken": "edge_test_extractors:Broken",
    "broken-extract": "edge_test_extractors:BrokenExtract",
    "nested": "edge_test_extractors:Nested",
    "unloadable": "edge_test_extractors_missing:Nothing",
    "shapeless": "edge_test_extractors:Shapeless",
}

_MODULE = '''
class Broken:
    """Takes the stream and fails on the first chunk."""
    @classmethod
    def stream(cls, path, size):
        return cls()
    def update(self, chunk):
        raise ValueError("no frame header at byte 0")
    def reset(self):
        pass
    def result(self):
        return {"never": 1}


class BrokenExtract:
    """Reads the file itself, and fails."""
    @staticmethod
    def extract(path):
        raise OSError("the DAQ database does not answer")


class Nested:
    """Gives what the lake cannot filter on."""
    @staticmethod
    def extract(path):
        return {"detector": {"id": 3}}


class Shapeless:
    """Neither stream nor extract."""
'''


def install_extractor_plugins(site: Path) -> Path:
    """Register ENTRY_POINTS in a distribution under `site` (made if missing); returns `site`."""
    dist = site / "edge_test_extractors-1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-test-extractors\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[edge_agent.extractors]\n" + "".join(
        f"{name} = {value}\n" for name, value in ENTRY_POINTS.items()))
    (site / "edge_test_extractors.py").write_text(_MODULE)
    return site
