"""Copies to HTTP/WebDAV storage: XRootD, dCache, EOS, StoRM (http://, https://, davs://).

One upload, in order:
  1. HEAD: an identical copy (same size, and an adler32 Digest equal to the recorded one) is
     success without sending anything. Anything else under the name is DELETEd first: XRootD
     caches a checksum per whole-second mtime, so an overwrite within the same second would
     later report the OLD checksum.
  2. PUT with Content-Length (never chunked: XRootD 5.5 fails or leaves 0-byte files), the body
     read from the local file once, each chunk paced, hashed and sent in the same pass. A parent
     collection the server will not create (404/409) is made with MKCOL and the PUT tried once more.
  3. HEAD + `Want-Digest: adler32` (RFC 3230) on a fresh connection (XRootD 5.5 answered
     keep-alive HEADs with the previous file's digest). Only a Digest named adler32 counts; one
     that differs is a mismatch and the copy is deleted.
Per server, by default, one request at a time: XRootD 5.5.3's HTTP side segfaults (NULL
dereference in libXrdUtils, "Dispatch on closed link" in its log) or stops answering when 4
threads upload small files with HEADs and DELETEs in between, with or without keep-alive, and
even when no HEAD/DELETE overlaps a PUT on the client's side; only PUTs alone, or HEADs alone,
were safe side by side. One thread, or this gate, went through 15,000 files without a fault.
`puts_per_server` lets PUTs run side by side (other requests still run alone) and
`isolate_requests=False` lifts the rule, for storages without these faults; both are set per
destination (destinations.NAME.isolate_requests, .puts_per_server). Transports that reach the
same server share its gate (GateBoard).
A failed or abandoned upload is followed by a best-effort DELETE: XRootD keeps a partial file
that HEAD answers 200 for, so a replica is never counted by its existence.

Tokens and Authorization headers are never logged nor put into error messages, and URLs in
messages lose their query string (pre-signed URLs carry credentials there).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog

from ..errors import DestinationOccupied, FileChanged, ObjectMissing, PermanentError, RetryableError
from ..hashing import CHUNK, Consumer, Digests
from ..localfs import Source
from ..urls import shown_url
from .base import ChunkStream, Expected, Pacer, RemoteStat, Transport, copy_problem
from .tee import Tee, read_once

log = structlog.get_logger("edge_agent.transfer.http")

SCHEMES = ("http", "https", "davs")
VerifyUpload = Literal["adler32", "size"]
TokenProvider = Callable[[], "str | None"]
_OK = (200, 201, 204)


# ------------------------------------------------------------------ pure helpers
def wire_url(url: str) -> str:
    """davs:// is https:// on the wire (WebDAV over TLS, as Rucio and gfal name it)."""
    if url.startswith("davs://"):
        return "https://" + url[len("davs://"):]
    return url


def parse_digests(header: str | None) -> dict[str, str]:
    """`Digest: adler32=0a1b2c3d, md5=HUXZ...==` -> {"adler32": "0a1b2c3d", "md5": "HUXZ...=="}.

    Names are lower-cased (RFC 3230 says they are case-insensitive); values are kept as sent.
    """
    out: dict[str, str] = {}
    for part in (header or "").split(","):
        name, sep, value = part.strip().partition("=")
        if sep and name.strip() and value.strip():
            out.setdefault(name.strip().lower(), value.strip())
    return out


def adler32_of_digest(header: str | None) -> str | None:
    """The adler32 named in a Digest header, as 8 lower-case hex digits; None if none is named.

    The NAME matters: XRootD answers adler32 for an algorithm it was not configured for, and a
    server may answer another algorithm than the one asked for. A value that is not hex is
    returned as is, so that it compares unequal rather than being mistaken for "no answer".
    """
    value = parse_digests(header).get("adler32")
    if value is None:
        return None
    v = value.lower()
    try:
        int(v, 16)
    except ValueError:
        return v
    return v.rjust(8, "0") if len(v) <= 8 else v


