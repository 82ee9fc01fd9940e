"""The transport seam: one class per storage protocol, a fake in tests, the core never knows which."""

from __future__ import annotations

import abc
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import ChecksumMismatch, FileChanged, PermanentError, RetryableError
from ..hashing import Consumer, Digests
from ..localfs import Source


@dataclass(frozen=True)
class Expected:
    """What the bytes must hash to: the values recorded when the file was hashed.

    On a version's first read (the first copy is its hashing pass) nothing but the size is
    known: `blake3` is None, whatever `size` bytes are read are the content, and `want_md5`
    says whether md5 is computed in that pass.
    """
    size: int
    blake3: str | None
    adler32: str | None = None
    md5: str | None = None
    want_md5: bool = False
    # May what lies at the URL be replaced? Only when this version owns the name (it reserved it
    # while the URL was empty, or wrote that copy itself): a copy of another version, or of an
    # older night whose catalogue entry was lost, is never overwritten (DestinationOccupied).
    may_replace: bool = False
    # Was an object already at the URL written by a version with these very bytes (the ledger
    # says so)? Then size and adler32 recognise it. Otherwise a match on those alone is no proof
    # (adler32 collides easily on small files): only a strong digest is (blake3 read back, an S3
    # ETag equal to the md5), and anything else is DestinationOccupied.
    known_writer: bool = False
    # Was the URL found empty right before this upload, and recorded as this version's before a
    # byte was written (the transfer step's look)? Then the transport does not look again: what
    # it would find is what it may replace anyway, and a look costs a request per copy.
    found_empty: bool = False

    @property
    def known(self) -> bool:
        """Are the content's hashes recorded (so a copy already there can be recognised)?"""
        return self.blake3 is not None

    @property
    def hash_md5(self) -> bool:
        return self.md5 is not None or self.want_md5

    def check(self, source: str, got: Digests) -> None:
        """Raise FileChanged if the bytes just read from `source` are not what was recorded."""
        if got.size != self.size:
            how = f"{got.size} bytes (recorded {self.size})"
        elif self.blake3 is not None and got.blake3 != self.blake3:
            how = f"blake3 {got.blake3[:16]}… (recorded {self.blake3[:16]}…)"
        else:
            return
        when = "since it was hashed" if self.known else "while it was being read"
        raise FileChanged(f"{source} changed {when}: {how}")

    def too_long(self, source: str, read: int) -> None:
        """Raise FileChanged once more bytes were read than the file had (it is growing)."""
        if read > self.size:
            when = "since it was hashed" if self.known else "while it was being read"
            raise FileChanged(f"{source} changed {when}: it grew past {self.size} bytes")

    def digests(self) -> Digests:
        """The recorded digests, for a copy found identical (only when known)."""
        assert self.blake3 is not None and self.adler32 is not None
        return Digests(self.size, self.blake3, self.adler32, self.md5)


@dataclass(frozen=True)
class RemoteStat:
    """What a storage answers about the object at a URL."""
    size: int
    adler32: str | None   # None: the storage cannot say (the copy then does not count)
    md5: str | None = None  # what an S3 ETag says (a single-PUT object's ETag is its MD5)


# Called with a byte count before each chunk is sent; blocks to honour the bandwidth cap.
Pacer = Callable[[int], None]


