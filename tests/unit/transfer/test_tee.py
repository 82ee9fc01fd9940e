"""transfer/tee.py: one read of a local file, hashed, paced and handed on in the same pass."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from edge_agent.errors import FileChanged, FileVanished, RetryableError
from edge_agent.hashing import MultiHash, hash_file
from edge_agent.transfer.base import Expected
from edge_agent.transfer.tee import Tee, read_once

DATA = os.urandom(300_000)
CHUNK = 64 * 1024


class Seen:
    """A consumer (a FITS scan's stand-in): what it was fed, and how often it was reset."""

    def __init__(self) -> None:
        self.data = b""
        self.resets = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self.data += bytes(chunk)

    def reset(self) -> None:
        self.data = b""
        self.resets += 1


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "f.fits"
    p.write_bytes(DATA)
    return p


def recorded(data: bytes = DATA) -> Expected:
    d = MultiHash()
    d.update(data)
    got = d.digests()
    return Expected(got.size, got.blake3, got.adler32)


@pytest.mark.parametrize("fresh", [False, True])
def test_what_is_handed_on_is_what_is_hashed(src: Path, fresh: bool) -> None:
    paced: list[int] = []
    also = Seen()
    out = b""
    with read_once(str(src), recorded(), md5=True, pace=paced.append, also=[also], chunk_size=CHUNK,
                   fresh=fresh) as tee:
        for chunk in tee.chunks():
            assert isinstance(chunk, bytes) == fresh
            out += bytes(chunk)
        got = tee.digests()
    assert out == DATA and also.data == DATA and also.resets == 1
    assert sum(paced) == len(DATA) and max(paced) == CHUNK
    assert got == hash_file(src, md5=True)


def test_a_hashing_pass_without_a_destination(src: Path) -> None:
    counted: list[int] = []
    with read_once(str(src), pace=counted.append, chunk_size=CHUNK) as tee:
        got = tee.drain()
    assert got == hash_file(src) and got.md5 is None and sum(counted) == len(DATA)


def test_a_file_that_grows_stops_the_pass_at_the_recorded_size(src: Path) -> None:
    with open(src, "ab") as fh:
        fh.write(b"x" * CHUNK)
    exp = recorded()
    with read_once(str(src), exp, chunk_size=CHUNK) as tee, pytest.raises(FileChanged, match="grew past"):
        for _ in tee.chunks():
            pass
    assert tee.size <= len(DATA)     # the extra chunk was never hashed nor handed on


def test_whole_reads_a_grown_file_to_its_end_and_says_how_large(src: Path) -> None:
    with open(src, "ab") as fh:
        fh.write(b"more")
    with read_once(str(src), recorded(), chunk_size=CHUNK, whole=True) as tee, \
            pytest.raises(FileChanged, match=f"{len(DATA) + 4} bytes"):
        for _ in tee.chunks():
            pass
    assert tee.size == len(DATA) + 4


def test_a_short_file_fails_before_the_pass_ends(src: Path) -> None:
    src.write_bytes(DATA[:-1])
    with read_once(str(src), recorded(), chunk_size=CHUNK) as tee, pytest.raises(FileChanged):
        for _ in tee.chunks():
            pass


def test_other_bytes_of_the_same_size_fail_the_check(src: Path) -> None:
    exp = recorded()
    src.write_bytes(DATA[::-1])
    with read_once(str(src), exp, chunk_size=CHUNK) as tee:
        for _ in tee.chunks():
            pass
        with pytest.raises(FileChanged, match="blake3"):
            tee.digests()


def test_first_read_checks_the_size_only(src: Path) -> None:
    with read_once(str(src), Expected(len(DATA), None, want_md5=True), chunk_size=CHUNK) as tee:
        got = tee.drain()
    assert got.blake3 == blake3.blake3(DATA).hexdigest() and got.md5 is not None


def test_a_missing_source_is_file_vanished(tmp_path: Path) -> None:
    with pytest.raises(FileVanished):
        read_once(str(tmp_path / "gone"))


def test_a_failed_read_is_retryable_and_names_the_file() -> None:
    class Broken:
        def readinto(self, buf: bytearray) -> int:
            raise OSError(5, "Input/output error")

        def read(self, n: int) -> bytes:
            raise OSError(5, "Input/output error")

        def close(self) -> None:
            pass
    for fresh in (False, True):
        tee = Tee(Broken(), "/buf/f.fits", None, False, None, (), CHUNK, fresh)  # type: ignore[arg-type]
        with pytest.raises(RetryableError, match="reading /buf/f.fits failed: Input/output error"):
            tee.drain()


def test_one_pass_only_and_the_file_is_closed(src: Path) -> None:
    with read_once(str(src), chunk_size=CHUNK) as tee:
        tee.drain()
        with pytest.raises(RuntimeError):
            next(tee.chunks())
    assert tee._fh.closed