def md5_of_digest(header: str | None) -> str | None:
    """The md5 named in a Digest header as hex (RFC 3230 sends it base64; some servers hex)."""
    value = parse_digests(header).get("md5")
    if value is None:
        return None
    if len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return value


def status_error(status: int, what: str, reason: str = "") -> Exception:
    """The taxonomy for an HTTP status that is not success."""
    detail = f"{what}: HTTP {status}" + (f" {reason}" if reason else "")
    if status in (401, 403):
        return PermanentError(f"storage refused {detail} (check the credentials and the storage's "
                              "authorisation for this path)")
    if status in (408, 429, 507) or status >= 500:
        return RetryableError(detail)
    return PermanentError(detail)


def digests_or_discard(tee: Tee, discard: Callable[[], None]) -> Digests:
    """The digests of what `tee` sent. A source that changed while it was read (FileChanged) has
    the copy just uploaded discarded before the error goes on: it holds bytes nobody recorded."""
    try:
        return tee.digests()
    except FileChanged:
        discard()
        raise


def ssl_context(verify: bool | str | ssl.SSLContext = True, cert: str | None = None,
                key: str | None = None) -> ssl.SSLContext:
    """A client TLS context: `verify` is on/off, a CA file or directory (e.g. /etc/grid-security/
    certificates), or a ready context; `cert` (+ `key`, or a proxy that holds both) is presented
    to the storage."""
    if isinstance(verify, ssl.SSLContext):
        ctx = verify
    elif verify is True:
        ctx = ssl.create_default_context()
    elif verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif os.path.isdir(verify):
        ctx = ssl.create_default_context(capath=verify)
    else:
        ctx = ssl.create_default_context(cafile=verify)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


class _Gate:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.uploads = 0
        self.verifying = False
        self.waiting = 0


