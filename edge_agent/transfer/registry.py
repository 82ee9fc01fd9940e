"""Which transport reaches a URL: transports mounted by URL prefix, as httpx mounts its transports.

A prefix is a scheme ("root://"), a scheme with host and path ("https://s3.example:443/bucket/"),
or an absolute local directory ("/data/lake1") for posix paths. The longest mounted prefix that
matches a URL wins, so an S3 bucket's signing transport takes its URLs from the plain https one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from ..errors import PermanentError
from ..urls import shown_url
from .base import Transport

# returns the prefixes to mount a transport at, once they can be known (an S3 RSE's endpoint is
# Rucio's to say); raises RetryableError while they cannot
FindPrefixes = Callable[[], list[str]]


def _matches(prefix: str, url: str) -> bool:
    if prefix.startswith("/"):
        # a directory holds its own path and what lies below it, never "/data/lake10" for "/data/lake1"
        root = prefix.rstrip("/") or "/"
        return url == root or url.startswith(root if root.endswith("/") else root + "/")
    return url.startswith(prefix)


class Transports:
    """The transports of an agent (or an audit), each mounted at the URL prefixes it serves."""

    def __init__(self) -> None:
        self._mounts: dict[str, Transport] = {}
        self._later: list[tuple[str, FindPrefixes, Transport]] = []
        self._lock = threading.Lock()

    def mount(self, prefix: str, transport: Transport) -> None:
        """After this, URLs under `prefix` (and no longer mounted prefix) go to `transport`."""
        if not prefix or not (prefix.startswith("/") or "://" in prefix):
            raise ValueError(f"a transport is mounted at a scheme:// prefix or an absolute directory, not {prefix!r}")
        with self._lock:
            self._mounts[prefix] = transport

    def mount_later(self, under: str, find: FindPrefixes, transport: Transport) -> None:
        """Mount `transport` at the prefixes `find()` returns, asked the first time a URL under
        `under` is looked up (and again after a failure): what `find` asks may be unreachable now."""
        with self._lock:
            self._later.append((under, find, transport))

    def for_url(self, url: str) -> Transport:
        """The transport of the longest mounted prefix that matches `url`.

        Raises PermanentError naming the URL (without its secrets) when none matches, and
        whatever a pending mount's `find` raises (RetryableError) for a URL under it."""
        self._resolve(url)
        with self._lock:
            best = max((p for p in self._mounts if _matches(p, url)), key=len, default=None)
            if best is not None:
                return self._mounts[best]
            mounted = sorted(self._mounts)
        raise PermanentError(f"no transport for {shown_url(url) if '://' in url else url} "
                             f"(transports are mounted at {mounted})")

    def _resolve(self, url: str) -> None:
        with self._lock:
            pending = [m for m in self._later if url.startswith(m[0])]
        for item in pending:
            _under, find, transport = item
            prefixes = find()
            with self._lock:
                for p in prefixes:
                    self._mounts[p] = transport
                if item in self._later:
                    self._later.remove(item)

    def transports(self) -> list[Transport]:
        """Every transport mounted (or to be mounted), each once."""
        with self._lock:
            every = [*self._mounts.values(), *(t for _, _, t in self._later)]
        return list({id(t): t for t in every}.values())

    def __iter__(self) -> Iterator[Transport]:
        return iter(self.transports())

    def close(self) -> None:
        """Every transport that holds connections has closed them."""
        for t in self.transports():
            getattr(t, "close", lambda: None)()
