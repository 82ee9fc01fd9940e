"""The one read of a local file: opened safely, hashed, paced and handed on in the same pass.

Every copy (posix, HTTP, XRootD, S3) and the hashing pass without a copy read the file through
`read_once`, so a file is read once per upload and what was sent is exactly what was hashed:

    with read_once(source, expected, pace=pace, also=also) as tee:
        for chunk in tee.chunks():       # or: content=tee.chunks(), for a client that pulls
            destination.write(chunk)
        got = tee.digests()              # FileChanged if the bytes are not what was recorded
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import BinaryIO, Self

from ..errors import RetryableError
from ..hashing import CHUNK, Consumer, Digests, MultiHash, buffer_size
from ..localfs import Source, open_source
from .base import Expected, Pacer


class Tee:
    """One pass over an open local file (made by `read_once`; a context manager that closes it).

    `chunks()` yields the file's chunks; before each is yielded it has been checked against the
    recorded size (Expected.too_long: a growing file stops the pass, unless `whole`), paced, hashed (blake3,
    adler32, md5 if asked) and fed to every consumer in `also`. The pass ends with FileChanged
    if the file ended short of the recorded size, so a client that pulls the chunks never
    finishes a body that is not the file. A failed read of the file is a RetryableError naming it.
    """

    def __init__(self, fh: BinaryIO, source: Source, expected: Expected | None, md5: bool, pace: Pacer | None,
                 also: Sequence[Consumer], chunk_size: int, fresh: bool, whole: bool = False) -> None:
        self._fh = fh
        self.source = source
        self.expected = expected
        self._hash = MultiHash(md5=md5)
        self._pace = pace
        self._also = tuple(also)
        self._chunk_size = chunk_size
        self._fresh = fresh
        self._whole = whole
        self._started = False

    @property
    def size(self) -> int:
        """Bytes read (and hashed) so far."""
        return self._hash.size

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The file from start to end, each chunk paced, hashed and fed to `also` before it is yielded.

        With `fresh` each chunk is a bytes object of its own (for a consumer that keeps a chunk after
        taking the next, as h11 does); otherwise one buffer is reused (memory stays flat: the chunk is
        valid until the next is asked for). One pass only: a second call raises.
        """
        if self._started:
            raise RuntimeError("a Tee is read once; open another with read_once")
        self._started = True
        expected, pace, also, h = self.expected, self._pace, self._also, self._hash
        stop_early = expected is not None and not self._whole
        for chunk in self._read():
            if stop_early:
                assert expected is not None
                expected.too_long(str(self.source), h.size + len(chunk))
            if pace is not None:
                pace(len(chunk))
            h.update(chunk)
            if also:
                # read-only to the consumers (an extractor plug-in among them): what was hashed is
                # what is sent, whatever a consumer does with its view
                seen = chunk.toreadonly() if isinstance(chunk, memoryview) else chunk
                for c in also:
                    c.update(seen)
            yield chunk
        if expected is not None and h.size != expected.size:
            expected.check(str(self.source), h.digests())   # raises: the file ended early

    def digests(self) -> Digests:
        """The digests of exactly the bytes read (and so sent), once they are checked against
        `expected` (FileChanged if size or recorded blake3 differ; nothing is checked without one)."""
        got = self._hash.digests()
        if self.expected is not None:
            self.expected.check(str(self.source), got)
        return got

    def drain(self) -> Digests:
        """The hashing pass without a destination: read every chunk, then `digests()`."""
        for _ in self.chunks():
            pass
        return self.digests()

    def _read(self) -> Iterator[bytes | memoryview]:
        fh = self._fh
        size = buffer_size(fh, self._chunk_size)  # type: ignore[arg-type]
        buf = None if self._fresh else bytearray(size)
        view = None if buf is None else memoryview(buf)
        while True:
            try:
                if buf is None:
                    chunk: bytes | memoryview = fh.read(size)
                    n = len(chunk)
                else:
                    n = fh.readinto(buf)  # type: ignore[attr-defined]
            except OSError as exc:
                raise RetryableError(f"reading {self.source} failed: {exc.strerror or exc}") from None
            if not n:
                return
            yield chunk if view is None else view[:n]

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_once(source: Source, expected: Expected | None = None, *, md5: bool | None = None,
              pace: Pacer | None = None, also: Sequence[Consumer] = (), chunk_size: int = CHUNK,
              fresh: bool = False, whole: bool = False) -> Tee:
    """Open `source` for one hashing pass; see Tee.

    `source` is opened with localfs.open_source: FileVanished (gone, not a regular file),
    SymlinkInPath or SourceUnreadable (no permission) are raised here, before anything is read.
    `expected`: what the bytes must be (None: whatever is read is the content, nothing is checked).
    `md5`: hash md5 too (default: when `expected` asks for it). `pace` is called with each chunk's
    length before it is hashed and handed on (the bandwidth cap, a byte counter). `also` are reset
    here and fed the same chunks, so a consumer sees exactly one pass even when a transport reads
    the file again (an HTTP redirect opens a second Tee). `whole`: read to the end even past the
    recorded size, so the FileChanged says how large the file became (the posix copy, which writes
    a temporary file that is removed anyway, has always said so).
    """
    fh = open_source(source)
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    for c in also:
        c.reset()
    want_md5 = md5 if md5 is not None else (expected is not None and expected.hash_md5)
    return Tee(fh, source, expected, want_md5, pace, also, chunk_size, fresh, whole)
