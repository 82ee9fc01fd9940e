"""Storage faults: the real daemon uploads through a fault proxy to the real XRootD and registers in
the real Rucio; the proxy cuts uploads, answers 5xx, stalls past the agent's timeout, truncates
answers and lies about adler32.

What each scenario proves: no local file is deleted without a verified replica (every deletion's
evidence is a replica whose size and adler32 the storage reported truthfully), no file is lost, a
copy the storage lies about never counts, and the agent recovers by itself once the fault stops
(except a storage that keeps lying: after 3 bad copies the file is quarantined, kept, and sent by
`edge-agent retry` once the storage tells the truth). At the end the storage holds the original bytes.

How uploads reach the proxy: a test RSE, EDGE_FAULTS_<port>, whose only protocol is http on the
proxy's port (prefix /data/faults/ in the same XRootD). The agent learns its upload URLs from Rucio
(lfns2pfns) and verifies replicas on the PFNs Rucio lists, so both the upload and the confirmation
go through the proxy with no test-only setting in the agent. The port is in the RSE's name because
Rucio caches an RSE's protocols for 15 min (core/rse.py REGION): re-pointing one RSE at a new port
would send agents to a dead port meanwhile. The RSE has no `lake` attribute, so no other test's
`lake=true` rule lands on it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from support import Daemon, buffer_names

from tests.faults.fault_proxy import FaultProxy, Request, on
from tests.faults.lake_invariants import check
from tests.faults.local_invariants import Manifest
from tests.integration.test_rucio_lake import check_in_lake, rucio_agent, uid

pytestmark = [pytest.mark.integration, pytest.mark.lake, pytest.mark.rucio_server]

TIMEOUT_S = 3          # the agent's storage (and Rucio) timeout in these tests: a stall outlasts it
SIZE = 1_000_000       # per file: a reset after 300 kB is mid-upload


def _bootstrap() -> Any:
    from lake import SCRIPTS
    spec = importlib.util.spec_from_file_location("lake_bootstrap", SCRIPTS / "lake_bootstrap.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rse(lake: Any, xrootd_proxy: FaultProxy) -> str:
    """An RSE whose http protocol is the proxy (created once per proxy port; idempotent)."""
    name = f"EDGE_FAULTS_{xrootd_proxy.port}"
    proto = _bootstrap().protocol("http", xrootd_proxy.port, "/data/faults/", "rucio.rse.protocols.webdav.Default", 1)
    lake.call("POST", f"/rses/{name}", ok=(201, 409))
    lake.call("POST", f"/rses/{name}/protocols/http", proto, ok=(201, 409))
    lake.unlimited(name)
    return name


def faulty_agent(agent: Any, lake: Any, rse: str) -> tuple[Daemon, str]:
    u = uid()
    d = rucio_agent(agent, lake, {"daq": {"copies": 1, "name_template": f"{u}.{{filename}}",
                                          "dataset_template": ""}},
                    destinations={"faulty": {"kind": "rse", "rse": rse, "scheme": "http"}},
                    rucio={"timeout_seconds": TIMEOUT_S})
    return d, u


def write(d: Daemon, n: int) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        data = os.urandom(SIZE + i)
        tmp = d.rule_dir() / f"f{i}.fits.part"
        tmp.write_bytes(data)
        os.rename(tmp, d.rule_dir() / f"f{i}.fits")
        out[f"f{i}.fits"] = data
    return out


def invariants_hold(d: Daemon, lake: Any, rse: str, u: str, files: dict[str, bytes], settled: bool) -> None:
    """tests/faults/lake_invariants.py on buffer, ledger, Rucio and storage: nothing lost, nothing
    deleted without its copies, and once settled nothing half-done (no partial upload left behind)."""
    m = Manifest(d.rule_dir())
    for name, data in files.items():
        m.record(name, data)
    problems = check(m, d.state / "ledger.sqlite", lake, u, copies=1, settled=settled, rses=[rse])
    assert problems == [], "\n".join(problems)


def kept(d: Daemon, lake: Any, rse: str, u: str, files: dict[str, bytes]) -> bool:
    """Every local file still there, with its bytes, none counted deleted, the invariants hold."""
    assert d.counts().get("deleted") is None, d.counts()
    assert {n: (d.rule_dir() / n).read_bytes() for n in buffer_names(d.rule_dir())} == files
    invariants_hold(d, lake, rse, u, files, settled=False)
    return True


def delivered_intact(d: Daemon, lake: Any, rse: str, u: str, files: dict[str, bytes]) -> None:
    """All deleted locally, each on the storage with its original bytes, each deletion's evidence a
    replica with the local size and adler32, nothing quarantined, nothing half-done."""
    d.wait_for(lambda: d.counts().get("deleted") == len(files), 90, "every file delivered and deleted")
    assert buffer_names(d.rule_dir()) == []
    names = {f"{u}.{k}": v for k, v in files.items()}
    check_in_lake(lake, names, [rse])
    for n, data in names.items():
        assert lake.local_path(lake.pfn(rse, lake.scope, n)).read_bytes() == data, n
    deleted = [e for e in d.events() if e.get("event") == "deleted"]
    assert len(deleted) == len(files)
    for e in deleted:
        assert e["replicas"] and all(r["adler32"] == e["local_adler32"] and r["size"] == e["local_size"]
                                     for r in e["replicas"]), e
    assert "quarantined" not in d.counts()
    invariants_hold(d, lake, rse, u, files, settled=True)


def failures(d: Daemon, text: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == "failed_retryable" and text in (e.get("reason") or "")]


def rewrites(d: Daemon) -> list[dict[str, Any]]:
    """The copies found bad or gone after their upload and sent back to be written again."""
    return [e for e in d.events() if e.get("event") == "rewrite_copies"]


class NthDigestHead:
    """Matches the Want-Digest HEADs of each path whose per-path number is in `lie_on` (1-based):
    the first is the check right after the upload, the next ones the confirmation's."""

    def __init__(self, lie_on: Callable[[int], bool]) -> None:
        self.lie_on = lie_on
        self.count: dict[str, int] = {}

    def __call__(self, r: Request) -> bool:
        if r.method != "HEAD" or "want-digest" not in r.headers:
            return False
        self.count[r.path] = self.count.get(r.path, 0) + 1
        return self.lie_on(self.count[r.path])


