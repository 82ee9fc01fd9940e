"""Faults in the buffer: lost events, odd names, symlinks, files that change, vanish or cannot be read.

Each scenario ends with the invariant check (local_invariants.check): every file that
left the buffer has N good copies, every file still there is explained by the ledger,
nothing is left half-done.
"""

from __future__ import annotations

import os
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
    return not any(c.get(s) for s in ("complete", "hashed", "registered", "copied", "transferred", "confirmed"))


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
    d.wait_for(lambda: {os.path.basename(n["relpath"]) for n in d.status()["notices"]} >= links, 20,
               "every symlink reported")
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


def _copy_started(d: Daemon, rel: str) -> bool:
    """A copy of `rel` is being written (its temporary name exists in a lake)."""
    return any(".edge-agent-" in p.name and rel in p.name for lk in d.lakes.values() for p in lk.rglob("*"))


def test_a_file_rewritten_in_place_during_its_upload_with_its_mtime_put_back_is_caught(agent) -> None:
    # same size, same inode, the old mtime restored: the ctime tells (it moved during the read that is
    # the first copy: the row goes back to waiting, then is hashed again), and any later copy checks
    # the content (a version whose blake3 no longer matches ends: superseded)
    d: Daemon = agent(bandwidth_mbps=1.0, rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    old, new = os.urandom(2_000_000), os.urandom(2_000_000)
    p = m.write("rewritten.fits", old)
    st = p.stat()
    d.start()
    d.wait_for(lambda: _copy_started(d, "rewritten.fits"), 30, "the upload under way")
    with open(p, "r+b") as fh:
        fh.write(new)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    m.record("rewritten.fits", new)
    d.wait_for(lambda: d.counts().get("deleted") == 1, 60, "the new content delivered")
    recs = sorted(d.files(), key=lambda r: r["id"])
    assert recs[-1]["state"] == "deleted"
    assert all(r["state"] == "superseded" and "changed" in r["reason"] for r in recs[:-1])
    caught = [e for e in d.events()
              if e.get("path") == "rewritten.fits" and e["event"] in ("changed", "superseded")]
    assert caught and all("changed" in e["reason"] for e in caught)
    for lake in d.lake_files().values():
        assert lake[f"test/{recs[-1]['name']}"] == new          # never the old bytes under the new name
        assert [v for v in lake.values() if v not in (old, new)] == []
    assert invariants(d, m) == []


def test_a_file_deleted_by_someone_else_after_hashing_before_its_upload_is_superseded(agent) -> None:
    # one transfer worker, kept busy by a slow big file: the small one waits, registered, for its turn
    d: Daemon = agent(bandwidth_mbps=1.0, transfer_workers=1,
                      rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    m.write("big.fits", os.urandom(3_000_000))
    d.start()
    d.wait_for(lambda: _copy_started(d, "big.fits"), 30, "the big upload under way")
    small = m.write("small.fits", b"s" * 5000)
    d.wait_for(lambda: {r["relpath"]: r["state"] for r in d.files()} == {"big.fits": "registered",
                                                                         "small.fits": "registered"}, 20,
               "the small file registered, waiting for the transfer worker")
    os.unlink(small)
    m.remove("small.fits")
    d.wait_for(lambda: d.counts().get("deleted") == 1 and d.counts().get("superseded") == 1, 60,
               "big delivered, small superseded")
    rec = next(r for r in d.files() if r["relpath"] == "small.fits")
    assert "vanished before its copies were written" in rec["reason"]
    assert all("test/small.fits" not in lake for lake in d.lake_files().values())
    assert invariants(d, m) == []


def test_a_slow_writer_holding_the_file_open_is_waited_for_however_long_its_pauses(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["closed", "stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    d.start()
    data = os.urandom(60_000)
    with open(d.rule_dir() / "slow.fits", "wb") as fh:
        for k in range(0, len(data), 15_000):
            fh.write(data[k:k + 15_000])
            fh.flush()
            time.sleep(1.5)          # longer than stable_seconds: only the open handle says "not done"
            assert d.counts().get("discovered") == 1, d.counts()
    m.record("slow.fits", data)
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, "delivery after the close")
    assert d.lake_files()["lake1"]["test/slow.fits"] == data
    assert invariants(d, m) == []


def test_a_writer_that_reopens_to_append_is_waited_for_while_it_keeps_changing(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["closed", "stable"], "stable_seconds": 2}})
    m = Manifest(d.rule_dir())
    d.start()
    data = os.urandom(100_000)
    for k in range(0, len(data), 10_000):
        with open(d.rule_dir() / "appended.fits", "ab") as fh:    # closed after every piece
            fh.write(data[k:k + 10_000])
        time.sleep(0.4)
        assert d.counts().get("discovered") == 1, d.counts()
    m.record("appended.fits", data)
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, "delivery once it stopped changing")
    assert d.lake_files()["lake2"]["test/appended.fits"] == data
    assert invariants(d, m) == []


def test_unlistable_directories_and_undeletable_files_are_reported_and_finished_once_fixed(agent) -> None:
    d: Daemon = agent(unprivileged=True, rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    m = Manifest(d.rule_dir())
    m.write("locked/in-locked.fits", b"l" * 3000)
    m.write("readonly/in-readonly.fits", b"r" * 3000)
    m.write("ok.fits", b"o" * 3000)
    os.chmod(d.rule_dir() / "locked", 0o000)       # cannot be listed
    os.chmod(d.rule_dir() / "readonly", 0o555)     # listed and read, but nothing in it can be deleted
    try:
        d.start()
        d.wait_for(lambda: any("cannot be listed" in n["detail"] for n in d.status()["notices"]), 20,
                   "the unlistable directory reported")
        d.wait_for(lambda: d.counts().get("deleted") == 1 and d.counts().get("quarantined") == 1, 60,
                   "ok.fits delivered, the undeletable file quarantined with the reason")
        held = next(r for r in d.files() if r["relpath"] == "readonly/in-readonly.fits")
        assert held["reason"].startswith("cannot delete readonly/in-readonly.fits: Permission denied"), held
        assert "copies are confirmed" in held["reason"]
        assert (d.rule_dir() / "readonly" / "in-readonly.fits").exists()
        assert invariants(d, m, settled=False) == []
    finally:
        os.chmod(d.rule_dir() / "locked", 0o755)
        os.chmod(d.rule_dir() / "readonly", 0o755)
    d.cli("retry", "--all", check=True)
    d.wait_for(lambda: d.counts().get("deleted") == 3, 60, "everything delivered once the permissions are fixed")
    assert invariants(d, m) == []
