"""guarded_unlink deletes exactly the file that was hashed (ctime and device included), and recovers from a
crash half-way; LocalFile never goes through a symlink below the watched directory."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat as stat_mod
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import pytest

from edge_agent.core.policy import LocalStat
from edge_agent.errors import FileVanished, PermanentError, SymlinkInPath
from edge_agent.localfs import (
    LocalFile,
    deleting_name,
    finish_deleting,
    guarded_unlink,
    is_agent_temp,
    local_stat,
    open_source,
    restored_name,
    stat_regular,
)


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
    os.rename(f, deleting_name(f, expected.inode))    # the crash came right after the rename
    assert guarded_unlink(f, expected) == "deleted"
    assert dir_of(f) == []


def test_matching_leftover_and_a_new_file_under_the_name(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.rename(f, deleting_name(f, expected.inode))
    with open(f, "wb") as fh:          # meanwhile the DAQ wrote a new file with the same name
        fh.write(b"new run")
    assert guarded_unlink(f, expected) == "deleted"
    assert read(f) == b"new run"       # the new file is untouched
    assert dir_of(f) == [os.path.basename(f)]


def test_recovers_a_leftover_that_does_not_match(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.rename(f, deleting_name(f, expected.inode))
    with open(deleting_name(f, expected.inode), "ab") as fh:
        fh.write(b"!")                   # not the file that was hashed: it must come back
    assert guarded_unlink(f, expected) == "changed"
    assert read(f) == b"original content!"
    assert dir_of(f) == [os.path.basename(f)]


def test_deleting_name() -> None:
    assert deleting_name(b"/daq/run/f1.fits", 42) == b"/daq/run/.f1.fits.edge-agent-deleting.42"
    assert is_agent_temp(os.path.basename(deleting_name(b"/daq/f", 42)))
    assert len(os.path.basename(deleting_name(b"/daq/" + b"x" * 255, 2**64 - 1))) <= 255



OLD_DELETING = b".f1.fits.edge-agent-deleting"     # an older agent's name: one per path, not per version


def publish(p: bytes, content: bytes) -> LocalStat:
    """The DAQ publishes a new file under `p` (a new inode)."""
    with open(p + b".tmp", "wb") as fh:
        fh.write(content)
    os.rename(p + b".tmp", p)
    st = stat_regular(p)
    assert st is not None
    return st


def in_dir(p: bytes, name: bytes) -> bytes:
    return os.path.join(os.path.dirname(p), name)


def test_another_versions_leftover_never_decides_for_this_one(f: bytes) -> None:
    """v1's deletion was cut short (the crash came after the rename), then v2 was published under
    the same name: v2 is deleted on its own evidence; v1's leftover is v1's, left for it."""
    v1 = stat_regular(f)
    assert v1 is not None
    os.rename(f, deleting_name(f, v1.inode))
    v2 = publish(f, b"second content")
    assert guarded_unlink(f, v2) == "deleted"
    assert dir_of(f) == [os.path.basename(deleting_name(f, v1.inode))]
    assert read(deleting_name(f, v1.inode)) == b"original content"


def test_an_older_agents_leftover_is_finished_only_for_its_own_version(f: bytes) -> None:
    v1 = stat_regular(f)
    assert v1 is not None
    os.rename(f, in_dir(f, OLD_DELETING))             # an older agent died after its rename
    v2 = publish(f, b"second content")
    assert guarded_unlink(f, v2) == "deleted"          # not "changed" on v1's leftover
    assert dir_of(f) == [OLD_DELETING]
    assert guarded_unlink(f, v1) == "deleted"          # v1's own: finished
    assert dir_of(f) == []


def test_finish_deleting_touches_only_the_versions_leftover(f: bytes) -> None:
    v1 = stat_regular(f)
    assert v1 is not None
    os.rename(f, deleting_name(f, v1.inode))
    publish(f, b"second content")
    assert finish_deleting(LocalFile.beside(f), v1) == "deleted"
    assert dir_of(f) == [os.path.basename(f)] and read(f) == b"second content"
    assert finish_deleting(LocalFile.beside(f), v1) == "gone"     # nothing left: the name is not looked at
    assert read(f) == b"second content"


def test_finish_deleting_an_older_agents_leftover(f: bytes) -> None:
    v1 = stat_regular(f)
    assert v1 is not None
    os.rename(f, in_dir(f, OLD_DELETING))
    assert finish_deleting(LocalFile.beside(f), v1) == "deleted"
    assert dir_of(f) == []


def restored(f: bytes, inode: int) -> bytes:
    return in_dir(f, b"f1.restored-%d.fits" % inode)


def test_a_file_put_back_while_a_new_one_holds_its_name_goes_to_a_name_the_watcher_sees(f: bytes) -> None:
    """Not the hashed content, and the DAQ published the next file under the name meanwhile: the
    moved file is never left under the agent's temporary name, where nobody would look."""
    from edge_agent.settings import RuleSettings
    from edge_agent.watch.filters import RuleFilter
    expected = stat_regular(f)
    assert expected is not None

    def recheck(fh: BinaryIO) -> bool:
        publish(f, b"next image")
        return False                               # other content than was hashed
    assert guarded_unlink(f, expected, recheck) == "changed"
    assert read(f) == b"next image"
    back = restored(f, expected.inode)
    assert read(back) == b"original content" and stat_regular(back).inode == expected.inode  # type: ignore[union-attr]
    assert dir_of(f) == sorted([os.path.basename(f), os.path.basename(back)])
    rule = RuleSettings(directory=Path("/daq"), scope="s", destinations=["a"], include=["*.fits"])
    assert RuleFilter(rule)(os.fsdecode(os.path.basename(back))) is None       # ingested as a file of its own


