"""PosixTransport on real directories: copies, in-pass verification, xattr-recorded checksums."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import blake3
import pytest

from edge_agent.errors import DestinationOccupied, FileChanged, FileVanished, PermanentError, RetryableError
from edge_agent.hashing import hash_file
from edge_agent.transfer.base import Expected, RemoteStat
from edge_agent.transfer.posix import XATTR, PosixTransport, temp_name, url_to_path

DATA = os.urandom(200_000)


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def expected_for(data: bytes, md5: bool = False, may_replace: bool = False) -> Expected:
    d = Expected(len(data), blake3.blake3(data).hexdigest(), adler(data), may_replace=may_replace)
    if md5:
        import hashlib
        d = Expected(d.size, d.blake3, d.adler32, hashlib.md5(data).hexdigest(), may_replace=may_replace)
    return d


class Pace:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, n: int) -> None:
        self.calls.append(n)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "buffer" / "f1.fits"
    p.parent.mkdir()
    p.write_bytes(DATA)
    return p


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "lake"
    d.mkdir()
    return d


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_put_creates_the_copy(src: Path, dest: Path) -> None:
    pace = Pace()
    final = dest / "scope" / "run42" / "f1.fits"
    got = PosixTransport(fsync=True, chunk_size=65536).put(str(src), str(final), expected_for(DATA, md5=True), pace)
    assert final.read_bytes() == DATA
    assert got == hash_file(src, md5=True)
    assert (got.size, got.adler32) == (len(DATA), adler(DATA))
    assert sum(pace.calls) == len(DATA) and max(pace.calls) == 65536   # paced chunk by chunk
    assert listing(dest) == ["scope", "scope/run42", "scope/run42/f1.fits"]   # no temp file left


def test_put_accepts_file_urls(src: Path, dest: Path) -> None:
    final = dest / "with space" / "f.fits"
    url = "file://" + str(final).replace(" ", "%20")
    assert url_to_path(url) == str(final)
    PosixTransport(fsync=False).put(str(src), url, expected_for(DATA), Pace())
    assert final.read_bytes() == DATA


def test_put_replaces_a_different_old_copy(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    final.write_bytes(b"an older, wrong copy")       # written by this version (a bad copy)
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA, may_replace=True), Pace())
    assert final.read_bytes() == DATA


def test_other_bytes_nobody_vouches_for_are_never_replaced(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    final.write_bytes(b"an older night's only copy")
    for exp in (expected_for(DATA), Expected(len(DATA), None)):
        with pytest.raises(DestinationOccupied):
            PosixTransport(fsync=False).put(str(src), str(final), exp, Pace())
        assert final.read_bytes() == b"an older night's only copy"
    assert listing(dest) == ["f1.fits"]


def test_bytes_appearing_while_the_copy_is_written_are_kept(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"

    def intrude(n: int) -> None:
        if not final.exists():
            final.write_bytes(b"someone else's")
    with pytest.raises(DestinationOccupied):
        PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), intrude)
    assert final.read_bytes() == b"someone else's" and listing(dest) == ["f1.fits"]


def test_two_writers_of_one_url_never_share_a_temporary_file(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    inner: list[Exception] = []

    def second_writer(n: int) -> None:
        if not inner:
            try:
                PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), Pace())
            except RetryableError as exc:
                inner.append(exc)
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), second_writer)
    assert inner and "being written" in str(inner[0])
    assert final.read_bytes() == DATA and listing(dest) == ["f1.fits"]


def test_identical_existing_copy_is_success_without_rewriting(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    final.write_bytes(DATA)
    os.utime(final, ns=(1_000_000_000, 1_000_000_000))
    before = os.stat(final)
    pace = Pace()
    got = PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), pace)
    after = os.stat(final)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert pace.calls == []                 # nothing was sent
    assert (got.size, got.blake3, got.adler32) == (len(DATA), blake3.blake3(DATA).hexdigest(), adler(DATA))
    assert listing(dest) == ["f1.fits"]


def test_same_size_but_rotted_copy_is_rewritten(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    rotted = bytearray(DATA)
    rotted[1000] ^= 0xFF
    final.write_bytes(bytes(rotted))
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA, may_replace=True), Pace())
    assert final.read_bytes() == DATA


def test_source_changed_since_hashing(src: Path, dest: Path) -> None:
    final = dest / "run" / "f1.fits"
    wrong = Expected(len(DATA), blake3.blake3(b"what was hashed earlier").hexdigest(), adler(DATA))
    with pytest.raises(FileChanged, match="changed since it was hashed"):
        PosixTransport(fsync=False).put(str(src), str(final), wrong, Pace())
    assert not final.exists()
    assert not os.path.lexists(temp_name(str(final)))
    assert listing(dest) == ["run"]          # no final name, no temp file


def test_source_grew_since_hashing(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    exp = expected_for(DATA)
    with open(src, "ab") as fh:
        fh.write(b"more")
    with pytest.raises(FileChanged, match=f"{len(DATA) + 4} bytes"):
        PosixTransport(fsync=False).put(str(src), str(final), exp, Pace())
    assert listing(dest) == []


def test_a_changed_source_does_not_clobber_an_existing_copy(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    final.write_bytes(b"whatever was there")
    wrong = Expected(len(DATA), "0" * 64, adler(DATA), may_replace=True)
    with pytest.raises(FileChanged):
        PosixTransport(fsync=False).put(str(src), str(final), wrong, Pace())
    assert final.read_bytes() == b"whatever was there"
    assert listing(dest) == ["f1.fits"]


def test_leftover_temp_from_a_crash_is_overwritten(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    Path(temp_name(str(final))).write_bytes(b"half a copy")
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), Pace())
    assert final.read_bytes() == DATA
    assert listing(dest) == ["f1.fits"]


def test_missing_source(tmp_path: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    with pytest.raises(FileVanished):
        PosixTransport(fsync=False).put(str(tmp_path / "gone.fits"), str(final), expected_for(DATA), Pace())
    assert not final.exists() and not os.path.lexists(temp_name(str(final)))


def test_unwritable_destination_is_a_storage_error(src: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_bytes(b"")
    with pytest.raises((RetryableError, PermanentError)):
        PosixTransport(fsync=False).put(str(src), str(blocker / "sub" / "f"), expected_for(DATA), Pace())


def test_stat(src: Path, dest: Path) -> None:
    t = PosixTransport(fsync=False)
    assert t.stat(str(dest / "nothing")) is None
    final = dest / "f1.fits"
    final.write_bytes(b"Wikipedia")
    assert t.stat(str(final)) == RemoteStat(9, "11e60398")
    assert t.stat("file://" + str(final)) == RemoteStat(9, "11e60398")
    assert t.stat(str(final), verify="recorded") == RemoteStat(9, "11e60398")   # no xattr: re-read


def test_put_records_the_checksum_with_the_copy(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), Pace())
    st = os.stat(final)
    assert os.getxattr(final, XATTR).decode() == f"{adler(DATA)}:{len(DATA)}:{st.st_mtime_ns}"


def _put_and_fake_the_xattr(src: Path, final: Path) -> tuple[PosixTransport, str]:
    t = PosixTransport(fsync=False)
    t.put(str(src), str(final), expected_for(DATA), Pace())
    st = os.stat(final)
    # a recorded value different from the real one tells us which path stat() took
    fake = "feedf00d"
    os.setxattr(final, XATTR, f"{fake}:{st.st_size}:{st.st_mtime_ns}".encode())
    return t, fake


def test_recorded_verify_uses_the_xattr(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    t, fake = _put_and_fake_the_xattr(src, final)
    assert t.stat(str(final), verify="recorded") == RemoteStat(len(DATA), fake)
    assert t.stat(str(final), verify="reread") == RemoteStat(len(DATA), adler(DATA))


def test_recorded_verify_rereads_after_the_copy_grew(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    t, _ = _put_and_fake_the_xattr(src, final)
    with open(final, "ab") as fh:
        fh.write(b"x")
    assert t.stat(str(final), verify="recorded") == RemoteStat(len(DATA) + 1, adler(DATA + b"x"))


def test_recorded_verify_rereads_after_the_copy_was_rewritten_in_place(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    t, _ = _put_and_fake_the_xattr(src, final)
    st = os.stat(final)
    rotted = bytes(reversed(DATA))
    with open(final, "r+b") as fh:         # same size, same inode, same xattr
        fh.write(rotted)
    os.utime(final, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert t.stat(str(final), verify="recorded") == RemoteStat(len(DATA), adler(rotted))


def test_recorded_verify_ignores_a_garbled_xattr(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    final.write_bytes(b"Wikipedia")
    os.setxattr(final, XATTR, b"garbage")
    assert PosixTransport().stat(str(final), verify="recorded") == RemoteStat(9, "11e60398")


def test_delete(dest: Path) -> None:
    final = dest / "f1.fits"
    final.write_bytes(b"x")
    t = PosixTransport()
    t.delete(str(final))
    assert not final.exists()
    t.delete(str(final))   # a missing copy is success


def test_temp_name_is_hidden_and_marked() -> None:
    assert temp_name("/lake/s/run/f1.fits") == "/lake/s/run/.f1.fits.edge-agent-part"


def test_a_name_near_the_255_byte_limit_still_gets_a_temporary_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.hashing import hash_file
    from edge_agent.transfer.base import Expected
    from edge_agent.transfer.posix import PosixTransport, temp_name
    src = tmp_path / ("y" * 250)
    src.write_bytes(b"long")
    dst = tmp_path / "lake" / ("y" * 250)
    assert len(os.path.basename(temp_name(str(dst)))) <= 255
    d = hash_file(src)
    PosixTransport(fsync=False).put(str(src), str(dst), Expected(d.size, d.blake3, d.adler32), lambda n: None)
    assert dst.read_bytes() == b"long"


def test_a_first_read_hashes_while_copying_and_trusts_nothing_already_there(src: Path, dest: Path) -> None:
    final = dest / "f1.fits"
    final.write_bytes(DATA)                    # unknown content is never taken for this file's copy
    before = final.stat().st_ino
    got = PosixTransport(fsync=False).put(str(src), str(final), Expected(len(DATA), None, want_md5=True, may_replace=True), lambda n: None)
    assert final.read_bytes() == DATA and final.stat().st_ino != before   # written anew, renamed in
    assert got.adler32 == adler(DATA) and got.md5 is not None


def test_a_temporary_name_still_linked_to_a_published_copy_never_truncates_it(src: Path, dest: Path) -> None:
    """A writer died between giving the copy its name (a link) and removing the temporary name: the
    next writer of that temporary name must not empty the published copy through it."""
    from edge_agent.transfer.posix import _locked_temp
    final = dest / "f1.fits"
    final.write_bytes(DATA)
    tmp = temp_name(str(final))
    os.link(final, tmp)
    with _locked_temp(tmp) as fh:
        fh.write(b"another copy")
    assert final.read_bytes() == DATA and not os.path.lexists(tmp)


def test_open_reads_a_path_or_file_url_and_a_missing_file_is_object_missing(src: Path, dest: Path) -> None:
    from edge_agent.errors import ObjectMissing
    t = PosixTransport()
    with t.open(str(src)) as fh:
        assert fh.read() == DATA
    with t.open("file://" + str(src)) as fh:
        assert fh.read() == DATA
    with pytest.raises(ObjectMissing):
        t.open(str(dest / "none")).__enter__()


def test_a_temporary_name_left_linked_to_the_published_copy_by_a_killed_writer_goes(src: Path, dest: Path) -> None:
    """kill -9 between the link that publishes a copy and the removal of its temporary name: the
    name stayed as a second link to the copy for good (the next attempt found the copy identical
    and wrote nothing; seen in the kill -9 storm on a PostgreSQL ledger)."""
    final = dest / "scope" / "f1.fits"
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), Pace())
    os.link(final, temp_name(str(final)))                  # what the killed writer left
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), Pace())
    assert listing(dest) == ["scope", "scope/f1.fits"] and final.read_bytes() == DATA


def test_a_temporary_file_that_is_not_the_published_copy_is_left_to_its_writer(src: Path, dest: Path) -> None:
    final = dest / "scope" / "f1.fits"
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), Pace())
    Path(temp_name(str(final))).write_bytes(b"being written")   # another writer's, not published
    PosixTransport(fsync=False).put(str(src), str(final), expected_for(DATA), Pace())
    assert Path(temp_name(str(final))).read_bytes() == b"being written" and final.read_bytes() == DATA