def test_connection_reset_mid_upload(agent: Any, lake: Any, rse: str, storage_proxy: FaultProxy) -> None:
    d, u = faulty_agent(agent, lake, rse)
    storage_proxy.reset(after_bytes=300_000, match=on("PUT"), times=3)
    d.start()
    files = write(d, 3)
    delivered_intact(d, lake, rse, u, files)
    assert storage_proxy.hits("reset") == 3
    assert len(failures(d, "PUT")) == 3          # each cut upload was a retryable failure, nothing worse


def test_5xx_on_upload_and_on_verification(agent: Any, lake: Any, rse: str, storage_proxy: FaultProxy) -> None:
    d, u = faulty_agent(agent, lake, rse)
    for status in (500, 502, 503):
        storage_proxy.answer(status, match=on("PUT"), times=1)
    storage_proxy.answer(500, match=on("HEAD", header="want-digest"), times=1)
    d.start()
    files = write(d, 3)
    delivered_intact(d, lake, rse, u, files)
    assert storage_proxy.hits("answer") == 4
    assert len(failures(d, "HTTP 50")) == 4


def test_stalls_past_the_timeout(agent: Any, lake: Any, rse: str, storage_proxy: FaultProxy) -> None:
    d, u = faulty_agent(agent, lake, rse)
    # a PUT that lands but is never answered, and an existence HEAD that is never answered
    storage_proxy.stall(4 * TIMEOUT_S, match=on("PUT"), times=1, forward=True)
    storage_proxy.stall(4 * TIMEOUT_S, match=lambda r: r.method == "HEAD" and "want-digest" not in r.headers,
                        times=1)
    d.start()
    files = write(d, 3)
    delivered_intact(d, lake, rse, u, files)
    assert storage_proxy.hits("stall") == 2
    assert len(failures(d, "timed out")) == 2


def test_truncated_answers(agent: Any, lake: Any, rse: str, storage_proxy: FaultProxy) -> None:
    d, u = faulty_agent(agent, lake, rse)
    storage_proxy.truncate(keep_bytes=1, match=on("PUT"), times=2)    # the upload landed, its answer is cut
    d.start()
    files = write(d, 3)
    delivered_intact(d, lake, rse, u, files)
    assert storage_proxy.hits("truncate") == 2
    assert len(failures(d, "PUT")) == 2


def test_wrong_digest_after_upload_is_not_a_copy(agent: Any, lake: Any, rse: str,
                                                 storage_proxy: FaultProxy) -> None:
    d, u = faulty_agent(agent, lake, rse)
    storage_proxy.wrong_digest(match=NthDigestHead(lambda n: n == 1))    # each file's first check lies
    d.start()
    files = write(d, 3)
    delivered_intact(d, lake, rse, u, files)
    assert storage_proxy.hits("digest") == 3
    assert len(failures(d, "storage checksum mismatch")) == 3


def test_wrong_digest_at_confirmation_never_counts(agent: Any, lake: Any, rse: str,
                                                   storage_proxy: FaultProxy) -> None:
    """The upload verifies; then the storage lies when the agent confirms before deleting."""
    d, u = faulty_agent(agent, lake, rse)
    storage_proxy.wrong_digest(match=NthDigestHead(lambda n: n == 2))
    d.start()
    files = write(d, 3)
    delivered_intact(d, lake, rse, u, files)
    assert storage_proxy.hits("digest") == 3
    # each lie was seen as a bad copy and the file written again, never deleted on its strength
    assert len(rewrites(d)) == 3


def test_a_storage_that_keeps_lying_quarantines_and_keeps_the_files(agent: Any, lake: Any, rse: str,
                                                                    storage_proxy: FaultProxy) -> None:
    d, u = faulty_agent(agent, lake, rse)
    liar = storage_proxy.wrong_digest(match=on("HEAD", header="want-digest"))
    d.start()
    files = write(d, 2)
    d.wait_for(lambda: d.counts().get("quarantined") == 2, 90, "quarantine after 3 bad copies each")
    assert kept(d, lake, rse, u, files)
    for name in files:                             # Rucio never lists the lied-about copy as AVAILABLE
        info = lake.replicas(lake.scope, f"{u}.{name}")   # (the first copy is checked before registration)
        assert not info or info["states"].get(rse) != "AVAILABLE"
    reasons = [f["reason"] for f in d.files()]
    assert all("storage checksum mismatch" in r for r in reasons), reasons
    storage_proxy.remove(liar)                     # the storage is mended; the operator retries
    time.sleep(1)
    assert kept(d, lake, rse, u, files)
    assert d.cli("retry", "--all").returncode == 0
    delivered_intact(d, lake, rse, u, files)
