"""A small HTTP/1.1 fault proxy for tests: 127.0.0.1 in front of one upstream (XRootD's HTTP port,
or Rucio), with faults a test switches on and off while the agent runs.

    with running("http://127.0.0.1:28080") as proxy:
        with proxy.reset(after_bytes=64_000, match=on("PUT"), times=1):
            ...                       # the first PUT is cut 64 kB into its body
        proxy.hits("reset")           # how often it happened

Faults (each applies to requests its `match` accepts, at most `times` times, or until removed):
  reset     forward the head and `after_bytes` of the body, then reset both connections (TCP RST):
            a connection lost mid-upload (the storage keeps what it got, as XRootD does); with
            after_bytes=0 nothing is forwarded (a server that is not there)
  answer    answer `status` (with headers/body) without forwarding; the body is read and dropped
  stall     read the request, say nothing for `seconds`, then close; forward=True sends it upstream
            first (the upload lands, the answer never comes)
  truncate  forward, then send the answer's head and only `keep_bytes` of its body, and close
  digest    forward, and answer a wrong `Digest: adler32=` (every bit flipped): a lying storage
  delay     wait `seconds`, then forward (a slow server)
The first matching fault wins. Each request goes upstream on a connection of its own (the client's
connection to the proxy is kept alive as the upstream says): gunicorn's sync workers close after each
answer anyway, and a fault that kills a connection must not leave a half-used upstream one behind.
Bodies are streamed (Content-Length or chunked), never held whole: the agent PUTs large files.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, Self
from urllib.parse import urlsplit

Kind = Literal["reset", "answer", "stall", "truncate", "digest", "delay"]
CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]      # names lower-cased


Match = Callable[[Request], bool]


def on(method: str | None = None, path: str | None = None, header: str | None = None) -> Match:
    """A predicate: the method is `method`, the path contains `path`, the request has `header`."""
    def match(r: Request) -> bool:
        return ((method is None or r.method == method) and (path is None or path in r.path)
                and (header is None or header.lower() in r.headers))
    return match


def anything(r: Request) -> bool:
    return True


@dataclass(eq=False)
class Fault:
    kind: Kind
    match: Match = anything
    times: int | None = None       # None: until removed
    after_bytes: int = 0
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    forward: bool = False
    keep_bytes: int = 1
    hits: int = 0
    proxy: FaultProxy | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proxy is not None:
            self.proxy.remove(self)


@dataclass
class Head:
    first: bytes                  # request or status line, without CRLF
    fields: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.fields if k.lower() == name), None)

    def set(self, name: str, value: str) -> None:
        self.fields = [(k, value if k.lower() == name.lower() else v) for k, v in self.fields]

    def encode(self) -> bytes:
        return self.first + b"\r\n" + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in self.fields) + b"\r\n"


class FaultProxy:
    """The proxy: a listening socket and a thread per client connection. Use running() to get one."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        assert u.scheme == "http" and u.hostname, f"plain http upstream only, not {upstream!r}"
        self.upstream = (u.hostname, u.port or 80)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._hits: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []    # (method, path, what happened: a status or a fault)
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ the test's controls
    def add(self, fault: Fault) -> Fault:
        fault.proxy = self
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        """No faults any more, and nothing counted or logged yet (a fresh start for the next test)."""
        with self._lock:
            self._faults.clear()
            self._hits.clear()
            self.log.clear()

    def reset(self, after_bytes: int = 0, match: Match = anything, times: int | None = None) -> Fault:
        return self.add(Fault("reset", match, times, after_bytes=after_bytes))

    def answer(self, status: int, match: Match = anything, times: int | None = None,
               headers: dict[str, str] | None = None, body: bytes = b"") -> Fault:
        return self.add(Fault("answer", match, times, status=status, headers=dict(headers or {}), body=body))

    def stall(self, seconds: float, match: Match = anything, times: int | None = None,
              forward: bool = False) -> Fault:
        return self.add(Fault("stall", match, times, seconds=seconds, forward=forward))

    def truncate(self, keep_bytes: int = 1, match: Match = anything, times: int | None = None) -> Fault:
        return self.add(Fault("truncate", match, times, keep_bytes=keep_bytes))

    def wrong_digest(self, match: Match = anything, times: int | None = None) -> Fault:
        return self.add(Fault("digest", match, times))

    def delay(self, seconds: float, match: Match = anything, times: int | None = None) -> Fault:
        return self.add(Fault("delay", match, times, seconds=seconds))

    def hits(self, kind: str | None = None) -> int:
        """How many requests a fault of this kind was applied to (all kinds: None)."""
        with self._lock:
            return self._hits[kind] if kind else sum(self._hits.values())

    def seen(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str, str]]:
        with self._lock:
            return [x for x in self.log if (method is None or x[0] == method) and (path is None or path in x[1])]

    # ------------------------------------------------------------ life
    def start(self) -> FaultProxy:
        t = threading.Thread(target=self._accept, name=f"fault-proxy-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(10)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.add(s)
        return s

    def _close(self, s: socket.socket | None, rst: bool = False) -> None:
        if s is None:
            return
        with self._lock:
            self._socks.discard(s)
        with contextlib.suppress(OSError):
            if rst:   # SO_LINGER 0: close() sends RST, as a crashed peer or a middlebox would
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    def _pick(self, req: Request) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if (f.times is None or f.hits < f.times) and f.match(req):
                    f.hits += 1
                    self._hits[f.kind] += 1
                    return f
        return None

    def _note(self, req: Request, what: str) -> None:
        with self._lock:
            self.log.append((req.method, req.path, what))

    # ------------------------------------------------------------ one client connection
    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        cin = client.makefile("rb")
        try:
            while not self._stop.is_set():
                head = read_head(cin)
                if head is None:
                    return
                parts = head.first.decode("latin-1").split(" ")
                req = Request(parts[0], parts[1] if len(parts) > 1 else "",
                              {k.lower(): v for k, v in head.fields})
                if not self._exchange(client, cin, head, req, self._pick(req)):
                    return
                if (req.headers.get("connection") or "").lower() == "close":
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                cin.close()
            self._close(client)

    def _exchange(self, client: socket.socket, cin: BinaryIO, head: Head, req: Request,
                  fault: Fault | None) -> bool:
        """One request and its answer; False when the client connection is to be closed."""
        kind = fault.kind if fault else None
        if fault and kind == "answer":
            drain_body(cin, head)
            self._note(req, f"answer {fault.status}")
            client.sendall(answer_bytes(fault.status, fault.headers, fault.body))
            return True
        if fault and kind == "stall" and not fault.forward:
            drain_body(cin, head)
            self._note(req, "stall")
            self._stop.wait(fault.seconds)
            return False
        if fault and kind == "delay":
            self._note(req, f"delay {fault.seconds}s")
            self._stop.wait(fault.seconds)
        if fault and kind == "reset" and fault.after_bytes == 0:
            self._note(req, "reset")             # refused at once: nothing reaches the upstream
            self._close(client, rst=True)
            return False
        up = self._track(socket.create_connection(self.upstream, timeout=600))
        try:
            up.sendall(head.encode())
            if fault and kind == "reset":
                relay_body(cin, up, head, limit=fault.after_bytes)
                self._note(req, f"reset after {fault.after_bytes} bytes")
                self._close(up, rst=True)
                self._close(client, rst=True)
                return False
            relay_body(cin, up, head)
            uin = up.makefile("rb")
            try:
                resp = read_head(uin)
                while resp is not None and resp.first.split(b" ")[1:2] in ([b"100"], [b"102"], [b"103"]):
                    resp = read_head(uin)      # interim answers: the client did not ask for them
                if resp is None:
                    self._note(req, "upstream closed")
                    return False
                status = resp.first.split(b" ")[1].decode()
                no_body = req.method == "HEAD" or status in ("204", "304")
                if fault and kind == "stall":          # forwarded: the answer is never given
                    if not no_body:
                        relay_body(uin, None, resp, until_close=True)
                    self._note(req, f"stall after upstream {status}")
                    self._stop.wait(fault.seconds)
                    return False
                if fault and kind == "digest":
                    lied = lie_about_adler32(resp.get("Digest"))
                    if lied is not None:
                        resp.set("Digest", lied)
                    self._note(req, f"{status} digest {'rewritten' if lied else 'absent'}")
                elif fault and kind == "truncate":
                    client.sendall(resp.encode())
                    if not no_body:
                        relay_body(uin, client, resp, limit=fault.keep_bytes, until_close=True)
                    self._note(req, f"{status} truncated to {fault.keep_bytes} body bytes")
                    return False
                else:
                    self._note(req, status)
                client.sendall(resp.encode())
                closes = (resp.get("Connection") or "").lower() == "close"
                if not no_body:
                    framed = relay_body(uin, client, resp, until_close=True)
                    closes = closes or not framed
                return not closes
            finally:
                with contextlib.suppress(OSError):
                    uin.close()
        finally:
            self._close(up)


# ------------------------------------------------------------------ HTTP/1.1 framing
def read_head(fh: BinaryIO) -> Head | None:
    """A request or status line and its header fields; None at a clean end of the connection."""
    first = fh.readline(MAX_HEAD)
    while first in (b"\r\n", b"\n"):     # stray CRLF between messages is allowed
        first = fh.readline(MAX_HEAD)
    if not first:
        return None
    fields: list[tuple[str, str]] = []
    size = len(first)
    while True:
        line = fh.readline(MAX_HEAD)
        size += len(line)
        if not line or size > MAX_HEAD:
            raise OSError("incomplete or oversized head")
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode("latin-1").partition(":")
        fields.append((k.strip(), v.strip()))
    return Head(first.rstrip(b"\r\n"), fields)


def relay_body(src: BinaryIO, dst: socket.socket | None, head: Head, limit: int | None = None,
               until_close: bool = False) -> bool:
    """Copy the body framed by `head` from src to dst (None: drop it), at most `limit` bytes of it
    (then stop: the caller cuts the connection). A body without Content-Length or chunking runs
    to the end of the connection if until_close (answers), else is empty (requests). Returns
    False when the body was framed by the end of the connection."""
    sent = 0

    def put(data: bytes) -> bool:
        nonlocal sent
        if limit is not None and sent + len(data) >= limit:
            data = data[:limit - sent]
        if dst is not None and data:
            dst.sendall(data)
        sent += len(data)
        return limit is None or sent < limit

    if "chunked" in (head.get("Transfer-Encoding") or "").lower():
        while True:
            line = src.readline(MAX_HEAD)
            if not line:
                raise OSError("chunked body cut short")
            if not put(line):
                return True
            n = int(line.split(b";")[0].strip() or b"0", 16)
            if n == 0:
                while True:                     # trailers, up to the blank line
                    t = src.readline(MAX_HEAD)
                    if not put(t) or t in (b"\r\n", b"\n", b""):
                        return True
            left = n + 2                        # the data and its CRLF
            while left:
                data = src.read(min(CHUNK, left))
                if not data:
                    raise OSError("chunked body cut short")
                left -= len(data)
                if not put(data):
                    return True
    length = head.get("Content-Length")
    if length is not None:
        left = int(length)
        while left:
            data = src.read(min(CHUNK, left))
            if not data:
                raise OSError("body cut short")
            left -= len(data)
            if not put(data):
                return True
        return True
    if not until_close:
        return True
    while data := src.read1(CHUNK) if hasattr(src, "read1") else src.read(CHUNK):
        if not put(data):
            break
    return False


def drain_body(src: BinaryIO, head: Head) -> None:
    relay_body(src, None, head)


def answer_bytes(status: int, headers: dict[str, str], body: bytes) -> bytes:
    reasons = {401: "Unauthorized", 500: "Internal Server Error", 502: "Bad Gateway",
               503: "Service Unavailable", 504: "Gateway Timeout"}
    h = Head(f"HTTP/1.1 {status} {reasons.get(status, 'Fault')}".encode(),
             [*headers.items(), ("Content-Length", str(len(body))), ("Connection", "keep-alive")])
    return h.encode() + body


def lie_about_adler32(digest: str | None) -> str | None:
    """The same Digest header with its adler32 value's bits flipped; None if it names no adler32."""
    if not digest:
        return None
    out, lied = [], False
    for part in digest.split(","):
        name, sep, value = part.strip().partition("=")
        if sep and name.lower() == "adler32":
            try:
                value = f"{int(value, 16) ^ 0xFFFFFFFF:08x}"
                lied = True
            except ValueError:
                pass
        out.append(f"{name}{sep}{value}")
    return ", ".join(out) if lied else None


@contextlib.contextmanager
def running(upstream: str) -> Iterator[FaultProxy]:
    """A started proxy in front of `upstream`, stopped at the end (the one place that does both)."""
    p = FaultProxy(upstream).start()
    try:
        yield p
    finally:
        p.stop()