def test_a_leftover_that_does_not_match_is_put_back_beside_a_new_file(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    os.rename(f, deleting_name(f, expected.inode))
    with open(deleting_name(f, expected.inode), "ab") as fh:
        fh.write(b"!")                             # written through an open descriptor after the rename
    publish(f, b"next image")
    assert finish_deleting(LocalFile.beside(f), expected) == "changed"
    assert read(restored(f, expected.inode)) == b"original content!"
    assert read(f) == b"next image"
    assert not [n for n in dir_of(f) if is_agent_temp(n)]


def test_restored_name_keeps_the_suffixes() -> None:
    assert restored_name(b"img.fits.fz", 7) == b"img.restored-7.fits.fz"
    assert restored_name(b"raw", 7) == b"raw.restored-7"
    assert restored_name(b"img.fits", 7, 1) == b"img.restored-7-1.fits"
    long = restored_name(b"x" * 250 + b".fits", 2**64 - 1)
    assert len(long) <= 255 and long.endswith(b".fits")
    long = restored_name(b"a." + b"x" * 250 + b".fits", 2**64 - 1)
    assert len(long) <= 255 and long.endswith(b".fits") and long.startswith(b"a.restored-")

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


# ---------------------------------------------------------------- "the same file": ctime and device

@pytest.fixture(params=["tmp", "shm"])
def fs_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The worktree's filesystem and tmpfs: both stamp a new ctime on a rename."""
    if request.param == "tmp":
        return tmp_path
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="edge-agent-test-"))
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    return d


def rewrite_keeping_size_and_mtime(p: bytes, content: bytes) -> None:
    st = os.lstat(p)
    with open(p, "r+b") as fh:
        fh.write(content)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))     # touch -d: the mtime put back


def test_a_same_size_rewrite_with_its_mtime_put_back_is_not_deleted(fs_dir: Path) -> None:
    p = os.fsencode(fs_dir / "f1.fits")
    with open(p, "wb") as fh:
        fh.write(b"original content")
    expected = stat_regular(p)
    assert expected is not None and expected.ctime_ns is not None
    rewrite_keeping_size_and_mtime(p, b"ORIGINAL")
    now = stat_regular(p)
    assert now is not None and (now.inode, now.size, now.mtime_ns) == (expected.inode, expected.size,
                                                                       expected.mtime_ns)
    assert guarded_unlink(p, expected) == "changed"
    assert read(p) == b"ORIGINAL content"
    assert dir_of(p) == [b"f1.fits"]


def test_the_expected_file_is_deleted_although_the_rename_stamps_its_ctime(fs_dir: Path) -> None:
    p = os.fsencode(fs_dir / "f1.fits")
    with open(p, "wb") as fh:
        fh.write(b"original content")
    expected = stat_regular(p)
    assert expected is not None
    assert guarded_unlink(p, expected) == "deleted"
    assert dir_of(p) == []


def test_a_leftover_renamed_by_a_crashed_deletion_is_finished_whatever_its_ctime(fs_dir: Path) -> None:
    p = os.fsencode(fs_dir / "f1.fits")
    with open(p, "wb") as fh:
        fh.write(b"original content")
    expected = stat_regular(p)
    assert expected is not None
    os.rename(p, deleting_name(p, expected.inode))  # the crash came right after the rename
    left = stat_regular(deleting_name(p, expected.inode))
    assert left is not None
    assert guarded_unlink(p, expected) == "deleted"
    assert dir_of(p) == []


