"""The transport seam: one class per storage protocol, a fake in tests, the core never knows which."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

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
