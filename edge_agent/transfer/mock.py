"""MockTransport: storage in memory, by URL, for tests and for people writing plugins.

As httpx ships MockTransport, this ships a Transport that keeps objects in a dict and answers
put/stat/delete/exists/same_bytes/open by the rules every real transport follows (see
Transport.put): it reads the local file once through read_once, honours Expected
(`may_replace`, `known_writer`, FileChanged) and raises DestinationOccupied where a real one
would. Knobs make it misbehave as real storage does:

    mock = MockTransport("root", leaves_partials=True)
    mock.lie(url, RemoteStat(10, "0badf00d"))   # stat answers this, whatever is stored
    mock.fail("put", times=2)                   # the next two puts raise RetryableError
    mock.fail("put", after_bytes=4096)          # a put cut short: a partial object stays
    mock.lose(url)                              # the object vanishes behind the agent's back
    mock.calls                                  # [("put", url), ("stat", url), ...]
    mock.puts                                   # [(url, Expected), ...]: what each put was told
"""

from __future__ import annotations

import contextlib
import io
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal

import blake3

from ..errors import DestinationOccupied, ObjectMissing, RetryableError
from ..hashing import CHUNK, Consumer, Digests
from ..localfs import Source
from .base import Expected, Pacer, RemoteStat, Transport, copy_problem
from .tee import read_once

Operation = Literal["put", "stat", "delete", "exists", "same_bytes", "open"]
Recognise = Literal["blake3", "adler32"]


@dataclass
class _Fault:
    operation: Operation
    times: int | None            # None: every time, until heal()
    error: Exception | None
    after_bytes: int | None      # put only: this many bytes are stored before the error