def test_another_device_is_another_file(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None and expected.dev is not None
    elsewhere = dataclasses.replace(expected, dev=expected.dev + 1)
    assert guarded_unlink(f, elsewhere) == "changed"
    assert read(f) == b"original content"


def test_a_row_without_ctime_is_judged_as_before(f: bytes) -> None:
    """A row hashed by an older agent has no ctime: inode, size and mtime decide, as they did."""
    expected = stat_regular(f)
    assert expected is not None
    os.chmod(f, 0o600)                             # ctime moves, nothing else
    assert guarded_unlink(f, dataclasses.replace(expected, ctime_ns=None, dev=None)) == "deleted"


def test_ctime_compared_only_where_both_know_it() -> None:
    a = LocalStat(7, 100, 123, ctime_ns=5, dev=1)
    assert a.same_file(a)
    assert not a.same_file(dataclasses.replace(a, ctime_ns=6))
    assert not a.same_file(dataclasses.replace(a, dev=2))
    assert dataclasses.replace(a, ctime_ns=None).same_file(dataclasses.replace(a, ctime_ns=6))
    assert a.same_file(dataclasses.replace(a, ctime_ns=None, dev=None))
    assert not a.same_file(dataclasses.replace(a, mtime_ns=124, ctime_ns=None))


# ---------------------------------------------------------------- recheck_before_delete

def blake3_is(content: bytes) -> Any:
    seen: list[bytes] = []

    def recheck(fh: BinaryIO) -> bool:
        data = fh.read()
        seen.append(data)
        return blake3.blake3(data).hexdigest() == blake3.blake3(content).hexdigest()
    recheck.seen = seen  # type: ignore[attr-defined]
    return recheck


def test_recheck_keeps_a_rewrite_the_stat_cannot_tell(f: bytes) -> None:
    expected = dataclasses.replace(stat_regular(f), ctime_ns=None)   # type: ignore[arg-type]
    rewrite_keeping_size_and_mtime(f, b"ORIGINAL")
    recheck = blake3_is(b"original content")
    assert guarded_unlink(f, expected, recheck) == "changed"
    assert recheck.seen == [b"ORIGINAL content"]
    assert read(f) == b"ORIGINAL content"
    assert dir_of(f) == [os.path.basename(f)]
    # without the recheck, an older row (no ctime) cannot see it: what the setting is for
    assert guarded_unlink(f, expected) == "deleted"


def test_recheck_reads_the_file_moved_aside_then_deletes_it(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None
    names: list[list[bytes]] = []

    def recheck(fh: BinaryIO) -> bool:
        names.append(dir_of(f))                    # nobody reaches it by its name meanwhile
        return fh.read() == b"original content"
    assert guarded_unlink(f, expected, recheck) == "deleted"
    assert names == [[os.path.basename(deleting_name(f, expected.inode))]]
    assert dir_of(f) == []


def test_a_failing_recheck_puts_the_file_back(f: bytes) -> None:
    expected = stat_regular(f)
    assert expected is not None

    def recheck(fh: BinaryIO) -> bool:
        raise OSError(5, "Input/output error")
    with pytest.raises(OSError):
        guarded_unlink(f, expected, recheck)
    assert read(f) == b"original content"
    assert dir_of(f) == [os.path.basename(f)]


# ---------------------------------------------------------------- never through a symlink

@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A watched root with night1/f1.fits, and outside it a directory holding a file of the same name."""
    root, outside = tmp_path / "buffer", tmp_path / "outside"
    (root / "night1").mkdir(parents=True)
    (root / "night1" / "f1.fits").write_bytes(b"the DAQ's file")
    outside.mkdir()
    (outside / "f1.fits").write_bytes(b"not ours at all")
    return {"root": root, "outside": outside, "file": root / "night1" / "f1.fits"}


def local(t: dict[str, Path], rel: str = "night1/f1.fits") -> LocalFile:
    return LocalFile.below(t["root"], os.fsencode(t["root"] / rel))


def test_a_file_below_the_root_is_reached(tree: dict[str, Path]) -> None:
    f = local(tree)
    assert f.stat() == stat_regular(os.fsencode(tree["file"]))
    with f.open() as fh:
        assert fh.read() == b"the DAQ's file"
    assert str(f) == str(tree["file"])
    assert f.with_suffix(".json").path == os.fsencode(tree["file"]) + b".json"


def test_symlink_as_the_last_component(tree: dict[str, Path]) -> None:
    tree["file"].unlink()
    tree["file"].symlink_to(tree["outside"] / "f1.fits")
    f = local(tree)
    with pytest.raises(SymlinkInPath):
        f.stat()
    with pytest.raises(SymlinkInPath):
        f.open()
    assert f.lstat() is not None and stat_mod.S_ISLNK(f.lstat().st_mode)   # type: ignore[union-attr]
    with pytest.raises(SymlinkInPath):
        open_source(f)


def test_symlink_as_a_middle_directory(tree: dict[str, Path]) -> None:
    (tree["root"] / "a").mkdir()
    (tree["root"] / "a" / "b").symlink_to(tree["outside"])
    f = local(tree, "a/b/f1.fits")
    for op in (f.stat, f.lstat, f.open, f.unlink):
        with pytest.raises(SymlinkInPath, match="a/b is now a symbolic link"):
            op()
    expected = stat_regular(os.fsencode(tree["outside"] / "f1.fits"))
    assert expected is not None
    with pytest.raises(SymlinkInPath):
        guarded_unlink(f, expected)
    assert (tree["outside"] / "f1.fits").read_bytes() == b"not ours at all"
    assert sorted(os.listdir(tree["outside"])) == ["f1.fits"]


def test_a_directory_swapped_for_a_symlink_after_discovery(tree: dict[str, Path]) -> None:
    f = local(tree)
    expected = f.stat()                            # discovered (and hashed) through the real directory
    assert expected is not None
    (tree["root"] / "night1").rename(tree["root"] / "night1.moved")
    (tree["root"] / "night1").symlink_to(tree["outside"])
    outside = tree["outside"] / "f1.fits"
    # same name, and even the same size and times: nothing is read, sent or deleted through the link
    outside.write_bytes(b"the DAQ's file")
    os.utime(outside, ns=(expected.mtime_ns, expected.mtime_ns))
    with pytest.raises(SymlinkInPath):
        f.stat()
    with pytest.raises(SymlinkInPath):
        f.open()
    with pytest.raises(SymlinkInPath):
        guarded_unlink(f, expected)
    with pytest.raises(SymlinkInPath):
        f.with_suffix(".json").unlink()
    assert outside.exists() and sorted(os.listdir(tree["outside"])) == ["f1.fits"]
    assert (tree["root"] / "night1.moved" / "f1.fits").read_bytes() == b"the DAQ's file"


def test_symlink_is_a_kind_of_vanished() -> None:
    # the pipeline supersedes such a version with the reason, like a file that vanished
    assert issubclass(SymlinkInPath, FileVanished)


def test_the_root_itself_may_be_a_symlink(tree: dict[str, Path], tmp_path: Path) -> None:
    """The configured directory is the operator's: it may point at the buffer disk."""
    (tmp_path / "configured").symlink_to(tree["root"])
    f = LocalFile.below(tmp_path / "configured", os.fsencode(tmp_path / "configured" / "night1" / "f1.fits"))
    assert f.stat() is not None


def test_gone_and_not_regular(tree: dict[str, Path]) -> None:
    assert local(tree, "night1/missing").stat() is None
    assert local(tree, "nowhere/f1.fits").stat() is None
    assert local(tree, "night1/f1.fits/x").stat() is None      # a file where a directory was
    with pytest.raises(FileVanished):
        local(tree, "night1/missing").open()
    os.mkfifo(tree["root"] / "night1" / "fifo")
    assert local(tree, "night1/fifo").stat() is None
    with pytest.raises(FileVanished):
        local(tree, "night1/fifo").open()                        # and it does not hang
    assert local(tree, "night1").stat() is None                   # a directory


def test_a_path_not_below_the_root_is_refused(tree: dict[str, Path]) -> None:
    with pytest.raises(PermanentError):
        LocalFile.below(tree["root"], os.fsencode(tree["outside"] / "f1.fits")).stat()
    with pytest.raises(PermanentError):
        LocalFile.below(tree["root"], os.fsencode(tree["root"] / ".." / "outside" / "f1.fits")).stat()
    with pytest.raises(PermanentError):
        LocalFile.below(tree["root"], os.fsencode(tree["root"])).stat()


def test_companion_unlink_removes_a_symlink_never_its_target(tree: dict[str, Path]) -> None:
    side = tree["root"] / "night1" / "f1.fits.json"
    side.symlink_to(tree["outside"] / "f1.fits")
    assert local(tree).with_suffix(".json").unlink() is True
    assert not os.path.lexists(side) and (tree["outside"] / "f1.fits").exists()
    assert local(tree).with_suffix(".json").unlink() is False


def test_a_directory_moved_out_of_the_tree_and_linked_back_is_not_deleted_from(tree: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    """The very file (same inode, size, times), but now outside the watched tree: not deleted there."""
    f = local(tree)
    expected = f.stat()
    assert expected is not None
    (tmp_path / "archive").mkdir()
    (tree["root"] / "night1").rename(tmp_path / "archive" / "night1")
    (tree["root"] / "night1").symlink_to(tmp_path / "archive" / "night1")
    with pytest.raises(SymlinkInPath):
        guarded_unlink(f, expected)
    assert (tmp_path / "archive" / "night1" / "f1.fits").read_bytes() == b"the DAQ's file"
