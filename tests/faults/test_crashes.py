"""kill -9 at any instant loses no file, never counts a half-written copy, and resumes."""

from __future__ import annotations

import os
import random
import time

import pytest

from support import Daemon, buffer_names

pytestmark = pytest.mark.integration


def test_kill9_storm_loses_nothing_and_leaves_no_half_copies(agent) -> None:
    # a bandwidth cap keeps copies in flight, so kills land mid-transfer as well as between steps
    d: Daemon = agent(bandwidth_mbps=8.0, transfer_workers=3, hash_workers=2,
                      rules={"daq": {"completion": ["renamed"]}})
    rng = random.Random(1234)
    originals: dict[str, bytes] = {}
    d.start()
    for i in range(30):
        data = rng.randbytes(rng.randint(50_000, 1_500_000))
        sub = d.rule_dir() / f"run{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:03d}.fits.tmp").write_bytes(data)
        os.rename(sub / f"f{i:03d}.fits.tmp", sub / f"f{i:03d}.fits")
        originals[f"run{i % 3}/f{i:03d}.fits"] = data
    kills = 0
    for _ in range(6):
        time.sleep(rng.uniform(0.3, 1.5))
        d.kill9()
        kills += 1
        # after each kill: every original is either still in the buffer or fully in both lakes
        lakes = d.lake_files()
        for rel, data in originals.items():
            local = d.rule_dir() / rel
            in_lakes = all(lakes[lk].get(f"test/{rel}") == data for lk in ("lake1", "lake2"))
            assert local.exists() or in_lakes, f"{rel} lost after kill {kills}"
            if local.exists():
                assert local.read_bytes() == data
        d.start()
    d.wait_for(lambda: d.counts().get("deleted") == 30, 120, "all 30 files deleted after the storm")
    lakes = d.lake_files()
    for lk in ("lake1", "lake2"):
        # exactly the originals, byte for byte; no temporary or partial copies left behind
        assert lakes[lk] == {f"test/{rel}": data for rel, data in originals.items()}
    recs = d.files()
    assert sorted(r["state"] for r in recs) == ["deleted"] * 30
    assert d.stop() == 0


def test_kill9_right_after_deletion_started_is_finished_on_restart(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["renamed"]}})
    d.start()
    for i in range(10):
        (d.rule_dir() / f"g{i}.fits").write_bytes(os.urandom(20_000))
    d.wait_for(lambda: (d.counts().get("deleted") or 0) >= 3, 30, "some deletions")
    d.kill9()
    d.start()
    d.wait_for(lambda: d.counts().get("deleted") == 10, 30, "all deleted after restart")
    assert buffer_names(d.rule_dir()) == []


@pytest.mark.parametrize("older_agent", [False, True])
@pytest.mark.parametrize("republished", [False, True])
def test_a_crash_inside_the_guarded_unlink_is_finished_on_restart(agent, older_agent: bool,
                                                                  republished: bool) -> None:
    """The file was moved to its 'deleting' name when the agent died: the restart deletes it, from an
    older agent's per-path name too. If the DAQ published a new file under the same path meanwhile,
    the old version's leftover is still finished, and the new file is sent and deleted in its turn
    (once it was refused as 'changed' forever, each version superseded and sent again)."""
    from edge_agent.localfs import deleting_name, sibling_temp
    d: Daemon = agent(rules={"daq": {"completion": ["renamed"], "delete": "never"}})
    d.start()
    p = d.rule_dir() / "h.fits"
    p.write_bytes(os.urandom(10_000))
    d.wait_for(lambda: d.counts().get("confirmed") == 1, 30, "confirmation")
    d.kill9()
    # what a kill between the rename and the unlink leaves behind
    left = sibling_temp(bytes(p), b"deleting") if older_agent else deleting_name(bytes(p), p.stat().st_ino)
    os.rename(p, left)
    new = os.urandom(12_000)
    if republished:
        staged = d.rule_dir().parent / "h.fits"
        staged.write_bytes(new)
        os.rename(staged, p)
    d.doc["rules"]["daq"]["delete"] = "after_confirm"
    from support import write_toml
    write_toml(d.config, d.doc)
    d.start()
    # the old version ends deleted (its delete step finishes the leftover) or superseded (the rescan
    # saw the new file first; its leftover is finished as it ends): either way nothing is left
    versions = 2 if republished else 1
    d.wait_for(lambda: (c := d.counts()).get("deleted") and set(c) <= {"deleted", "superseded"}
               and sum(c.values()) == versions, 30, "the deletion finished")
    assert buffer_names(d.rule_dir()) == []
    assert not [n for n in os.listdir(d.rule_dir()) if b"deleting" in os.fsencode(n)]
    if republished:
        for lake in d.lake_files().values():
            assert new in lake.values()


@pytest.mark.parametrize("point", ["after_first_put", "after_register", "after_put", "after_add_replica", "after_rule",
                                   "after_release", "after_unlink"])
def test_a_crash_at_each_step_boundary_is_finished_without_errors(agent, point: str) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["renamed"]}})
    data = os.urandom(200_000)
    (d.rule_dir() / "c.fits").write_bytes(data)
    d.proc = None
    import subprocess
    import sys
    from support import ROOT
    env = {**os.environ, "EDGE_AGENT_FAILPOINTS": point}
    with open(d.log, "ab") as fh:
        p = subprocess.Popen([sys.executable, "-m", "edge_agent", "-c", str(d.config), "run"], env=env,
                             stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    assert p.wait(30) == 137, "the failpoint was not reached"
    d.start()
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, f"delivery after a crash {point}")
    assert not [e for e in d.events() if e.get("event", "").startswith("failed")], "a duplicate was an error"
    for lake in d.lake_files().values():
        assert lake == {"test/c.fits": data}