class Transport(abc.ABC):
    """Moves one local file to one URL and tells what a URL holds."""

    scheme: str = ""
    # Can a failed or killed upload leave a partial object under the final name? (HTTP and XRootD
    # can; a posix copy is published whole by a link; an S3 PUT is atomic.)
    leaves_partials: bool = False
    # What vouches for a copy on this storage: its size and adler32, or (HTTP and XRootD with
    # verify_upload = "size", a storage that answers no adler32) its size alone.
    verify_upload: str = "adler32"

    @abc.abstractmethod
    def put(self, source: Source, url: str, expected: Expected, pace: Pacer,
            also: Sequence[Consumer] = ()) -> Digests:
        """Stream `source` to `url`, hashing in the same pass; `also` are fed the same chunks.

        `source` is opened with localfs.open_source (a LocalFile: never through a symlink).
        Raises FileChanged if the bytes read do not hash to `expected` (nothing is left
        at `url` then), FileVanished if `source` cannot be opened because it is gone (or
        SymlinkInPath, a kind of it), SourceUnreadable if it may not be read,
        RetryableError / PermanentError for storage faults. An identical copy already at
        `url` is success when `expected` is known. Anything else at `url` is replaced only if
        `expected.may_replace`; otherwise DestinationOccupied is raised and nothing is written
        there. Returns the digests of what was sent.
        """

    @abc.abstractmethod
    def stat(self, url: str, verify: str = "reread") -> RemoteStat | None:
        """Size and adler32 of what `url` holds (None if nothing is there)."""

    @abc.abstractmethod
    def delete(self, url: str) -> None:
        """Remove `url`; a missing object is success."""

    def open(self, url: str) -> AbstractContextManager[BinaryIO]:
        """A streaming read of what `url` holds: a context manager giving a binary file object
        (read it to its end; leaving the `with` closes the connection or process behind it).

        Raises ObjectMissing if nothing is there, RetryableError / PermanentError for storage
        faults, when opening or while reading: a read that fails midway raises, it never looks
        like the end of a shorter object. Nothing is verified here (see access.VerifiedStream).
        The default: this transport cannot read (PermanentError).
        """
        raise PermanentError(f"the {self.scheme or type(self).__name__} transport cannot read what a URL holds")

    def describes_copy(self, there: RemoteStat, size: int, adler32: str | None, by_size: bool = False) -> bool:
        """Does what the storage says of an object (`there`) describe a copy of bytes of this `size`
        and `adler32`: size and adler32 equal, or (`by_size`) the size alone where the storage
        answers no adler32 and is trusted with sizes (verify_upload = "size"). Only a copy the
        ledger knows was written by a version with these bytes may be recognised so; by its size
        alone only one that this version may not replace (another version's: it is never
        rewritten, so it is recognised or waited for; its own is simply written again)."""
        if there.size != size:
            return False
        if there.adler32 is None:
            return by_size and self.verify_upload == "size"
        return adler32 is not None and there.adler32.lower() == adler32.lower()

    def same_bytes(self, url: str, d: Digests) -> bool:
        """Does `url` hold exactly the bytes digested in `d`, by a strong digest (not size and adler32
        alone)? False where the storage cannot say (the object is then someone else's)."""
        return False

    def exists(self, url: str) -> bool:
        """Does `url` hold anything at all? (No checksum asked: the cheap question asked before a
        name is reserved or a copy written.)"""
        return self.stat(url) is not None


def copy_problem(remote: RemoteStat | None, got: Digests, verify_upload: str, shown: str,
                 how: str) -> tuple[Exception, bool] | None:
    """What is wrong with a copy just written, as (error to raise, remove the copy first?), or None.

    A copy counts only if the storage answers the size sent and, unless verify_upload is "size",
    the adler32 sent; `how` names how the storage is asked (for the operator's message).
    """
    if remote is None:
        return RetryableError(f"{shown} is not there right after a successful upload"), False
    if remote.size != got.size:
        return ChecksumMismatch(f"{shown} holds {remote.size} bytes, {got.size} were sent"), True
    if remote.adler32 is None:
        if verify_upload == "size":
            return None
        return PermanentError(f"{shown}: the storage does not answer {how}, so the upload cannot be "
                              "verified; verify_upload = \"size\" accepts the size alone for such a storage"), True
    if remote.adler32 != got.adler32:
        return ChecksumMismatch(f"{shown}: storage reports adler32 {remote.adler32}, {got.adler32} was sent"), True
    return None


class ChunkStream(io.RawIOBase):
    """A read-only binary stream over an iterator of byte chunks (what Transport.open gives when
    the storage hands out chunks: an HTTP body, xrdcp's output). The iterator's own errors pass
    through; closing the stream closes the iterator."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        super().close()
