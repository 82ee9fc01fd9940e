"""One-pass hashing: known vectors, chunking independence, agreement with the reference libraries."""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from pathlib import Path

import blake3
import pytest

from edge_agent.hashing import Digests, MultiHash, adler32_of, hash_file, read_chunks

DATA = os.urandom(3 * 65536 + 12345)
# adler32 overflows its 16-bit sums quickly on 0xff bytes: a good case for the modulo arithmetic
HIGH = b"\xff" * 100_000


def one_shot(data: bytes, md5: bool = True) -> Digests:
    return Digests(len(data), blake3.blake3(data).hexdigest(), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
                   hashlib.md5(data).hexdigest() if md5 else None)


def hashed(data: bytes, chunk: int, md5: bool = True) -> Digests:
    h = MultiHash(md5=md5)
    for i in range(0, len(data), chunk):
        h.update(data[i:i + chunk])
    return h.digests()


def test_adler32_known_vector() -> None:
    h = MultiHash()
    h.update(b"Wikipedia")
    assert h.digests().adler32 == "11e60398"


def test_empty_input() -> None:
    d = MultiHash(md5=True).digests()
    assert d.size == 0
    assert d.adler32 == "00000001"
    assert d.blake3 == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert d.md5 == "d41d8cd98f00b204e9800998ecf8427e"


def test_adler32_is_zero_padded() -> None:
    h = MultiHash()
    h.update(b"\x00")          # adler32 = 0x00010001
    assert h.digests().adler32 == "00010001"


@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536, 65537, len(DATA), len(DATA) + 1])
def test_independent_of_chunk_size(chunk: int) -> None:
    data = DATA if chunk > 1 else DATA[:5000]
    assert hashed(data, chunk) == one_shot(data)


def test_adler32_overflow_case() -> None:
    assert hashed(HIGH, 999) == one_shot(HIGH)


def test_md5_off_by_default() -> None:
    d = hashed(b"abc", 2, md5=False)
    assert d.md5 is None
    assert d.blake3 == blake3.blake3(b"abc").hexdigest()


def test_memoryview_chunks() -> None:
    h = MultiHash(md5=True)
    buf = bytearray(b"hello world")
    h.update(memoryview(buf)[:5])
    h.update(memoryview(buf)[5:])
    assert h.digests() == one_shot(b"hello world")


def test_read_chunks_sizes_and_callback() -> None:
    seen: list[int] = []
    chunks = [bytes(c) for c in read_chunks(io.BytesIO(b"x" * 10), 4, seen.append)]
    assert chunks == [b"xxxx", b"xxxx", b"xx"]
    assert seen == [4, 4, 2]


def test_read_chunks_of_empty_file() -> None:
    assert list(read_chunks(io.BytesIO(b""), 4)) == []


def test_hash_file(tmp_path: Path) -> None:
    p = tmp_path / "f.fits"
    p.write_bytes(DATA)
    seen: list[int] = []
    d = hash_file(p, md5=True, chunk_size=65536, on_chunk=seen.append)
    assert d == one_shot(DATA)
    assert sum(seen) == len(DATA) and max(seen) == 65536 and len(seen) == 4


def test_hash_file_accepts_bytes_paths(tmp_path: Path) -> None:
    p = os.fsencode(tmp_path) + b"/\xff.fits"
    with open(p, "wb") as fh:
        fh.write(b"Wikipedia")
    d = hash_file(p)
    assert (d.size, d.adler32, d.md5) == (9, "11e60398", None)


def test_hash_file_of_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.touch()
    assert hash_file(p, md5=True) == one_shot(b"")


def test_hash_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        hash_file(tmp_path / "nope")


def test_adler32_of(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(DATA)
    assert adler32_of(p, chunk_size=1000) == (len(DATA), one_shot(DATA).adler32)
    p.write_bytes(b"Wikipedia")
    assert adler32_of(p) == (9, "11e60398")


def test_md5_beside_the_other_hashes_on_a_reused_buffer(tmp_path: Path) -> None:
    """Large chunks have their md5 computed on another thread; the read buffer is reused for the
    next chunk as soon as update() returns, so update() must not return before md5 is done."""
    data = os.urandom(7 * (1 << 20) + 12345)
    p = tmp_path / "big"
    p.write_bytes(data)
    d = hash_file(p, md5=True, chunk_size=2 << 20)      # read_chunks: one buffer, refilled in place
    assert d.md5 == hashlib.md5(data).hexdigest()
    assert d.blake3 == blake3.blake3(data).hexdigest() and d.size == len(data)
    assert d.adler32 == f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def test_a_small_file_is_read_through_a_buffer_its_size_not_a_whole_chunk(tmp_path: Path) -> None:
    """Making an 8 MiB buffer (zeroed, with the GIL held) to read 64 KiB was most of the cost of
    reading a small file."""
    from edge_agent.hashing import MIN_BUFFER, buffer_size
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 1000)
    big.write_bytes(b"y" * (3 << 20))
    with open(small, "rb") as fh:
        assert buffer_size(fh, 8 << 20) == MIN_BUFFER
        assert [len(c) for c in read_chunks(fh, 8 << 20)] == [1000]
    with open(big, "rb") as fh:
        assert buffer_size(fh, 8 << 20) == (3 << 20) + 1     # read whole, the end seen next
        assert buffer_size(fh, 1 << 20) == 1 << 20
    assert buffer_size(io.BytesIO(b"abc"), 4096) == 4096     # not a file: as asked


def test_a_file_that_grows_after_it_was_opened_is_still_read_to_its_end(tmp_path: Path) -> None:
    p = tmp_path / "grows"
    p.write_bytes(b"a" * 10)
    with open(p, "rb") as fh:
        with open(p, "ab") as w:
            w.write(b"b" * 200_000)
        assert sum(len(c) for c in read_chunks(fh, 8 << 20)) == 200_010