class MockTransport(Transport):
    """Objects in memory, keyed by URL (`objects`: URL -> bytes; tests may set it directly).

    scheme:          what `scheme` says (a registry mounts it like any transport).
    leaves_partials: a put cut short (fail(..., after_bytes=N)) leaves its first N bytes under
                     the URL, as an HTTP or XRootD upload whose process was killed; otherwise
                     nothing is left (as a posix copy or an S3 PUT).
    recognises:      how a copy already at the URL is recognised as identical: "blake3" (read back
                     and hashed, as posix does: proof whoever wrote it) or "adler32" (size and the
                     stat's adler32, as HTTP/XRootD: only where the ledger knows the writer,
                     Expected.may_replace or known_writer; same_bytes then says False).
    verify_upload:   after a put, stat must answer the size and (unless "size") the adler32 sent,
                     as the HTTP and XRootD transports check: a lying stat fails the put.
    """

    def __init__(self, scheme: str = "mock", *, leaves_partials: bool = False, recognises: Recognise = "blake3",
                 verify_upload: Literal["adler32", "size"] = "adler32", chunk_size: int = CHUNK) -> None:
        self.scheme = scheme
        self.leaves_partials = leaves_partials
        self.recognises = recognises
        self.verify_upload = verify_upload
        self.chunk_size = chunk_size
        self.objects: dict[str, bytes] = {}
        self.calls: list[tuple[Operation, str]] = []
        # each put's URL and Expected, in order: a test tells a copy written while hashing (nothing
        # known yet) from one checked against the recorded digests
        self.puts: list[tuple[str, Expected]] = []
        self._lies: dict[str, RemoteStat | None] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ knobs
    def lie(self, url: str, stat: RemoteStat | None) -> None:
        """From now on stat (and exists) answer `stat` for `url` (None: "nothing there"), whatever
        is stored, even after a put (as XRootD's cached checksum, a put is then checked against the
        lie), until the URL is deleted or lost or `tell_truth(url)`. The bytes are not changed."""
        with self._lock:
            self._lies[url] = stat

    def tell_truth(self, url: str) -> None:
        """Stop lying about `url`."""
        with self._lock:
            self._lies.pop(url, None)

    def fail(self, operation: Operation, times: int | None = 1, error: Exception | None = None,
             after_bytes: int | None = None) -> None:
        """The next `times` calls of `operation` (None: every call until heal()) raise `error`
        (default: a RetryableError). For "put", `after_bytes`: that many bytes are read and stored
        first; what stays then depends on leaves_partials."""
        with self._lock:
            self._faults.append(_Fault(operation, times, error, after_bytes))

    def heal(self) -> None:
        """Forget every fault still to come."""
        with self._lock:
            self._faults.clear()

    def lose(self, url: str) -> None:
        """The object vanishes (a disk lost, someone else deleted it); not recorded as a call."""
        with self._lock:
            self.objects.pop(url, None)
            self._lies.pop(url, None)

    def asked(self, operation: Operation) -> list[str]:
        """The URLs `operation` was called with, in order."""
        return [u for op, u in self.calls if op == operation]

    # ------------------------------------------------------------ the interface
    def put(self, source: Source, url: str, expected: Expected, pace: Pacer,
            also: Sequence[Consumer] = ()) -> Digests:
        """See Transport.put. The object appears whole at the end (or, with leaves_partials, as the
        bytes arrive); a failed put leaves nothing, unless a partial is asked for (see fail)."""
        fault = self._call("put", url)
        with self._lock:
            self.puts.append((url, expected))
        if fault is not None and fault.after_bytes is None:
            raise self._error(fault, url)
        if expected.known and self._identical(url, expected):
            return expected.digests()
        if not expected.may_replace and self._there(url):
            raise DestinationOccupied(f"{url} holds other bytes that this file version did not write; "
                                      "they are never replaced")
        if self.leaves_partials and expected.may_replace and url in self.objects:
            self._remove(url, keep_lie=True)   # as HTTP/XRootD: what is there goes before the upload
        written = bytearray()
        try:
            with read_once(source, expected, pace=pace, also=also, chunk_size=self.chunk_size) as tee:
                for chunk in tee.chunks():
                    if fault is not None and fault.after_bytes is not None \
                            and len(written) + len(chunk) >= fault.after_bytes:
                        written += chunk[:fault.after_bytes - len(written)]
                        raise self._error(fault, url)
                    written += chunk
                    if self.leaves_partials:
                        self._store(url, bytes(written))
                got = tee.digests()
        except BaseException:
            if self.leaves_partials:
                if (fault is not None and fault.after_bytes is not None) or not expected.may_replace:
                    # cut short (the uploader was killed), or, as HTTP/XRootD, kept where the URL is
                    # not this version's (what lies there may be another writer's)
                    self._store(url, bytes(written))
                else:
                    self._remove(url)   # as HTTP/XRootD: a failed upload is removed where it may be
            raise
        self._store(url, bytes(written))
        problem = copy_problem(self._stat(url), got, self.verify_upload, url, "its stat")
        if problem:
            error, discard = problem
            if discard and expected.may_replace:
                self._remove(url)
            raise error
        return got

    def stat(self, url: str, verify: str = "reread") -> RemoteStat | None:
        """Size and adler32 of what is stored (or the lie told for `url`)."""
        self._raise_if_failing("stat", url)
        return self._stat(url)

    def exists(self, url: str) -> bool:
        self._raise_if_failing("exists", url)
        return self._stat(url) is not None

    def same_bytes(self, url: str, d: Digests) -> bool:
        """True if exactly these bytes are stored, by blake3; always False with recognises="adler32"."""
        self._raise_if_failing("same_bytes", url)
        if self.recognises != "blake3":
            return False
        with self._lock:
            data = self.objects.get(url)
        return data is not None and len(data) == d.size and blake3.blake3(data).hexdigest() == d.blake3

    def delete(self, url: str) -> None:
        """Remove; nothing there is success."""
        self._raise_if_failing("delete", url)
        self._remove(url)

    @contextlib.contextmanager
    def open(self, url: str) -> Iterator[BinaryIO]:
        """The stored bytes (a lie told to stat changes nothing here); ObjectMissing if none."""
        self._raise_if_failing("open", url)
        with self._lock:
            data = self.objects.get(url)
        if data is None:
            raise ObjectMissing(f"{url}: nothing there")
        with io.BytesIO(data) as fh:
            yield fh

    # ------------------------------------------------------------ inside
    def _call(self, operation: Operation, url: str) -> _Fault | None:
        with self._lock:
            self.calls.append((operation, url))
            for f in self._faults:
                if f.operation == operation:
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self._faults.remove(f)
                    return f
        return None

    def _raise_if_failing(self, operation: Operation, url: str) -> None:
        fault = self._call(operation, url)
        if fault is not None:
            raise self._error(fault, url)

    @staticmethod
    def _error(fault: _Fault, url: str) -> Exception:
        return fault.error if fault.error is not None else RetryableError(f"{fault.operation} {url}: injected fault")

    def _stat(self, url: str) -> RemoteStat | None:
        with self._lock:
            if url in self._lies:
                return self._lies[url]
            data = self.objects.get(url)
        if data is None:
            return None
        return RemoteStat(len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")

    def _there(self, url: str) -> bool:
        return self._stat(url) is not None

    def _identical(self, url: str, expected: Expected) -> bool:
        if self.recognises == "blake3":
            with self._lock:
                data = self.objects.get(url)
            return data is not None and len(data) == expected.size \
                and blake3.blake3(data).hexdigest() == expected.blake3
        there = self._stat(url)
        return there is not None and self.describes_copy(there, expected.size, expected.adler32,
                                                         by_size=not expected.may_replace) \
            and (expected.may_replace or expected.known_writer)

    def _store(self, url: str, data: bytes) -> None:
        with self._lock:
            self.objects[url] = data

    def _remove(self, url: str, keep_lie: bool = False) -> None:
        with self._lock:
            self.objects.pop(url, None)
            if not keep_lie:
                self._lies.pop(url, None)
