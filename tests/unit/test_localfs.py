"""guarded_unlink deletes exactly the file that was hashed, and recovers from a crash half-way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.core.policy import LocalStat
from edge_agent.localfs import deleting_name, guarded_unlink, is_agent_temp, local_stat, stat_regular


@pytest.fixture
def f(tmp_path: Path) -> bytes:
    p = tmp_path / "f1.fits"
    p.write_bytes(b"original content")
    os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return os.fsencode(p)


def read(p: bytes) -> bytes:
    with open(p, "rb") as fh:
        return fh.read()


def dir_of(p: bytes) -> list[bytes]:
    return sorted(os.listdir(os.path.dirname(p)))


def test_deletes_the_expected_file(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    assert guarded_unlink(f, expected) == "deleted"
    assert not os.path.lexists(f)
    assert dir_of(f) == []


def test_gone(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.unlink(f)
    assert guarded_unlink(f, expected) == "gone"
    assert dir_of(f) == []


def _check_changed(f: bytes, expected: LocalStat, content: bytes) -> None:
    before = stat_regular(f)
    assert guarded_unlink(f, expected) == "changed"
    assert read(f) == content
    assert stat_regular(f) == before          # the very same file is back (inode, size, mtime)
    assert dir_of(f) == [os.path.basename(f)]  # no temporary name left


def test_changed_inode(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    new = f + b".new"
    with open(new, "wb") as fh:
        fh.write(b"original content")              # same bytes, same size ...
    os.utime(new, ns=(expected.mtime_ns, expected.mtime_ns))   # ... same mtime ...
    os.replace(new, f)                           # ... but another file: the DAQ published a new one
    _check_changed(f, expected, b"original content")


def test_changed_size(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    with open(f, "ab") as fh:
        fh.write(b" and more")
    _check_changed(f, expected, b"original content and more")


def test_changed_mtime(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    with open(f, "r+b") as fh:
        fh.write(b"ORIGINAL")
    os.utime(f, ns=(expected.mtime_ns, expected.mtime_ns + 1))
    _check_changed(f, expected, b"ORIGINAL content")


def test_never_deletes_a_directory_or_symlink(tmp_path: Path, f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.unlink(f)
    os.symlink(tmp_path / "elsewhere", f)
    assert guarded_unlink(f, expected) == "changed"
    assert os.path.islink(f)


def test_recovers_a_matching_leftover_from_a_crash(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.rename(f, deleting_name(f))    # the crash came right after the rename
    assert guarded_unlink(f, expected) == "deleted"
    assert dir_of(f) == []


def test_matching_leftover_and_a_new_file_under_the_name(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.rename(f, deleting_name(f))
    with open(f, "wb") as fh:          # meanwhile the DAQ wrote a new file with the same name
        fh.write(b"new run")
    assert guarded_unlink(f, expected) == "deleted"
    assert read(f) == b"new run"       # the new file is untouched
    assert dir_of(f) == [os.path.basename(f)]


def test_recovers_a_leftover_that_does_not_match(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.rename(f, deleting_name(f))
    with open(deleting_name(f), "ab") as fh:
        fh.write(b"!")                   # not the file that was hashed: it must come back
    assert guarded_unlink(f, expected) == "changed"
    assert read(f) == b"original content!"
    assert dir_of(f) == [os.path.basename(f)]


def test_deleting_name() -> None:
    assert deleting_name(b"/daq/run/f1.fits") == b"/daq/run/.f1.fits.edge-agent-deleting"
    assert is_agent_temp(os.path.basename(deleting_name(b"/daq/f")))


def test_is_agent_temp() -> None:
    assert is_agent_temp(".f1.fits.edge-agent-part")
    assert is_agent_temp(b".f\xff.edge-agent-deleting")
    assert not is_agent_temp("f1.fits")
    assert not is_agent_temp("edge-agent.toml")


def test_stat_regular(tmp_path: Path, f: bytes) -> None:
    st = os.lstat(f)
    assert stat_regular(f) == LocalStat(st.st_ino, 16, 1_600_000_000_000_000_000, st.st_ctime_ns,
                                        st.st_dev) == local_stat(st)
    assert stat_regular(os.fsdecode(f)) == stat_regular(f)
    assert stat_regular(os.fsencode(tmp_path)) is None          # a directory
    assert stat_regular(os.fsencode(tmp_path / "missing")) is None
    os.symlink(f, tmp_path / "link")
    assert stat_regular(os.fsencode(tmp_path / "link")) is None  # not followed
    os.mkfifo(tmp_path / "fifo")
    assert stat_regular(os.fsencode(tmp_path / "fifo")) is None


def test_non_utf8_name(tmp_path: Path) -> None:
    p = os.fsencode(tmp_path) + b"/f\xff.fits"
    with open(p, "wb") as fh:
        fh.write(b"x")
    expected = stat_regular(p)
    assert expected is not None
    assert guarded_unlink(p, expected) == "deleted"
    assert os.listdir(os.fsencode(tmp_path)) == []
