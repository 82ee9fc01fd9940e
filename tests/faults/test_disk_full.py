"""Full filesystems, on small tmpfs mounts (root only): a destination, the buffer, the state directory.

Each scenario ends with the invariant check: nothing lost, nothing half-copied counted,
everything finished once there is room again.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from support import Daemon, buffer_names
from tests.faults.local_invariants import Manifest, check
from tests.faults.mounts import needs_root, resize, tmpfs

pytestmark = [pytest.mark.integration, needs_root]


def invariants(d: Daemon, m: Manifest, settled: bool = True) -> list[str]:
    return check(m, d.state / "ledger.sqlite", d.lakes, d.state / "lake-catalog.sqlite", copies=len(d.lakes),
                 settled=settled)


def test_a_destination_that_fills_up_mid_copy_counts_no_half_copy_and_delivers_once_freed(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    with tmpfs(d.lakes["lake2"], "1m"):
        for i in range(4):
            m.write(f"f{i}.fits", os.urandom(400_000))     # 1.6 MB for a 1 MB destination
        d.start()
        d.wait_for(lambda: any("No space left" in (e["reason"] or "") for e in d.status()["recent_errors"]),
                   30, "the full destination reported")
        d.wait_for(lambda: d.counts().get("deleted") == 2, 30, "what fits delivered")
        time.sleep(2)
        assert d.counts().get("deleted") == 2                   # nothing deleted without both copies
        assert buffer_names(d.rule_dir()) == sorted(f"f{i}.fits" for i in range(4)
                                                          if not (d.lakes["lake2"] / "test" / f"f{i}.fits").exists())
        assert [p for p in (d.lakes["lake2"] / "test").iterdir() if ".edge-agent-" in p.name] == []
        assert invariants(d, m, settled=False) == []
        resize(d.lakes["lake2"], "8m")
        d.wait_for(lambda: d.counts().get("deleted") == 4, 60, "everything delivered once there is room")
        assert invariants(d, m) == []
        assert d.stop() == 0


def test_a_full_buffer_fails_the_writer_not_the_agent_which_drains_it(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["closed", "stable"], "stable_seconds": 0.3}})
    with tmpfs(d.rule_dir(), "2m"):
        m = Manifest(d.rule_dir())
        d.start()
        enospc = 0

        def daq() -> None:
            # 24 x 300 kB through a 2 MB buffer; a write that hits ENOSPC is removed and tried again later
            nonlocal enospc
            for i in range(24):
                data = os.urandom(300_000)
                while True:
                    try:
                        m.write(f"run/f{i:02d}.fits", data)
                        break
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        enospc += 1
                        os.unlink(d.rule_dir() / "run" / f"f{i:02d}.fits")
                        time.sleep(0.2)

        writer = threading.Thread(target=daq)
        writer.start()
        writer.join(120)
        assert not writer.is_alive(), "the DAQ never got room again"
        assert enospc > 0, "the buffer never filled up: the test proved nothing"
        d.wait_for(lambda: d.counts().get("deleted") == 24, 60, "all 24 delivered")
        assert d.get("/healthz")[0] == 200
        assert invariants(d, m) == []
        assert d.stop() == 0
