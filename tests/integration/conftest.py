from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from support import Daemon


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Daemons a test started; all are stopped (or killed) at the end."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


@pytest.fixture
def agent(tmp_path: Path, daemons: list[Daemon]):  # type: ignore[no-untyped-def]
    def make(**kw) -> Daemon:  # type: ignore[no-untyped-def]
        d = Daemon(tmp_path / f"a{len(daemons)}", **kw)
        daemons.append(d)
        return d
    return make
