"""Fixtures shared by the unit tests: a clock that only moves when told, settings without the environment.

Helpers are handed out as fixtures (not imported) so the tests do not depend on how
pytest puts this directory on sys.path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


class FakeClock:
    """Use it as `clock=`; `.sleep` as `sleep=` advances it and records each sleep."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = float(start)
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def _no_edge_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's EDGE_AGENT_* variables must not leak into the settings under test."""
    for k in list(os.environ):
        if k.upper().startswith("EDGE_AGENT_"):
            monkeypatch.delenv(k)


@pytest.fixture(autouse=True)
def _logging_reset_after_each_test() -> Any:
    """A test that runs `main()` configures logging onto pytest's captured stderr, which is closed
    after that test: later tests that log would fail with "I/O operation on closed file"."""
    yield
    import structlog
    structlog.reset_defaults()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _settings_data(tmp: Path, rule: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """Plain data for a valid Settings: one rule 'r' on tmp/daq, destinations a and b (2 copies)."""
    d: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "destinations": {"a": {"path": str(tmp / "lake-a"), "fsync": False},
                         "b": {"path": str(tmp / "lake-b"), "fsync": False}},
        "rules": {"r": {"directory": str(tmp / "daq"), "scope": "test", "destinations": ["a", "b"],
                        "copies": 2, **(rule or {})}},
    }
    d.update(top)
    return d


@pytest.fixture
def settings_data() -> Callable[..., dict[str, Any]]:
    """settings_data(tmp_path, rule={...overrides of rule 'r'}, **top-level overrides) -> dict."""
    return _settings_data
