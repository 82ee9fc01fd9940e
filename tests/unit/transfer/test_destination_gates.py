"""Each rse destination's storage transports carry its own gate settings (isolate_requests,
puts_per_server), mounted at the URL prefixes Rucio gives its RSE, with the scheme's default
transport behind them; transports that reach one server share its gate (issue 14, item 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from edge_agent.app import RUCIO_SCHEMES, rucio_transports
from edge_agent.lake.rucio import RucioCatalogue
from edge_agent.lake.rucio_client import RucioClient
from edge_agent.settings import Settings
from edge_agent.transfer.registry import Transports

from ..lake.test_rucio import PASSWORD, FakeRucio


def _protocol(scheme: str, host: str, port: int, prefix: str) -> dict[str, Any]:
    return {"scheme": scheme, "hostname": host, "port": port, "prefix": prefix,
            "domains": {"wan": {"read": 1, "write": 1, "delete": 1}}}


class FakeRucioStorage(FakeRucio):
    """Two RSEs under one XRootD daemon (as the project's lake has them) and a dCache door."""

    PROTOCOLS: ClassVar[dict[str, list[dict[str, Any]]]] = {
        "XRD1": [_protocol("root", "127.0.0.1", 1094, "//data/xrd1/"),
                 _protocol("http", "127.0.0.1", 8080, "/data/xrd1/")],
        "XRD2": [_protocol("root", "127.0.0.1", 1094, "//data/xrd2/"),
                 _protocol("http", "127.0.0.1", 8080, "/data/xrd2/")],
        "DCACHE": [_protocol("davs", "dcache.example.org", 2880, "/pnfs/data/")],
    }

    def __init__(self) -> None:
        super().__init__()
        for rse, protocols in self.PROTOCOLS.items():
            self.rses[rse] = {"deterministic": True, "schemes": [p["scheme"] for p in protocols]}

    def protocols(self, request: httpx.Request, body: Any, rse: str) -> httpx.Response:
        if rse not in self.PROTOCOLS:
            return super().protocols(request, body, rse)
        return httpx.Response(200, json=self.PROTOCOLS[rse])

    ROUTES: ClassVar[list[tuple[str, Any]]] = [(r"GET /rses/([^/]+)/protocols", protocols), *FakeRucio.ROUTES]


def settings(tmp: Path) -> Settings:
    return Settings(
        state_dir=str(tmp / "state"),
        lake={"kind": "rucio", "rucio": {"url": "http://rucio.test", "account": "root",
                                         "auth": {"type": "userpass", "username": "ddmlab", "password": PASSWORD}}},
        destinations={"xrd1": {"kind": "rse", "rse": "XRD1"},
                      "xrd2": {"kind": "rse", "rse": "XRD2", "puts_per_server": 3},
                      "dcache": {"kind": "rse", "rse": "DCACHE", "isolate_requests": False}},
        rules={"push": {"directory": str(tmp / "daq"), "scope": "test", "copies": 3,
                        "destinations": ["xrd1", "xrd2", "dcache"]}})


@pytest.fixture
def transports(tmp_path: Path) -> Any:
    s = settings(tmp_path)
    assert s.lake.rucio is not None
    client = RucioClient(s.lake.rucio, transport=httpx.MockTransport(FakeRucioStorage()), sleep=lambda t: None)
    catalogue = RucioCatalogue(s, client, schemes=[*RUCIO_SCHEMES])
    made = rucio_transports(s, client, catalogue.storage_prefixes)
    yield made
    made.close()


def _gates(transports: Transports, url: str) -> tuple[bool, int]:
    g = transports.for_url(url)._gates  # type: ignore[attr-defined]
    return g.isolate, g.max_shared


def test_each_destination_has_its_own_gate_settings_at_its_storage_prefix(transports: Transports) -> None:
    assert _gates(transports, "http://127.0.0.1:8080/data/xrd1/test/a1/f") == (True, 1)     # the default
    assert _gates(transports, "http://127.0.0.1:8080/data/xrd2/test/a1/f") == (True, 3)
    assert _gates(transports, "davs://dcache.example.org:2880/pnfs/data/test/a1/f")[0] is False
    # root:// as Rucio writes its PFNs ('//' before the path): 0 (any number) unless set
    assert _gates(transports, "root://127.0.0.1:1094//data/xrd1/test/a1/f") == (True, 0)
    assert _gates(transports, "root://127.0.0.1:1094//data/xrd2/test/a1/f") == (True, 3)
    # a copy the lake made on an RSE no destination names: the scheme's transport, XRootD's limits
    assert _gates(transports, "http://127.0.0.1:8080/data/elsewhere/f") == (True, 1)
    assert _gates(transports, "https://other.example.org/data/f") == (True, 1)
    assert _gates(transports, "root://127.0.0.1:1094//data/elsewhere/f") == (True, 0)


def test_transports_reaching_one_server_share_its_gate(transports: Transports) -> None:
    urls = ["http://127.0.0.1:8080/data/xrd1/f", "http://127.0.0.1:8080/data/xrd2/f",
            "http://127.0.0.1:8080/data/elsewhere/f", "davs://dcache.example.org:2880/pnfs/data/f"]
    http = [transports.for_url(u) for u in urls]
    assert len({id(t) for t in http}) == 4                      # one transport (and client) each ...
    assert len({id(t._gates.board) for t in http}) == 1         # type: ignore[attr-defined]  # ... one gate per server
    root = [transports.for_url(u) for u in ("root://127.0.0.1:1094//data/xrd1/f", "root://127.0.0.1:1094//data/xrd2/f")]
    assert root[0] is not root[1] and root[0]._gates.board is root[1]._gates.board  # type: ignore[attr-defined]
    assert root[0]._gates.board is not http[0]._gates.board     # type: ignore[attr-defined]
