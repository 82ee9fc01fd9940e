"""`python -m benchmarks --quick` runs the parts that need no lake, and each writes its section
(figures are never asserted: only that the measuring works)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_local_parts_run_quickly_and_record_their_sections(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "latency,scale"], cwd=ROOT,
                       env={**os.environ, "EDGE_BENCH_RESULTS": str(results)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = results.read_text()
    assert "## benchmarks/latency.py" in text and "## benchmarks/scale.py" in text
    assert "completion -> upload starts" in text and "| 10 |" in text          # every file measured
    assert "full rescan with every file already in the ledger" in text and "(2,000 entries)" in text
