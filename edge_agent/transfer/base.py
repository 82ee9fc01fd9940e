"""The transport seam: one class per storage protocol, a fake in tests, the core never knows which."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

from ..errors import ChecksumMismatch, PermanentError, RetryableError
from ..hashing import Digests


@dataclass(frozen=True)
class Expected:
    """What the bytes must hash to: the values recorded when the file was hashed."""
    size: int
    blake3: str
    adler32: str
    md5: str | None = None


@dataclass(frozen=True)
class RemoteStat:
    size: int
    adler32: str | None   # None: the storage cannot say (the copy then does not count)
    md5: str | None = None  # what an S3 ETag says (a single-PUT object's ETag is its MD5)


# Called with a byte count before each chunk is sent; blocks to honour the bandwidth cap.
Pacer = Callable[[int], None]


class Transport(abc.ABC):
    """Moves one local file to one URL and tells what a URL holds."""

    scheme: str = ""

    @abc.abstractmethod
    def put(self, source: str, url: str, expected: Expected, pace: Pacer) -> Digests:
        """Stream `source` to `url`, hashing in the same pass.

        Raises FileChanged if the bytes read do not hash to `expected` (nothing is left
        at `url` then), FileVanished if `source` cannot be opened because it is gone,
        RetryableError / PermanentError for storage faults. An identical copy already at
        `url` is success. Returns the digests of what was sent.
        """

    @abc.abstractmethod
    def stat(self, url: str, verify: str = "reread") -> RemoteStat | None:
        """Size and adler32 of what `url` holds (None if nothing is there)."""

    @abc.abstractmethod
    def delete(self, url: str) -> None:
        """Remove `url`; a missing object is success."""


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
