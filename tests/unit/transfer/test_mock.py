"""transfer/mock.py: MockTransport keeps the rules of Transport.put, and misbehaves on request."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import blake3
import pytest

from edge_agent.errors import (
    ChecksumMismatch,
    DestinationOccupied,
    FileChanged,
    ObjectMissing,
    PermanentError,
    RetryableError,
    ShuttingDown,
)
from edge_agent.transfer.base import Expected, RemoteStat, Transport
from edge_agent.transfer.mock import MockTransport

DATA = os.urandom(200_000)
URL = "mock://store/data/f.fits"
CHUNK = 32 * 1024


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def expected_for(data: bytes = DATA, **kw: bool) -> Expected:
    return Expected(len(data), blake3.blake3(data).hexdigest(), adler(data), **kw)


def no_pace(n: int) -> None:
    pass


@pytest.fixture
def src(tmp_path: Path) -> str:
    p = tmp_path / "f.fits"
    p.write_bytes(DATA)
    return str(p)


def mock(**kw: object) -> MockTransport:
    return MockTransport(chunk_size=CHUNK, **kw)  # type: ignore[arg-type]


def test_is_a_transport_that_stores_and_reads_back(src: str) -> None:
    t = mock()
    assert isinstance(t, Transport)
    got = t.put(src, URL, expected_for(), no_pace)
    assert t.objects[URL] == DATA and got.blake3 == blake3.blake3(DATA).hexdigest()
    assert t.stat(URL) == RemoteStat(len(DATA), adler(DATA)) and t.exists(URL)
    assert t.same_bytes(URL, got)
    with t.open(URL) as fh:
        assert fh.read() == DATA
    t.delete(URL)
    t.delete(URL)                                   # nothing there is success
    assert t.stat(URL) is None and not t.exists(URL)
    with pytest.raises(ObjectMissing):
        t.open(URL).__enter__()
    assert t.asked("delete") == [URL, URL]


def test_each_put_is_kept_with_what_it_was_told_to_expect(src: str) -> None:
    t = mock()
    first = Expected(len(DATA), None, None)                 # written while hashing: nothing known yet
    t.put(src, URL, first, no_pace)
    t.fail("put")
    with pytest.raises(RetryableError):
        t.put(src, URL + ".2", expected_for(), no_pace)    # a failed put is kept too
    assert t.puts == [(URL, first), (URL + ".2", expected_for())]
    assert [e.known for _, e in t.puts] == [False, True]


def test_an_identical_copy_is_success_without_writing(src: str) -> None:
    t = mock()
    t.objects[URL] = DATA
    t.put(src, URL, expected_for(), no_pace)        # not may_replace: recognised by blake3
    assert t.objects[URL] == DATA


def test_other_bytes_are_never_replaced_without_may_replace(src: str) -> None:
    t = mock()
    t.objects[URL] = b"someone else's"
    with pytest.raises(DestinationOccupied):
        t.put(src, URL, expected_for(), no_pace)
    assert t.objects[URL] == b"someone else's"
    t.put(src, URL, expected_for(may_replace=True), no_pace)
    assert t.objects[URL] == DATA


def test_adler32_recognises_a_copy_only_where_the_writer_is_known(src: str) -> None:
    t = mock(recognises="adler32")
    t.objects[URL] = DATA
    with pytest.raises(DestinationOccupied):
        t.put(src, URL, expected_for(), no_pace)
    t.put(src, URL, expected_for(known_writer=True), no_pace)
    assert not t.same_bytes(URL, t.put(src, URL, expected_for(known_writer=True), no_pace))


def test_a_changed_source_leaves_nothing(src: str) -> None:
    t = mock()
    recorded = expected_for()
    Path(src).write_bytes(DATA[::-1])
    with pytest.raises(FileChanged):
        t.put(src, URL, recorded, no_pace)
    assert URL not in t.objects


def test_a_lying_stat_fails_the_put_and_the_copy_goes(src: str) -> None:
    t = mock()
    t.lie(URL, RemoteStat(len(DATA), "0badf00d"))
    assert t.stat(URL) == RemoteStat(len(DATA), "0badf00d") and t.exists(URL)
    with pytest.raises(DestinationOccupied):          # something is "there"
        t.put(src, URL, expected_for(), no_pace)
    with pytest.raises(ChecksumMismatch):
        t.put(src, URL, expected_for(may_replace=True), no_pace)
    assert URL not in t.objects and t.stat(URL) is None


def test_a_lie_outlives_a_put_until_the_truth_is_told(src: str) -> None:
    t = mock(verify_upload="size")
    t.objects[URL] = b"an older copy"
    t.lie(URL, RemoteStat(len(DATA) + 1, adler(DATA)))    # a stale answer cached by the storage
    with pytest.raises(ChecksumMismatch):
        t.put(src, URL, expected_for(may_replace=True), no_pace)
    assert URL not in t.objects                             # removed: the version owned the URL
    t.put(src, URL, expected_for(may_replace=True), no_pace)
    t.lie(URL, None)
    assert t.stat(URL) is None and t.objects[URL] == DATA   # the bytes are not changed by a lie
    t.tell_truth(URL)
    assert t.stat(URL) == RemoteStat(len(DATA), adler(DATA))


def test_fail_n_times_then_succeed(src: str) -> None:
    t = mock()
    t.fail("put", times=2)
    for _ in range(2):
        with pytest.raises(RetryableError):
            t.put(src, URL, expected_for(), no_pace)
    t.put(src, URL, expected_for(), no_pace)
    t.fail("stat", times=None, error=PermanentError("refused"))
    for _ in range(3):
        with pytest.raises(PermanentError, match="refused"):
            t.stat(URL)
    t.heal()
    assert t.stat(URL) is not None


@pytest.mark.parametrize("leaves", [True, False])
def test_a_put_cut_short_leaves_a_partial_only_where_the_storage_does(src: str, leaves: bool) -> None:
    t = mock(leaves_partials=leaves)
    t.fail("put", after_bytes=50_000)
    with pytest.raises(RetryableError):
        t.put(src, URL, expected_for(may_replace=True), no_pace)
    if leaves:
        assert t.objects[URL] == DATA[:50_000]
        assert t.stat(URL) == RemoteStat(50_000, adler(DATA[:50_000]))   # a partial never verifies
    else:
        assert URL not in t.objects


def test_an_abandoned_upload_is_removed_where_the_url_is_the_versions_own(src: str) -> None:
    def stop(n: int) -> None:
        raise ShuttingDown("stop")
    t = mock(leaves_partials=True)
    with pytest.raises(ShuttingDown):
        t.put(src, URL, expected_for(may_replace=True), stop)
    assert URL not in t.objects


def test_a_lost_object_is_gone_without_a_delete(src: str) -> None:
    t = mock()
    t.put(src, URL, expected_for(), no_pace)
    t.lose(URL)
    assert t.stat(URL) is None and t.asked("delete") == []
