"""Copies to an S3 RSE (Ceph RGW, AWS, MinIO...) through URLs that Rucio signs (RSE attribute sign_url=s3).

The agent holds no S3 keys: per operation it asks Rucio for a pre-signed URL (read, write or
delete; Rucio signs whole-object operations only, and the signature covers the method).

One upload, in order:
  1. Signed read of the first byte (`Range: bytes=0-0`; a HEAD would need its own signature):
     Content-Range gives the size, ETag the MD5. An identical object is success, nothing sent.
  2. One signed PUT with Content-Length (never chunked, never multipart: a multipart ETag is no
     MD5), read once from the local file, each chunk paced and hashed (md5 included) in the same
     pass. S3 holds at most 5 GiB in one PUT, so a larger file is refused, never split.
     A 403 may be a URL that expired before the request (a long wait for the bandwidth window,
     a stall): one fresh URL is asked for and the PUT is made once more. (A gateway that answers
     403 and closes while a large body is still being sent shows as a connection error instead:
     retried by the pipeline, and every attempt signs afresh.)
  3. Signed read again: the copy counts only if its size is the size sent and its ETag is the
     MD5 computed in step 2. S3 knows no adler32; the adler32 registered in Rucio is the agent's.
A failed, partial or unverified upload is removed with a signed DELETE (best effort), so no
object that does not match stays under a name Rucio may come to believe in.

Signed URLs carry a credential in their query string: messages show URLs without it.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Literal

import httpx
import structlog

from ..errors import ChecksumMismatch, DestinationOccupied, PermanentError, RetryableError
from ..hashing import CHUNK, Consumer, Digests
from ..localfs import Source
from ..urls import shown_url, unsigned_url
from .base import ChunkStream, Expected, Pacer, RemoteStat
from .http import HttpTransport, body_chunks, digests_or_discard, status_error

log = structlog.get_logger("edge_agent.transfer.s3")

Operation = Literal["read", "write", "delete"]
# (operation, unsigned https PFN) -> signed URL; raises RetryableError/PermanentError
Signer = Callable[[Operation, str], str]

MAX_SINGLE_PUT = 5 << 30   # S3's limit for one PUT (5 GiB); Rucio cannot sign multipart uploads
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:\d+-\d+|\*)/(\d+)$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def etag_md5(etag: str | None) -> str | None:
    """The MD5 an ETag stands for, or None: a multipart (`...-3`) or otherwise opaque ETag is no MD5."""
    if not etag:
        return None
    v = etag.strip()
    if v.startswith("W/"):
        return None            # weak ETags promise nothing about the bytes
    v = v.strip('"').lower()
    return v if _MD5.match(v) else None


def object_size(r: httpx.Response) -> int | None:
    """Size of the whole object from a ranged answer (Content-Range) or a full one (Content-Length)."""
    if r.status_code == 206 or r.status_code == 416:
        m = _CONTENT_RANGE.match(r.headers.get("Content-Range", "").strip())
        return int(m.group(1)) if m else None
    try:
        return int(r.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _no_query(text: str) -> str:
    return re.sub(r"[?]\S*", "", text)


class S3Transport(HttpTransport):
    """Uploads to one S3 RSE; `sign` turns (operation, PFN) into a signed URL (Rucio's signurl).

    verify:  TLS verification of the gateway: True (system CAs), a CA file or directory, or a
             context (the settings offer no way to turn it off: destinations.*.ca_cert only).
    max_object_bytes: the largest file one PUT may carry (S3: 5 GiB).
    """

    leaves_partials = False   # a PUT is atomic: nothing partial is ever under the name

    def __init__(self, sign: Signer, *, verify: bool | str | ssl.SSLContext = True, timeout: float = 60.0,
                 chunk_size: int = CHUNK, max_connections: int = 8, max_object_bytes: int = MAX_SINGLE_PUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        # No bearer token (the signature is the authorisation; an extra Authorization header
        # makes S3 refuse the request) and no per-server gates (those are for XRootD's defects).
        super().__init__(verify=verify, timeout=timeout, chunk_size=chunk_size, max_connections=max_connections,
                         isolate_requests=False, verify_upload="size", transport=transport)
        self._sign = sign
        self.max_object_bytes = max_object_bytes

    # ------------------------------------------------------------ the interface
    def put(self, source: Source, url: str, expected: Expected, pace: Pacer,
            also: Sequence[Consumer] = ()) -> Digests:
        url = unsigned_url(url)
        shown = shown_url(url)
        if expected.size > self.max_object_bytes:
            raise PermanentError(
                f"{source} has {expected.size} bytes, more than one signed S3 PUT may carry "
                f"({self.max_object_bytes} bytes): Rucio signs whole-object operations only, so the file "
                f"cannot go to {shown}. Send such files through a rule without S3 destinations")
        there = None if expected.found_empty and expected.may_replace else self._read_stat(url, shown)
        if there is not None and expected.known and expected.md5 and there.size == expected.size \
                and there.md5 == expected.md5:
            log.debug("identical object already there", url=shown)
            return expected.digests()
        if there is not None and not expected.may_replace:
            raise DestinationOccupied(f"{shown} holds another object that this file version did not write; "
                                      "it is never replaced")
        got = self._upload_signed(source, url, shown, expected, pace, also)
        self._check_object(url, shown, got, keep=not expected.may_replace)
        return got

    def stat(self, url: str, verify: str = "reread") -> RemoteStat | None:
        """Size and ETag-MD5 of the object (adler32 None: S3 has none)."""
        url = unsigned_url(url)
        return self._read_stat(url, shown_url(url))

    def same_bytes(self, url: str, d: Digests) -> bool:
        there = self.stat(url)
        return there is not None and d.md5 is not None and there.size == d.size and there.md5 == d.md5

    def exists(self, url: str) -> bool:
        # through a signed read of the first byte, as every S3 request here (a plain HEAD is unsigned)
        return self.stat(url) is not None

    def delete(self, url: str) -> None:
        url = unsigned_url(url)
        shown = shown_url(url)
        r = self._signed("delete", url, shown, "DELETE")
        if r.status_code in (200, 202, 204, 404):
            return
        raise status_error(r.status_code, f"DELETE {shown}", r.reason_phrase)

    @contextlib.contextmanager
    def open(self, url: str) -> Iterator[BinaryIO]:
        """The object streamed by a signed GET (signed afresh once if refused with 403)."""
        url = unsigned_url(url)
        shown = shown_url(url)
        with self._get(lambda: self._sign("read", url), shown, again_on_403=True) as r, \
                ChunkStream(body_chunks(r, shown, self.chunk_size)) as stream:
            yield stream  # type: ignore[misc]

    # ------------------------------------------------------------ steps
    def _signed(self, op: Operation, url: str, shown: str, method: str,
                headers: dict[str, str] | None = None) -> httpx.Response:
        """One request on a freshly signed URL; on 403 once more with a new signature (the first
        may have expired between signing and sending). A second 403 is the storage's answer."""
        for attempt in (1, 2):
            signed = self._sign(op, url)
            if method == "GET":
                r = self._get_headers(signed, shown, headers or {})
            else:
                r = self._request(method, signed, shown, method, client=self._pool, headers=headers)
            if r.status_code != 403 or attempt == 2:
                return r
            log.info("signed URL refused (expired?), signing again", op=op, url=shown)
        raise AssertionError("unreachable")

    def _get_headers(self, signed: str, shown: str, headers: dict[str, str]) -> httpx.Response:
        """A GET whose body is not read: a server that ignores Range must not stream the object here."""
        try:
            with self._pool.stream("GET", signed, headers=headers) as r:
                pass
            return r
        except httpx.TimeoutException as exc:
            raise RetryableError(f"GET {shown}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            # an exception's text may quote the signed URL: keep its query (the credential) out
            raise RetryableError(f"GET {shown}: {type(exc).__name__}: {_no_query(str(exc))}") from None
        except ssl.SSLError as exc:
            raise RetryableError(f"GET {shown}: TLS: {exc}") from None

    def _read_stat(self, url: str, shown: str) -> RemoteStat | None:
        r = self._signed("read", url, shown, "GET", headers={"Range": "bytes=0-0"})
        if r.status_code == 404:
            return None
        if r.status_code == 416:
            # an empty object has no first byte; Content-Range says */0 (or nothing: ask for it whole)
            size = object_size(r)
            if size is None:
                r = self._signed("read", url, shown, "GET")
        if r.status_code not in (200, 206, 416):
            raise status_error(r.status_code, f"GET {shown}", r.reason_phrase)
        size = object_size(r)
        if size is None:
            raise RetryableError(f"GET {shown} answered without the object's size")
        return RemoteStat(size, None, etag_md5(r.headers.get("ETag")))

    def _upload_signed(self, source: Source, url: str, shown: str, expected: Expected, pace: Pacer,
                       also: Sequence[Consumer] = ()) -> Digests:
        def discard() -> None:
            self._discard_signed(url, shown, keep=not expected.may_replace)
        for attempt in (1, 2):
            signed = self._sign("write", url)
            try:
                r, h = self._put_once(source, signed, shown, expected, pace, md5=True, also=also)
            except BaseException:
                discard()
                raise
            if r.status_code == 403 and attempt == 1:
                log.info("signed PUT refused (expired?), signing again", url=shown)
                continue
            if r.status_code not in (200, 201, 204):
                discard()
                raise status_error(r.status_code, f"PUT {shown}", r.reason_phrase)
            break
        return digests_or_discard(h, discard)

    def _check_object(self, url: str, shown: str, got: Digests, keep: bool = False) -> None:
        try:
            remote = self._read_stat(url, shown)
        except BaseException:
            self._discard_signed(url, shown, keep)
            raise
        if remote is None:
            raise RetryableError(f"{shown} is not there right after a successful upload")
        problem = None
        if remote.size != got.size:
            problem = f"{shown} holds {remote.size} bytes, {got.size} were sent"
        elif remote.md5 != got.md5:
            problem = f"{shown}: ETag {remote.md5 or '(not an MD5)'} is not the MD5 {got.md5} of the bytes sent"
        if problem:
            self._discard_signed(url, shown, keep)
            raise ChecksumMismatch(problem)

    def _discard_signed(self, url: str, shown: str, keep: bool = False) -> None:
        """Best-effort removal of a failed or unverified object; the caller's error is what matters.
        `keep`: the URL was not this version's to replace; what lies there may be another writer's."""
        if keep:
            log.warning("a failed upload's URL is left as it is: what lies there may be another writer's",
                        url=shown)
            return
        try:
            self.delete(url)
        except Exception as exc:  # noqa: BLE001 - best effort: the next attempt overwrites it anyway
            log.warning("could not remove a failed or bad object", url=shown, error=str(exc))


def etag_problem(st: RemoteStat, md5: str | None) -> str | None:
    """Why an S3 object does not vouch for a file whose md5 is `md5` (None: it does). S3 has no
    adler32: a copy counts when its ETag (a single PUT's is the MD5 of the bytes) is the file's MD5."""
    if not md5:
        return "no MD5 recorded for this file, so its S3 ETag cannot be checked (md5 = true)"
    if st.md5 != md5.lower():
        return f"S3 ETag {st.md5 or '(not an MD5)'} != local md5 {md5}"
    return None
