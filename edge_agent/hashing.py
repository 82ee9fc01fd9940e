"""One-pass hashing: blake3 (identity), adler32 (the lake's checksum) and optionally md5.

A `MultiHash` is fed the same chunks that are being streamed somewhere else, so a
file is read once per upload and what was sent is exactly what was hashed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Protocol, Sequence

import blake3

# the smallest read buffer (a file that is empty or tiny when opened may still grow)
MIN_BUFFER = 64 << 10
CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Digests:
    """What one pass over a file's bytes gives: its size and checksums."""
    size: int
    blake3: str
    adler32: str          # 8 lower-case hex digits, as Rucio and XRootD write it
    md5: str | None = None


# Chunks at least this large have their md5 computed on a thread of its own (smaller ones: the
# hand-over costs more than it saves).
_MD5_BESIDE = 1 << 20
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _md5_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="md5")
        return _pool


class MultiHash:
    """blake3, adler32 and (optionally) md5 of a byte stream fed chunk by chunk, in one pass."""
    def __init__(self, md5: bool = False) -> None:
        self._b3 = blake3.blake3()
        self._adler = 1
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        # blake3, zlib and hashlib release the GIL on large inputs: md5, the slowest by far, runs
        # on another core beside blake3 + adler32 (40 % more per thread with md5 on this machine).
        # It is waited for before returning: the caller may reuse the chunk's buffer at once.
        md5 = None
        if self._md5 is not None:
            if len(chunk) >= _MD5_BESIDE:
                md5 = _md5_pool().submit(self._md5.update, chunk)
            else:
                self._md5.update(chunk)
        self._b3.update(chunk)
        self._adler = zlib.adler32(chunk, self._adler)
        if md5 is not None:
            md5.result()
        self.size += len(chunk)

    def digests(self) -> Digests:
        return Digests(self.size, self._b3.hexdigest(), f"{self._adler & 0xFFFFFFFF:08x}",
                       self._md5.hexdigest() if self._md5 else None)


def buffer_size(fh: BinaryIO, chunk_size: int) -> int:
    """The read buffer for `fh`: `chunk_size`, or less for a smaller file. A buffer is zeroed when
    it is made (CPU, with the GIL held): 8 MiB for each 64 KiB file was most of a small file's
    read. One byte more than the file holds reads it whole and sees the end in the next call; a
    file that grows is read on, chunk by chunk."""
    try:
        known = os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, ValueError):   # not a file (a test's stream)
        return chunk_size
    return max(1, min(chunk_size, max(known + 1, MIN_BUFFER)))


def read_chunks(fh: BinaryIO, chunk_size: int = CHUNK,
                on_chunk: Callable[[int], None] | None = None) -> Iterator[memoryview]:
    """Yield the file in chunks through one reusable buffer (memory stays flat)."""
    buf = bytearray(buffer_size(fh, chunk_size))
    view = memoryview(buf)
    while True:
        n = fh.readinto(buf)  # type: ignore[attr-defined]
        if not n:
            return
        if on_chunk is not None:
            on_chunk(n)
        yield view[:n]


class Consumer(Protocol):
    """Something fed the chunks of a read (a FITS scan). `reset` starts it over when a transport
    has to read and send the file again (an HTTP redirect), so it sees exactly one pass."""
    def update(self, chunk: bytes | memoryview) -> None: ...

    def reset(self) -> None: ...


def hash_file(path: str | os.PathLike[str], md5: bool = False, chunk_size: int = CHUNK,
              on_chunk: Callable[[int], None] | None = None, also: Sequence[Consumer] = ()) -> Digests:
    """Hash a file in one read; `also` are further consumers fed the same chunks (e.g. a FITS scan)."""
    with open(path, "rb", buffering=0) as fh:
        return hash_stream(fh, md5, chunk_size, on_chunk, also)


def hash_stream(fh: BinaryIO, md5: bool = False, chunk_size: int = CHUNK,
                on_chunk: Callable[[int], None] | None = None, also: Sequence[Consumer] = ()) -> Digests:
    """Hash an open file from where it stands to its end, in one read (see hash_file)."""
    h = MultiHash(md5)
    _advise_sequential(fh)
    for chunk in read_chunks(fh, chunk_size, on_chunk):
        h.update(chunk)
        for c in also:
            c.update(chunk)
    return h.digests()


def adler32_of(path: str | os.PathLike[str], chunk_size: int = CHUNK) -> tuple[int, str]:
    """Size and adler32 of a file (used to re-read a copy when confirming it)."""
    adler, size = 1, 0
    with open(path, "rb", buffering=0) as fh:
        _advise_sequential(fh)
        for chunk in read_chunks(fh, chunk_size):
            adler = zlib.adler32(chunk, adler)
            size += len(chunk)
    return size, f"{adler & 0xFFFFFFFF:08x}"


def _advise_sequential(fh: BinaryIO) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
