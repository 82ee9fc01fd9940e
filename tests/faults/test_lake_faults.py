"""Lake faults: the real daemon with its Rucio URL pointed at a fault proxy in front of the real Rucio
(the shared Rucio is never stopped); uploads go straight to the real XRootD.

What each scenario proves: while Rucio is unreachable (connections reset), too slow for the agent's
timeout, or answering 5xx, no file is deleted and none is lost or quarantined, /readyz says the lake
is the problem, and once the fault stops everything is delivered without anyone's help; latency below
the timeout and a burst of 500 DatabaseException are absorbed; a token Rucio refuses as expired
(401 CannotAuthenticate) is replaced by a new login and the call done again, with no failure at all.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
from support import Daemon, buffer_names

from tests.faults.fault_proxy import FaultProxy, on
from tests.faults.test_storage_faults import delivered_intact, invariants_hold
from tests.integration.test_rucio_lake import rucio_agent, uid

pytestmark = [pytest.mark.integration, pytest.mark.lake, pytest.mark.rucio_server]

TIMEOUT_S = 3          # the agent's Rucio timeout here: "slow" is above it, "a little slow" below


def lake_agent(agent: Any, lake: Any, proxy: FaultProxy) -> tuple[Daemon, str]:
    u = uid()
    d = rucio_agent(agent, lake, {"daq": {"copies": 1, "name_template": f"{u}.{{filename}}",
                                          "dataset_template": f"{u}.ds"}},
                    rucio={"url": proxy.url, "timeout_seconds": TIMEOUT_S})
    return d, u


def write(d: Daemon, prefix: str, n: int) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        data = os.urandom(100_000 + i)
        tmp = d.rule_dir() / f"{prefix}{i}.fits.part"
        tmp.write_bytes(data)
        os.rename(tmp, d.rule_dir() / f"{prefix}{i}.fits")
        out[f"{prefix}{i}.fits"] = data
    return out


def lake_not_ready(d: Daemon) -> str:
    """Waits for /readyz to blame the lake; returns what it says."""
    d.wait_for(lambda: d.get("/readyz")[0] == 503, 60, "/readyz to report the lake")
    why = json.loads(d.get("/readyz")[1])["not_ready_because"]
    assert any(w.startswith("lake:") for w in why), why
    return " ".join(why)


def held(d: Daemon, lake: Any, u: str, files: dict[str, bytes], during: dict[str, bytes],
         deleted_before: int) -> None:
    """Nothing more deleted, nothing quarantined, every waiting file still there with its bytes."""
    time.sleep(2)      # a window in which a wrong deletion would show
    counts = d.counts()
    assert counts.get("deleted", 0) == deleted_before and "quarantined" not in counts, counts
    assert {n: (d.rule_dir() / n).read_bytes() for n in buffer_names(d.rule_dir())} == during
    invariants_hold(d, lake, lake.lake_rses[0], u, files, settled=False)


def delivered(d: Daemon, lake: Any, u: str, files: dict[str, bytes]) -> None:
    """Everything delivered intact (test_storage_faults.delivered_intact), in its dataset, /readyz green."""
    delivered_intact(d, lake, lake.lake_rses[0], u, files)
    d.wait_for(lambda: d.get("/readyz")[0] == 200, 60, "/readyz green again")
    ds = lake.lines(lake.call("GET", f"/dids/{lake.scope}/{u}.ds/dids"))
    assert sorted(x["name"] for x in ds) == sorted(f"{u}.{k}" for k in files)


def outage(d: Daemon, lake: Any, u: str, proxy: FaultProxy, fault_on: Any) -> tuple[str, dict[str, bytes]]:
    """Deliver 2 files, switch the fault on (fault_on() returns it), write 3 more: they must wait,
    /readyz says why; the fault off: all 5 delivered. Returns what /readyz said, and the files."""
    d.start()
    files = write(d, "before", 2)
    d.wait_for(lambda: d.counts().get("deleted") == 2, 60, "delivery before the fault")
    fault = fault_on()
    files.update(during := write(d, "during", 3))
    why = lake_not_ready(d)
    held(d, lake, u, files, during, 2)
    proxy.remove(fault)
    delivered(d, lake, u, files)
    return why, files


def test_rucio_unreachable(agent: Any, lake: Any, rucio_proxy: FaultProxy) -> None:
    d, u = lake_agent(agent, lake, rucio_proxy)
    why, _ = outage(d, lake, u, rucio_proxy, lambda: rucio_proxy.reset())
    assert "Rucio at" in why
    assert rucio_proxy.hits("reset") > 0


def test_rucio_slower_than_the_timeout(agent: Any, lake: Any, rucio_proxy: FaultProxy) -> None:
    d, u = lake_agent(agent, lake, rucio_proxy)
    why, _ = outage(d, lake, u, rucio_proxy, lambda: rucio_proxy.delay(2 * TIMEOUT_S))
    assert "no answer in time" in why


def test_rucio_a_little_slow_is_absorbed(agent: Any, lake: Any, rucio_proxy: FaultProxy) -> None:
    d, u = lake_agent(agent, lake, rucio_proxy)
    rucio_proxy.delay(TIMEOUT_S / 6)
    d.start()
    files = write(d, "f", 3)
    delivered(d, lake, u, files)
    assert rucio_proxy.hits("delay") > 10


def test_rucio_answering_5xx(agent: Any, lake: Any, rucio_proxy: FaultProxy) -> None:
    d, u = lake_agent(agent, lake, rucio_proxy)
    # a gateway in front of Rucio that has lost it: 502 with no Rucio exception class
    why, files = outage(d, lake, u, rucio_proxy, lambda: rucio_proxy.answer(502, body=b"<html>Bad Gateway</html>"))
    assert "502" in why
    # then Rucio itself, briefly: its database busy on the writes
    more = write(d, "busy", 3)
    burst = rucio_proxy.answer(500, match=lambda r: r.method in ("POST", "PUT"), times=6,
                               headers={"ExceptionClass": "DatabaseException", "Content-Type": "application/json"},
                               body=json.dumps({"ExceptionClass": "DatabaseException",
                                                "ExceptionMessage": "database is locked"}).encode())
    d.wait_for(lambda: d.counts().get("deleted") == 8, 90, "delivery through a busy database")
    assert burst.hits == 6
    invariants_hold(d, lake, lake.lake_rses[0], u, {**files, **more}, settled=True)


def test_expired_token_is_renewed(agent: Any, lake: Any, rucio_proxy: FaultProxy) -> None:
    d, u = lake_agent(agent, lake, rucio_proxy)
    d.start()
    files = write(d, "before", 1)
    d.wait_for(lambda: d.counts().get("deleted") == 1, 60, "delivery with the first token")
    logins = len(rucio_proxy.seen("GET", "/auth/userpass"))
    # as Rucio answers a token past its end: the agent's cached one is refused once
    expired = rucio_proxy.answer(401, match=on(header="X-Rucio-Auth-Token"), times=1, headers={
        "ExceptionClass": "CannotAuthenticate", "ExceptionMessage": "Cannot authenticate with given credentials",
        "Content-Type": "application/json"}, body=b'{"ExceptionClass": "CannotAuthenticate", '
        b'"ExceptionMessage": "Cannot authenticate with given credentials"}')
    files.update(write(d, "after", 2))
    delivered(d, lake, u, files)
    assert expired.hits == 1
    log = rucio_proxy.seen()
    refused = next(i for i, x in enumerate(log) if x[2] == "answer 401")
    assert any(x[:2] == ("GET", "/auth/userpass") for x in log[refused:]), log[refused:]
    assert len(rucio_proxy.seen("GET", "/auth/userpass")) == logins + 1
    assert any(e.get("event") == "rucio token refused, authenticating again" for e in d.events())
    assert not [e for e in d.events() if e.get("event", "").startswith("failed")]
    assert lake.env["EDGE_LAKE_RUCIO_PASSWORD"] not in d.log.read_text()
