"""The status server answers only requests addressed to it by a loopback name, its bound address or
an operator's name: a browser page from elsewhere cannot read it through DNS rebinding."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from edge_agent.settings import StatusSettings
from edge_agent.status.server import StatusServer, host_allowed


@pytest.mark.parametrize(("header", "bind", "allowed", "ok"), [
    ("127.0.0.1:8787", "127.0.0.1", (), True),
    ("127.0.0.1", "127.0.0.1", (), True),
    ("127.3.4.5:80", "127.0.0.1", (), True),
    ("localhost:8787", "127.0.0.1", (), True),
    ("LOCALHOST.", "127.0.0.1", (), True),
    ("[::1]:8787", "::1", (), True),
    ("[::1]", "127.0.0.1", (), True),
    ("10.0.0.5:8787", "10.0.0.5", (), True),          # the address it is bound to
    ("daq01.example.org:8787", "daq01.example.org", (), True),
    ("daq01.example.org:8787", "0.0.0.0", ("daq01.example.org",), True),
    ("DAQ01.example.org.", "0.0.0.0", ("daq01.example.org",), True),
    ("[fd00::7]:8787", "0.0.0.0", ("fd00::7",), True),
    ("anything.example:1", "0.0.0.0", ("*",), True),
    (None, "127.0.0.1", (), True),                     # HTTP/1.0 without Host: no browser sends that
    ("evil.example.com:8787", "127.0.0.1", (), False),
    ("evil.example.com", "0.0.0.0", ("daq01.example.org",), False),
    ("localhost.evil.example.com", "127.0.0.1", (), False),
    ("127.0.0.1.evil.example.com:8787", "127.0.0.1", (), False),
    ("10.0.0.5:8787", "127.0.0.1", (), False),
    ("", "127.0.0.1", (), False),
])
def test_host_allowed(header: str | None, bind: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert host_allowed(header, bind, allowed) is ok


@pytest.fixture
def server() -> Iterator[StatusServer]:
    runner = SimpleNamespace(last_tick=time.time(), agent_id=None)
    srv = StatusServer(runner, "127.0.0.1", 0, allowed_hosts=["Status.Example.org"])  # type: ignore[arg-type]
    srv.start()
    yield srv
    srv.stop()


def get(srv: StatusServer, host: str, method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    try:
        conn.putrequest(method, "/healthz", skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_foreign_host_header_is_refused(server: StatusServer) -> None:
    port = server.address[1]
    assert get(server, f"evil.example.com:{port}")[0] == 421
    assert get(server, f"evil.example.com:{port}", "HEAD")[0] == 421
    assert get(server, f"127.0.0.1:{port}")[0] == 200
    assert get(server, f"localhost:{port}")[0] == 200
    assert get(server, f"status.example.org:{port}")[0] == 200
    assert get(server, f"evil.example.com:{port}", "POST")[0] == 405   # still read-only


def test_allowed_hosts_setting() -> None:
    assert StatusSettings().allowed_hosts == []
    assert StatusSettings(allowed_hosts=["DAQ01.example.org.", "*"]).allowed_hosts == ["daq01.example.org", "*"]
    with pytest.raises(ValueError, match="allowed_hosts"):
        StatusSettings(allowed_hosts=["http://daq01.example.org/"])
