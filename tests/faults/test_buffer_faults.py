"""Faults in the buffer: lost events, odd names, symlinks, files that change, vanish or cannot be read.

Each scenario ends with the invariant check (local_invariants.check): every file that
left the buffer has N good copies, every file still there is explained by the ledger,
nothing is left half-done.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.faults.local_invariants import Manifest, check
from tests.faults.mounts import needs_root, sysctl
from support import Daemon

pytestmark = pytest.mark.integration


def invariants(d: Daemon, m: Manifest, settled: bool = True) -> list[str]:
    return check(m, d.state / "ledger.sqlite", d.lakes, d.state / "lake-catalog.sqlite", copies=len(d.lakes),
                 settled=settled)


def settled(d: Daemon) -> bool:
    """Nothing left that the agent is still working on (only final, quarantined or waiting rows)."""
    c = d.counts()
    return not any(c.get(s) for s in ("complete", "hashed", "registered", "transferred", "confirmed"))


@needs_root
def test_an_inotify_queue_overflow_loses_no_file_and_is_noticed(agent) -> None:
    # no periodic rescan to fall back on: only noticing the overflow can find what it lost
    d: Daemon = agent(rescan_seconds=3600, rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    with sysctl("/proc/sys/fs/inotify/max_queued_events", "8"):
        d.start()   # an inotify instance keeps the queue size it was created with; restored at once
    d.wait_for(lambda: d.status()["rules"]["daq"], 10, "the first rescan")
    for i in range(300):
        m.write(f"burst/f{i:03d}.fits" if i % 2 else f"f{i:03d}.fits", os.urandom(100 + i))
    d.wait_for(lambda: d.counts().get("deleted") == 300, 90, "all 300 files found and delivered")
    assert any("overflow" in e.get("event", "") for e in d.events()), "the overflow was not reported"
    metrics = d.get("/metrics")[1].decode()
    overflows = [ln for ln in metrics.splitlines() if ln.startswith("edge_agent_event_overflows_total")]
    assert overflows and float(overflows[0].split()[-1]) >= 1
    assert invariants(d, m) == []
    assert d.stop() == 0


def test_odd_but_legal_names_go_through_and_names_too_long_for_the_lake_are_quarantined(agent) -> None:
    d: Daemon = agent(stale_temp_seconds=1, rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    deep = "/".join(f"lv{i:02d}" for i in range(30))                # 150 bytes of directories
    names = {
        "a..b.fits": b"1", "x..": b"22",                            # '..' inside names, never a component
        "run 7/with  two  spaces .fits": b"4444",
        "\u00e9" * 125 + ".fits": b"6" * 6,                         # 255 bytes (130 characters)
        f"{deep}/deep.fits": b"7" * 7,
    }
    too_long = {"n" * 250 + ".fits": b"5" * 5,                      # a legal 255-byte file name
                "/".join(f"level{i:02d}" for i in range(40)) + "/deeper.fits": b"8" * 8}
    for rel, data in {**names, **too_long}.items():
        m.write(rel, data)
    hidden = [m.write("..foo.fits", b"h"), m.write("... three dots.fits", b"h")]   # hidden names: never taken
    d.start()
    d.wait_for(lambda: d.counts().get("deleted") == len(names) and d.counts().get("quarantined") == 2, 40,
               "every legal name delivered, the two too long for the lake quarantined")
    d.wait_for(lambda: len(d.status()["notices"]) == 2, 20, "the hidden files reported")
    lake = d.lake_files()["lake1"]
    assert lake == {f"test/{rel}": data for rel, data in names.items()}
    for rec in d.files():
        if rec["state"] == "quarantined":
            assert "name pattern" in rec["reason"] and "{0,249}" in rec["reason"], rec["reason"]
    assert all(p.exists() for p in hidden)
    assert invariants(d, m) == []


def test_symlinks_out_of_the_tree_and_loops_are_reported_never_followed_never_deleted(agent, tmp_path: Path) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    secret = outside / "secret.fits"
    secret.write_bytes(b"not for the lake")
    (outside / "dir" / "inner.fits").write_bytes(b"nor this")
    root = d.rule_dir()
    os.symlink(secret, root / "to-file.fits")
    os.symlink(outside / "dir", root / "to-dir")
    os.symlink("loop-b.fits", root / "loop-a.fits")
    os.symlink("loop-a.fits", root / "loop-b.fits")
    os.symlink(".", root / "self")                      # a directory loop
    os.symlink("/nonexistent/x.fits", root / "dangling.fits")
    m.write("real.fits", b"r" * 1000)
    d.start()
    links = {"to-file.fits", "to-dir", "loop-a.fits", "loop-b.fits", "self", "dangling.fits"}
    d.wait_for(lambda: {os.path.basename(n["relpath"]) for n in d.status()["notices"]} >= links, 20, "every symlink reported")
    d.wait_for(lambda: d.counts().get("deleted") == 1, 20, "the real file delivered")
    for n in d.status()["notices"]:
        assert "never followed" in n["detail"], n
    assert secret.read_bytes() == b"not for the lake" and (outside / "dir" / "inner.fits").exists()
    assert all(os.path.islink(root / name) for name in links)
    assert d.lake_files()["lake1"] == {"test/real.fits": b"r" * 1000}
    assert [r["relpath"] for r in d.files()] == ["real.fits"]
    assert invariants(d, m) == []


def test_a_file_deleted_by_someone_else_before_hashing_is_superseded_with_the_reason(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 3}})
    m = Manifest(d.rule_dir())
    d.start()
    p = m.write("gone.fits", b"g" * 100)
    m.write("stays.fits", b"s" * 100)
    d.wait_for(lambda: d.counts().get("discovered") == 2, 10, "discovery")
    os.unlink(p)
    m.remove("gone.fits")
    d.wait_for(lambda: d.counts().get("deleted") == 1 and d.counts().get("superseded") == 1, 30,
               "one delivered, one superseded")
    rec = next(r for r in d.files() if r["relpath"] == "gone.fits")
    assert "vanished" in rec["reason"] and "removed by someone else" in rec["reason"]
    assert invariants(d, m) == []
