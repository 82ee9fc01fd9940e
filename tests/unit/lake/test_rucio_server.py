"""The Rucio server's release: read from /ping, said once (and on a change), a warning for one
older than the oldest tested; the tested releases agree with the lake scripts CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from edge_agent.lake.rucio_server import NEWEST_TESTED, OLDEST_TESTED, ServerRelease, older_than_tested, release

from .test_rucio_client import make

ROOT = Path(__file__).resolve().parents[3]


def test_release_numbers_are_read_from_what_servers_answer() -> None:
    assert release("38.6.4") == (38, 6, 4)
    assert release("41.5.1") == (41, 5, 1)
    assert release("1.29.0.post1") == (1, 29, 0)
    assert release("40.1") == (40, 1, 0)
    assert release("?") is None and release("") is None and release("dev-build") is None


@pytest.mark.parametrize(("version", "older"), [
    ("1.29.12", True), ("35.9.2", True), ("38.0.0", True), ("38.6.3", True),
    (OLDEST_TESTED, False), ("38.7.0", False), ("39.0.0", False), (NEWEST_TESTED, False), ("42.0.0", False),
    ("?", False),    # nothing certain can be said of a release the server does not name
])
def test_older_than_tested(version: str, older: bool) -> None:
    assert older_than_tested(version) is older


def test_the_tested_releases_are_the_ones_the_lake_scripts_install() -> None:
    common = (ROOT / "scripts" / "lake" / "common.sh").read_text()
    assert re.search(rf"^RUCIO_NEWEST={re.escape(NEWEST_TESTED)}$", common, re.MULTILINE)
    assert re.search(rf"^RUCIO_OLDEST_LTS={re.escape(OLDEST_TESTED)}$", common, re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    assert NEWEST_TESTED in readme and OLDEST_TESTED in readme


def test_a_release_is_said_once_then_again_only_when_it_changes() -> None:
    seen = ServerRelease("http://rucio.test")
    with capture_logs() as logs:
        for v in ("41.5.1", "41.5.1", "41.5.1"):
            seen.seen(v)
    assert [(e["log_level"], e["version"]) for e in logs] == [("info", "41.5.1")]
    with capture_logs() as logs:
        seen.seen("41.6.0")    # the site upgraded Rucio under the running agent
        seen.seen("41.6.0")
    assert [(e["log_level"], e["version"], e["was"]) for e in logs] == [("warning", "41.6.0", "41.5.1")]
    with capture_logs() as logs:   # a rolling upgrade behind a load balancer: the two take turns
        for v in ("41.5.1", "41.6.0") * 5:
            seen.seen(v)
    assert logs == [] and seen.version == "41.6.0"


def test_a_server_older_than_the_oldest_tested_is_a_warning_naming_the_tested_range() -> None:
    seen = ServerRelease("http://rucio.test")
    with capture_logs() as logs:
        seen.seen("35.9.2")
        seen.seen("35.9.2")
    assert len(logs) == 1 and logs[0]["log_level"] == "warning"
    assert logs[0]["version"] == "35.9.2" and logs[0]["tested"] == f"{OLDEST_TESTED} to {NEWEST_TESTED}"


def test_the_client_says_the_release_the_first_ping_answers() -> None:
    answers = iter(["38.6.4", "38.6.4", "35.9.2"])

    def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/ping"
        return httpx.Response(200, json={"version": next(answers)})
    client = make(server)
    with capture_logs() as logs:
        assert [client.ping() for _ in range(3)] == ["38.6.4", "38.6.4", "35.9.2"]
    said = [(e["log_level"], e["version"]) for e in logs if e.get("event", "").startswith("Rucio server")]
    assert said == [("info", "38.6.4"), ("warning", "35.9.2"), ("warning", "35.9.2")]
    assert client.server.version == "35.9.2"