class GateBoard:
    """The gate of each server (host:port), shared by every transport that reaches it: two
    destinations on one XRootD server (two RSEs under one daemon), or a destination's transport
    and the fallback one, then keep to the rules together instead of each keeping them alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: dict[str, _Gate] = {}

    def gate(self, host: str) -> _Gate:
        with self._lock:
            return self._gates.setdefault(host, _Gate())

    def wait(self, gate: _Gate) -> None:
        """Block until the gate changes (called holding gate.cond); the one place a holder waits."""
        gate.cond.wait()


class HostGates:
    """Per server (host:port): shared holders (uploads) side by side, or one exclusive holder alone.

    An exclusive holder waits for the shared ones in flight to end, and shared ones that arrive
    meanwhile wait for it (so a steady stream of uploads cannot starve verification). At most
    max_shared shared holders at once (0: any number), counting those of every HostGates on the
    same `board`. With isolate=False nothing waits (nor is counted).
    """

    def __init__(self, isolate: bool = True, max_shared: int = 0, board: GateBoard | None = None) -> None:
        self.isolate = isolate
        self.max_shared = max_shared   # 0: no limit
        self.board = board if board is not None else GateBoard()

    @contextlib.contextmanager
    def shared(self, host: str) -> Iterator[None]:
        if not self.isolate:
            yield
            return
        g = self.board.gate(host)
        with g.cond:
            while g.verifying or g.waiting or (self.max_shared and g.uploads >= self.max_shared):
                self.board.wait(g)
            g.uploads += 1
        try:
            yield
        finally:
            with g.cond:
                g.uploads -= 1
                g.cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, host: str) -> Iterator[None]:
        if not self.isolate:
            yield
            return
        g = self.board.gate(host)
        with g.cond:
            g.waiting += 1
            try:
                while g.verifying or g.uploads:
                    self.board.wait(g)
            finally:
                g.waiting -= 1
            g.verifying = True
        try:
            yield
        finally:
            with g.cond:
                g.verifying = False
                g.cond.notify_all()


# ------------------------------------------------------------------ the transport
class HttpTransport(Transport):
    """Uploads over HTTP(S)/WebDAV with one shared, thread-safe connection pool.

    verify:   TLS verification: True, False, a CA file or directory, or an ssl.SSLContext.
    cert/key: client certificate and key, or an X.509 proxy file holding both (key=None).
    token:    called before each request; a non-empty answer is sent as `Authorization: Bearer`.
    timeout:  seconds for connect, each read and each write; digest_timeout is the read timeout
              of a HEAD that asks for a checksum (the server may read the whole file first).
    verify_upload: "adler32" (the storage must answer Want-Digest) or "size" (size is enough
              when the storage has no checksum to give).
    isolate_requests: per server, run HEAD/DELETE/MKCOL alone, never beside a PUT or each other,
              and at most puts_per_server PUTs at once (0: any number). The defaults, one request
              at a time per server, are what XRootD 5.5 survives; see the module's docstring.
              Off, verification HEADs also reuse kept-alive connections (XRootD defect 4 is why
              they otherwise go out on a fresh one).
    gate_board: the servers' gates, shared with other transports that reach the same servers.
    transport: an httpx transport (httpx.MockTransport in tests); then used for every request.
    client:   an httpx client to send every request through instead of the two made here (its TLS,
              auth, redirects and timeouts then apply, and it is not closed here): the access API
              reads with the client it was given. Verification HEADs then share its connections.
    """

    scheme = "https"
    leaves_partials = True
    schemes = SCHEMES

    def __init__(self, *, verify: bool | str | ssl.SSLContext = True, cert: str | None = None,
                 key: str | None = None, token: TokenProvider | None = None, timeout: float = 60.0,
                 digest_timeout: float = 600.0, verify_upload: VerifyUpload = "adler32",
                 chunk_size: int = CHUNK, max_connections: int = 8, isolate_requests: bool = True,
                 puts_per_server: int = 1, gate_board: GateBoard | None = None,
                 transport: httpx.BaseTransport | None = None, client: httpx.Client | None = None) -> None:
        if verify_upload not in ("adler32", "size"):
            raise ValueError(f"verify_upload must be 'adler32' or 'size', not {verify_upload!r}")
        self.verify_upload = verify_upload
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.digest_timeout = digest_timeout
        self._token = token
        self._gates = HostGates(isolate_requests, puts_per_server, gate_board)
        self._owns_clients = client is None
        # verification HEADs on a connection of their own only where XRootD's defects are feared
        self._fresh_verify = isolate_requests
        if client is not None:
            self._pool = self._fresh = client
            return
        tls = ssl_context(verify, cert, key)
        common = {"timeout": httpx.Timeout(timeout), "follow_redirects": False, "trust_env": False}
        # Uploads, deletes and plain HEADs share a pool; verification HEADs go out on a client
        # that keeps no connection alive, so each one is a fresh connection (XRootD defect 4).
        # Idle keep-alive connections beside the one in use were enough to break XRootD 5.5.3 when
        # requests are one at a time: keep no more alive than may be busy.
        keep = puts_per_server if isolate_requests and puts_per_server else max_connections
        self._pool = httpx.Client(verify=tls, transport=transport,
                                  limits=httpx.Limits(max_connections=max_connections,
                                                      max_keepalive_connections=keep),
                                  **common)  # type: ignore[arg-type]
        self._fresh = self._pool
        if self._fresh_verify:
            self._fresh = httpx.Client(verify=tls, transport=transport,
                                       limits=httpx.Limits(max_connections=max_connections,
                                                           max_keepalive_connections=0),
                                       **common)  # type: ignore[arg-type]

    def close(self) -> None:
        """The HTTP clients this transport made are closed (clients handed to it are left open)."""
        if self._owns_clients:
            self._pool.close()
            if self._fresh is not self._pool:
                self._fresh.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the interface
    def put(self, source: Source, url: str, expected: Expected, pace: Pacer,
            also: Sequence[Consumer] = ()) -> Digests:
        wire, shown = wire_url(url), shown_url(url)
        if not (expected.found_empty and expected.may_replace) and self._already_there(wire, shown, expected):
            return expected.digests()
        got = self._upload(source, wire, shown, expected, pace, also)
        self._check_copy(wire, shown, got, keep=not expected.may_replace)
        return got

    def stat(self, url: str, verify: str = "reread") -> RemoteStat | None:
        # The storage computes (or has cached) the checksum; "reread" and "recorded" are the same here.
        return self._digest_head(wire_url(url), shown_url(url))

    def delete(self, url: str) -> None:
        self._delete(wire_url(url), shown_url(url))

    def exists(self, url: str) -> bool:
        # a plain HEAD: the server computes no checksum for it
        wire, shown = wire_url(url), shown_url(url)
        r = self._request("HEAD", wire, shown, "HEAD", client=self._pool)
        if r.status_code == 404:
            return False
        if r.status_code not in _OK:
            raise status_error(r.status_code, f"HEAD {shown}", r.reason_phrase)
        return True

    @contextlib.contextmanager
    def open(self, url: str) -> Iterator[BinaryIO]:
        """What `url` holds, streamed by a GET (redirects followed). With isolate_requests the GET
        holds the server alone until the stream is closed, as every request but a PUT does."""
        wire, shown = wire_url(url), shown_url(url)
        with self._gates.exclusive(urlsplit(wire).netloc), self._get(lambda: wire, shown) as r, \
                ChunkStream(body_chunks(r, shown, self.chunk_size)) as stream:
            yield stream  # type: ignore[misc]

    # ------------------------------------------------------------ steps
    @contextlib.contextmanager
    def _get(self, url: Callable[[], str], shown: str, again_on_403: bool = False) -> Iterator[httpx.Response]:
        """A streamed GET answered 200; ObjectMissing for 404, the taxonomy for any other answer.
        `url` gives the URL to ask (a signed one is made afresh); `again_on_403`: a 403 is asked
        once more with a new URL (a signature may expire between signing and sending)."""
        try:
            with contextlib.ExitStack() as stack:
                for attempt in (1, 2):
                    r = stack.enter_context(self._pool.stream("GET", url(), headers=self._auth({}),
                                                              follow_redirects=True))
                    if r.status_code != 403 or not again_on_403 or attempt == 2:
                        break
                    r.close()
                    log.info("signed URL refused (expired?), signing again", url=shown)
                if r.status_code == 404:
                    raise ObjectMissing(f"GET {shown}: HTTP 404 (nothing there)")
                if r.status_code != 200:
                    raise status_error(r.status_code, f"GET {shown}", r.reason_phrase)
                yield r
        except httpx.HTTPError as exc:
            # an exception's text may quote a signed URL: its query (the credential) is left out
            raise RetryableError(f"GET {shown}: {type(exc).__name__}: {_no_query(str(exc))}") from None
        except ssl.SSLError as exc:
            raise RetryableError(f"GET {shown}: TLS: {exc}") from None

    def _already_there(self, wire: str, shown: str, expected: Expected) -> bool:
        """True if an identical copy is there; anything else under the name is deleted."""
        r = self._request("HEAD", wire, shown, "HEAD", client=self._pool)
        if r.status_code == 404:
            return False
        if r.status_code not in _OK:
            raise status_error(r.status_code, f"HEAD {shown}", r.reason_phrase)
        if expected.known and _content_length(r) == expected.size:
            # the size matches: ask for the checksum, on a fresh connection
            remote = self._digest_head(wire, shown)
            if remote is None:
                return False
            if self.describes_copy(remote, expected.size, expected.adler32, by_size=not expected.may_replace) \
                    and (expected.may_replace or expected.known_writer):
                # size + adler32 recognise a copy only where the ledger knows who wrote it
                log.debug("identical copy already there", url=shown)
                return True
        if not expected.may_replace:
            raise DestinationOccupied(f"{shown} holds other bytes that this file version did not write; "
                                      "they are never replaced")
        log.info("replacing what is there before uploading", url=shown, size=_content_length(r))
        self._delete(wire, shown)
        return False

    def _upload(self, source: Source, wire: str, shown: str, expected: Expected, pace: Pacer,
                also: Sequence[Consumer] = ()) -> Digests:
        def discard() -> None:
            self._discard(wire, shown, keep=not expected.may_replace)
        made_parents = redirected = False
        target = wire
        while True:
            try:
                # a resent body (parents made, redirect) is read again: `also` is reset for each pass
                r, h = self._put_once(source, target, shown, expected, pace, also=also)
            except BaseException:
                discard()
                raise
            if r.status_code in (404, 409) and not made_parents:
                # a WebDAV server that does not create parents (XRootD does; nginx, some dCache don't)
                made_parents = True
                if self._make_parents(wire, shown):
                    continue
            if r.status_code in (301, 302, 303, 307, 308) and "Location" in r.headers and not redirected:
                # dCache and EOS doors send the PUT on to a data server. Without Expect: 100-continue
                # (httpx has none) the body went to the door already: it is read and sent once more.
                redirected = True
                target = str(r.url.join(r.headers["Location"]))
                log.debug("PUT redirected", url=shown, to=shown_url(target))
                continue
            if r.status_code not in _OK:
                discard()
                raise status_error(r.status_code, f"PUT {shown}", r.reason_phrase)
            break
        return digests_or_discard(h, discard)

    def _put_once(self, source: Source, wire: str, shown: str, expected: Expected, pace: Pacer,
                  md5: bool | None = None, also: Sequence[Consumer] = ()) -> tuple[httpx.Response, Tee]:
        # md5: also hash md5 in the pass (default: when one was recorded). Fresh chunks: h11 (and
        # httpx.MockTransport, which joins them) keep a chunk after asking for the next one.
        with read_once(source, expected, md5=md5, pace=pace, also=also, chunk_size=self.chunk_size,
                       fresh=True) as tee:
            # Content-Length set explicitly: httpx then never falls back to chunked encoding
            r = self._request("PUT", wire, shown, "PUT", client=self._pool, content=tee.chunks(),
                              headers={"Content-Length": str(expected.size)})
        return r, tee

    def _check_copy(self, wire: str, shown: str, got: Digests, keep: bool = False) -> None:
        """Ask the storage what it now holds; anything but the bytes sent is never success."""
        try:
            remote = self._digest_head(wire, shown)
        except BaseException:
            # an unverified copy must not stay behind to be mistaken for a good one
            self._discard(wire, shown, keep)
            raise
        problem = copy_problem(remote, got, self.verify_upload, shown,
                               "Want-Digest: adler32 (no adler32 Digest on HEAD)")
        if problem:
            error, discard = problem
            if discard:
                self._discard(wire, shown, keep)
            raise error

    def _digest_head(self, wire: str, shown: str) -> RemoteStat | None:
        headers = {"Want-Digest": "adler32"}
        if self._fresh_verify:
            headers["Connection"] = "close"
        r = self._request("HEAD", wire, shown, "HEAD", client=self._fresh, headers=headers,
                          timeout=httpx.Timeout(self.timeout, read=self.digest_timeout))
        if r.status_code == 404:
            return None
        if r.status_code not in _OK:
            raise status_error(r.status_code, f"HEAD {shown}", r.reason_phrase)
        size = _content_length(r)
        if size is None:
            raise RetryableError(f"HEAD {shown} answered without Content-Length")
        return RemoteStat(size, adler32_of_digest(r.headers.get("Digest")))

    def _make_parents(self, wire: str, shown: str) -> bool:
        """MKCOL the parent collections of wire, the missing ones only; True if they exist now."""
        p = urlsplit(wire)
        parts = [x for x in p.path.split("/") if x][:-1]
        # walk up until a MKCOL succeeds or finds the collection there, then come back down
        depth = len(parts)
        while depth > 0:
            status = self._mkcol(p.scheme, p.netloc, parts[:depth], shown)
            if status in (200, 201, 204, 405):   # 405: it exists already
                break
            if status not in (404, 409):         # anything else: give up, let the PUT's answer stand
                return False
            depth -= 1
        if depth == 0:
            return False
        for d in range(depth + 1, len(parts) + 1):
            status = self._mkcol(p.scheme, p.netloc, parts[:d], shown)
            if status not in (200, 201, 204, 405):
                return False
        log.info("created parent collections", url=shown)
        return True

    def _mkcol(self, scheme: str, netloc: str, parts: list[str], shown: str) -> int:
        url = urlunsplit((scheme, netloc, "/" + "/".join(parts) + "/", "", ""))
        r = self._request("MKCOL", url, shown, "MKCOL", client=self._pool)
        if r.status_code in (401, 403):
            raise status_error(r.status_code, f"MKCOL {shown_url(url)}", r.reason_phrase)
        return r.status_code

    def _delete(self, wire: str, shown: str) -> None:
        r = self._request("DELETE", wire, shown, "DELETE", client=self._pool)
        if r.status_code in _OK or r.status_code in (202, 404):
            return
        raise status_error(r.status_code, f"DELETE {shown}", r.reason_phrase)

    def _discard(self, wire: str, shown: str, keep: bool = False) -> None:
        """Best-effort removal of a partial or unverified copy; the caller's error is what matters.

        `keep`: the URL was not this version's to replace (found empty, but another writer may have
        put its object there since): whatever lies there now is left alone. A partial copy never
        counts (confirmation wants the size and adler32), and a later attempt decides by content."""
        if keep:
            log.warning("a failed upload's URL is left as it is: what lies there may be another writer's",
                        url=shown)
            return
        try:
            self._delete(wire, shown)
        except Exception as exc:  # noqa: BLE001 - best effort: the next attempt deletes it first anyway
            log.warning("could not remove a partial or bad copy", url=shown, error=str(exc))

    def _auth(self, headers: dict[str, str]) -> dict[str, str]:
        """`headers` and the bearer token, if there is one (never logged)."""
        hdrs = dict(headers)
        if self._token is not None:
            try:
                tok = self._token()
            except OSError as exc:
                raise RetryableError(f"cannot read the bearer token: {exc.strerror or exc}") from None
            if tok:
                hdrs["Authorization"] = f"Bearer {tok}"
        return hdrs

    def _request(self, method: str, url: str, shown: str, what: str, client: httpx.Client,
                 headers: dict[str, str] | None = None, **kw: object) -> httpx.Response:
        hdrs = self._auth(headers or {})
        gate = self._gates.shared if method == "PUT" else self._gates.exclusive
        try:
            with gate(urlsplit(url).netloc):
                r = client.request(method, url, headers=hdrs, **kw)  # type: ignore[arg-type]
            r.close()
            return r
        except httpx.TimeoutException as exc:
            raise RetryableError(f"{what} {shown}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise RetryableError(f"{what} {shown}: {type(exc).__name__}: {exc}") from None
        except ssl.SSLError as exc:
            raise RetryableError(f"{what} {shown}: TLS: {exc}") from None


def body_chunks(r: httpx.Response, shown: str, chunk_size: int) -> Iterator[bytes]:
    try:   # a connection lost mid-object is the taxonomy's retryable, wherever it is read
        yield from r.iter_bytes(chunk_size)
    except httpx.HTTPError as exc:
        raise RetryableError(f"GET {shown}: {type(exc).__name__}") from None


def _no_query(text: str) -> str:
    return re.sub(r"[?]\S*", "", text)


def _content_length(r: httpx.Response) -> int | None:
    try:
        return int(r.headers["Content-Length"])
    except (KeyError, ValueError):
        return None
