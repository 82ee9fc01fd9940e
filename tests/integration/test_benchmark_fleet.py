"""`python -m benchmarks --quick --only fleet` (benchmarks/fleet.py) runs 1, 2 and 3 agents on the
lake's PostgreSQL, records its section, and leaves no schema behind. Figures are never asserted:
only that the measuring works and every file went through."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.lake]

ROOT = Path(__file__).resolve().parents[2]


def schemas(lake: Any) -> set[str]:
    import psycopg
    with psycopg.connect(lake.env["EDGE_LAKE_LEDGER_URL"], password=lake.env["EDGE_LAKE_LEDGER_PASSWORD"]) as db:
        return {r[0] for r in db.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_fleet_%'")}


def test_the_fleet_part_runs_quickly_and_records_its_section(lake: Any, tmp_path: Path) -> None:
    env_file = tmp_path / "lake.env"
    env_file.write_text("".join(f'{k}="{v}"\n' for k, v in lake.env.items()))
    results = tmp_path / "results.md"
    before = schemas(lake)
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "fleet"], cwd=ROOT,
                       env={**os.environ, "EDGE_LAKE_ENV": str(env_file), "EDGE_BENCH_RESULTS": str(results)},
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = results.read_text()
    assert "## benchmarks/fleet.py" in text
    for n in (1, 2, 3):
        assert f"| {n} | 6/6 |" in text, text         # every file deleted, and the ledger agrees
    assert "x one agent" in text and ">= 1.6" in text and ">= 2.2" in text
    assert schemas(lake) == before                     # its schemas dropped
