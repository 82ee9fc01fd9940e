"""Issue 12: a copy is counted per physical place, and one buffer has one agent. Through the real
command line: `check-config` and `run` refuse destinations that are one place on disk (exit 2,
naming the keys); a second daemon on a buffer another one holds exits 2 naming the holder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import ROOT, Daemon

GOOD = """
state_dir = "{tmp}/state"
[destinations.a]
path = "{tmp}/lake-a"
[destinations.b]
path = "{tmp}/lake-b"
[rules.daq]
directory = "{tmp}/buf"
scope = "test"
destinations = ["a", "b"]
copies = 2
"""


def edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)


def _same_path(tmp: Path) -> str:
    return GOOD.replace('path = "{tmp}/lake-b"', 'path = "{tmp}/lake-a"')


def _trailing_slash(tmp: Path) -> str:
    return GOOD.replace('path = "{tmp}/lake-b"', 'path = "{tmp}/lake-a/"')


def _symlink(tmp: Path) -> str:
    (tmp / "lake-b").rmdir()
    (tmp / "lake-b").symlink_to(tmp / "lake-a")
    return GOOD


def _into_the_buffer(tmp: Path) -> str:
    (tmp / "buf" / "copies").mkdir()
    (tmp / "lake-b").rmdir()
    (tmp / "lake-b").symlink_to(tmp / "buf" / "copies")
    return GOOD


def _state_inside_a_destination(tmp: Path) -> str:
    return GOOD.replace('state_dir = "{tmp}/state"', 'state_dir = "{tmp}/lake-b/state"')


@pytest.mark.parametrize("make, key, other", [
    (_same_path, "destinations.b.path", "destinations.a.path"),
    (_trailing_slash, "destinations.b.path", "destinations.a.path"),
    (_symlink, "destinations.b.path", "destinations.a.path"),
    (_into_the_buffer, "destinations.b.path", "rules.daq.directory"),
    (_state_inside_a_destination, "destinations.b.path", "state_dir"),
])
def test_destinations_that_are_one_place_are_refused(tmp_path: Path, make: Callable[[Path], str], key: str,
                                                     other: str) -> None:
    for d in ("buf", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(make(tmp_path).format(tmp=tmp_path))
    for cmd in (["check-config", str(cfg)], ["-c", str(cfg), "run"]):
        r = edge(*cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert key in r.stderr and other in r.stderr, r.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "lake-b" / "state").exists()


@pytest.mark.parametrize("source, other, why", [
    ("lake-a", "destinations.a.path", "same device and inode"),
    ("buf/night", "rules.daq.directory", "through a bind mount"),     # shows a directory INSIDE the buffer
    ("lake-a/inner", "destinations.a.path", "through a bind mount"),
])
def test_a_bind_mount_of_another_place_or_of_a_directory_inside_it_is_refused(
        tmp_path: Path, source: str, other: str, why: str) -> None:
    """Paths cannot tell; device and inode, and mountinfo, can (in a private mount namespace, when
    one can be made)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True,
                                         check=False).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm)")
    for d in ("buf/night", "lake-a/inner", "lake-b"):
        (tmp_path / d).mkdir(parents=True)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(GOOD.format(tmp=tmp_path))
    assert edge("check-config", str(cfg)).returncode == 0
    for cmd in (f"check-config {cfg}", f"-c {cfg} run"):
        script = (f"mount --bind {tmp_path / source} {tmp_path / 'lake-b'} && "
                  f"exec {sys.executable} -m edge_agent {cmd}")
        r = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60,
                           check=False, cwd=ROOT)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "destinations.b.path" in r.stderr and other in r.stderr and why in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()


def test_a_second_agent_on_the_same_buffer_refuses_and_names_the_first(
        agent: Callable[..., Daemon], tmp_path: Path) -> None:
    first = agent().start()
    second = agent(rules={"daq": {"directory": str(first.rule_dir())}})
    assert second.state != first.state
    second.start(wait=False)
    assert second.proc is not None and second.proc.wait(60) == 2
    log = second.log.read_text()
    assert "another edge-agent holds this buffer" in log, log
    assert f"pid {first.proc.pid}" in log and str(first.state) in log, log   # type: ignore[union-attr]
    assert not (second.state / "ledger.sqlite").exists()                   # refused before any work
    # the first one, killed, takes its buffer back at once when started again
    first.kill9()
    first.start()
    assert first.stop() == 0
    # stopped cleanly, the buffer is free for the other agent
    second.start()
    assert second.stop() == 0
    assert os.path.exists(first.rule_dir() / ".edge-agent-buffer.lock")


def test_an_agent_on_a_directory_inside_another_agents_buffer_refuses_to_start(
        agent: Callable[..., Daemon]) -> None:
    """The outer agent walks its tree recursively: both would take in the inner directory's files."""
    outer = agent()
    inner = agent(rules={"daq": {"directory": str(outer.rule_dir() / "cam2")}})
    outer.start()
    inner.start(wait=False)
    assert inner.proc is not None and inner.proc.wait(60) == 2
    log = inner.log.read_text()
    assert f"lies inside {outer.rule_dir()}" in log, log
    assert f"pid {outer.proc.pid}" in log and str(outer.state) in log, log   # type: ignore[union-attr]
    assert not (inner.state / "ledger.sqlite").exists()                    # refused before any work
    assert outer.stop() == 0


def test_a_subdirectory_another_agent_holds_is_left_to_it(agent: Callable[..., Daemon]) -> None:
    """The other order: the agent on daq/cam2 started first. The agent on daq skips that subtree
    (found by its walk, and by events there), says so naming the holder, and never takes a file in
    it; the agent on cam2 handles them."""
    outer = agent()
    cam2 = outer.rule_dir() / "cam2"
    inner = agent(rules={"daq": {"directory": str(cam2)}})
    (cam2 / "early.fits").write_bytes(b"e" * 1000)     # there before the outer agent starts: its walk
    inner.start()
    outer.start()
    (outer.rule_dir() / "top.fits").write_bytes(b"t" * 1000)
    (cam2 / "night").mkdir()
    (cam2 / "night" / "late.fits").write_bytes(b"l" * 1000)   # written while both run: events
    inner.wait_for(lambda: inner.counts().get("deleted") == 2, 60, "the inner agent's 2 files delivered")
    outer.wait_for(lambda: outer.counts().get("deleted") == 1, 60, "the outer agent's own file delivered")
    assert [f["relpath"] for f in outer.files()] == ["top.fits"]     # no row of any state under cam2
    said = [e for e in outer.events() if e.get("event") == "not handled" and e.get("path") == "cam2"]
    assert len(said) == 1 and str(inner.state) in said[0]["why"], said                  # once, naming it
    assert sorted(f["relpath"] for f in inner.files()) == ["early.fits", "night/late.fits"]
    copies = [p for lake in outer.lake_files().values() for p in lake]
    assert len(copies) == 2 and all(p.endswith("top.fits") for p in copies), copies
    assert outer.stop() == 0 and inner.stop() == 0
