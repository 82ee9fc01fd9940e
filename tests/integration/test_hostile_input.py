"""Odd names, renames and files that vanish: each goes through, or is reported; none is lost."""

from __future__ import annotations

import os
import time

import pytest

from support import Daemon, buffer_names

pytestmark = pytest.mark.integration


def test_hostile_names_go_through_or_are_quarantined_with_the_reason(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 0.5}})
    d.start()
    root = bytes(d.rule_dir())
    good = {b"with space.fits": b"1", "\u00fcn\u00efc\u00f8de.fits".encode(): b"22", b"-dash.fits": b"333",
            "\u65e5\u672c.fits".encode(): b"4444", b"x" * 240 + b".fits": b"55555"}
    bad = {b"new\nline.fits": b"6", b"bad\xff.fits": b"77", b"tab\tname.fits": b"888"}
    for name, data in {**good, **bad}.items():
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(data)
    d.wait_for(lambda: d.counts().get("deleted") == len(good) and d.counts().get("quarantined") == len(bad),
               40, "good names delivered, bad names quarantined")
    lake1 = d.lake_files()["lake1"]
    for name, data in good.items():
        assert lake1[f"test/{name.decode()}"] == data
    left = sorted(n for n in os.listdir(root) if b".edge-agent-" not in n)   # but the agent's lock
    assert left == sorted(bad)                     # never deleted
    for rec in d.files():
        if rec["state"] == "quarantined":
            assert "name pattern" in rec["reason"]
    out = d.cli("files", "--state", "quarantined").stdout
    assert "bad\\xff.fits" in out and "new\\nline.fits" in out or "new" in out


def test_a_file_renamed_before_completion_goes_through_under_its_new_name(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 2}})
    d.start()
    (d.rule_dir() / "first.fits").write_bytes(b"a" * 1000)
    d.wait_for(lambda: d.counts().get("discovered") == 1, 10, "discovery")
    os.rename(d.rule_dir() / "first.fits", d.rule_dir() / "second.fits")
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, "the renamed file delivered")
    recs = {r["relpath"]: r for r in d.files()}
    assert recs["first.fits"]["state"] == "superseded" and "vanished" in recs["first.fits"]["reason"]
    assert recs["second.fits"]["state"] == "deleted"
    assert d.lake_files()["lake2"] == {"test/second.fits": b"a" * 1000}


def test_a_growing_file_is_not_taken_until_it_stops(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 1.5}})
    d.start()
    p = d.rule_dir() / "grow.fits"
    with open(p, "wb") as fh:
        for _ in range(8):          # 8 x 0.5 s: always changing within the stable window
            fh.write(os.urandom(10_000))
            fh.flush()
            time.sleep(0.5)
            assert d.counts().get("hashed", 0) == 0 and d.counts().get("deleted", 0) == 0
    d.wait_for(lambda: d.counts().get("deleted") == 1, 30, "delivery once stable")
    assert len(d.lake_files()["lake1"]["test/grow.fits"]) == 80_000


def test_a_hidden_or_temporary_file_left_behind_is_reported_not_taken(agent) -> None:
    d: Daemon = agent(stale_temp_seconds=2)
    for name in (".hidden.fits", "orphan.fits.part"):
        p = d.rule_dir() / name
        p.write_bytes(b"x" * 100)
        os.utime(p, (time.time() - 60, time.time() - 60))     # written a minute ago, never renamed
    d.start()
    d.wait_for(lambda: len(d.status()["notices"]) == 2, 20, "both reported")
    details = " ".join(n["detail"] for n in d.status()["notices"])
    assert "did the writer die" in details
    assert buffer_names(d.rule_dir()) == [".hidden.fits", "orphan.fits.part"]   # never taken
    assert d.counts() == {}


def test_a_directory_swapped_for_a_symlink_after_discovery_is_never_followed(agent) -> None:
    """A watched subdirectory is renamed and a symlink to an outside directory, holding a file of the
    same name and size, put in its place while its file waits for completion: the outside file is
    never read, uploaded nor deleted; the real directory's file goes through under its new name."""
    d: Daemon = agent(rules={"daq": {"completion": ["stable"], "stable_seconds": 3}})
    d.start()
    root = d.rule_dir()
    (root / "run42").mkdir()
    (root / "run42" / "f1.fits").write_bytes(b"A" * 5000)
    d.wait_for(lambda: d.counts().get("discovered") == 1, 10, "discovery")
    outside = d.base / "outside"
    outside.mkdir()
    (outside / "f1.fits").write_bytes(b"B" * 5000)
    os.rename(root / "run42", root / "run42.moved")
    os.symlink(outside, root / "run42")
    d.wait_for(lambda: d.counts().get("deleted") == 1 and d.counts().get("superseded") == 1, 40,
               "the moved file delivered, the row behind the symlink superseded")
    d.wait_for(lambda: any(n["relpath"].endswith("/run42") and "symlink" in n["detail"] for n in d.status()["notices"]),
               20, "a rescan reporting the symlink")
    recs = {r["relpath"]: r for r in d.files()}
    assert recs["run42/f1.fits"]["state"] == "superseded"
    assert recs["run42.moved/f1.fits"]["state"] == "deleted"
    for lake in d.lake_files().values():
        assert lake == {"test/run42.moved/f1.fits": b"A" * 5000}      # nothing of the outside file
    assert (outside / "f1.fits").read_bytes() == b"B" * 5000           # never deleted
    assert os.path.islink(root / "run42")


@pytest.mark.parametrize("big_first", [True, False])
def test_files_whose_template_renders_one_name_keep_their_own_bytes(agent, big_first: bool) -> None:
    """Issue 12 item 1, with the real daemon: run1/img.dat and run2/img.dat under `{filename}`, one
    large and one small, written at once and hashed side by side (hash_workers = 2). Each ends in
    the lake under a name of its own with exactly its bytes, on both destinations."""
    d: Daemon = agent(rules={"daq": {"completion": ["renamed"], "name_template": "{filename}"}}, hash_workers=2)
    d.start()
    big, small = os.urandom(24 * 1024 * 1024), os.urandom(300_000)
    files = {"run1/img.dat": big, "run2/img.dat": small} if big_first else {"run1/img.dat": small,
                                                                               "run2/img.dat": big}
    for rel, data in files.items():
        p = d.rule_dir() / rel
        p.parent.mkdir(exist_ok=True)
        (p.parent / (p.name + ".part")).write_bytes(data)
    for rel in files:
        p = d.rule_dir() / rel
        os.rename(p.parent / (p.name + ".part"), p)
    d.wait_for(lambda: d.counts().get("deleted") == 2, 90, "both files delivered and deleted")
    names = {r["relpath"]: r["name"] for r in d.files()}
    assert sorted(names.values()) == ["img.dat", "img.dat.v2"]
    for lake in ("lake1", "lake2"):
        held = d.lake_files()[lake]
        for rel, data in files.items():
            assert held[f"test/{names[rel]}"] == data, (lake, rel)
