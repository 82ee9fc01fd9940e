"""Copies to XRootD over root:// (EOS, dCache's xrootd door, XRootD itself).

The same rules as over HTTP (see http.py): an identical copy (size and the storage's adler32
equal to the recorded ones) is success; anything else under the name is removed first (XRootD
caches a checksum per whole-second mtime, so an overwrite within the same second reports the
OLD checksum); the bytes are read once, paced, hashed and written in the same pass; the copy
is then checked with a checksum query, one at a time per server and not while an upload to it
is in flight; a failed or abandoned upload is removed (XRootD keeps partial files).

Two ways to talk root://, chosen once (lake.rucio.root_client, resolved in xroot_choice.py): the
XRootD Python bindings (`from XRootD import client`), or the `xrdcp` / `xrdfs` commands (Debian
xrootd-client); "auto" takes the bindings when importable. With the commands, the file is streamed
into `xrdcp -f --posc - URL` through a pipe, so it is still read once, here.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import IO, Any, BinaryIO, Literal
from urllib.parse import urlsplit

import structlog

from ..errors import DestinationOccupied, ObjectMissing, PermanentError, RetryableError
from ..hashing import CHUNK, Consumer, Digests
from ..localfs import Source
from .base import ChunkStream, Expected, Pacer, RemoteStat, Transport, copy_problem
from .http import GateBoard, HostGates, VerifyUpload
from .tee import read_once

log = structlog.get_logger("edge_agent.transfer.xroot")

SCHEMES = ("root", "roots", "xroot", "xroots")
Backend = Literal["auto", "python", "cli"]

# XRootD server error numbers (XProtocol.hh, kXR_*)
NOT_FOUND = 3011
ITS_THERE = 3018    # kXR_ItExists: an exclusive open found a file there


class _Exists(Exception):
    """An exclusive open found something at the URL: nothing was written."""
_REFUSED = {3010: "not authorised", 3025: "read-only file system", 3028: "TLS required",
            3030: "authentication failed"}
_PERMANENT = {3000, 3001, 3002, 3006, 3013, 3015, 3016, 3022, 3023, 3026, 3031}
_UNSUPPORTED = 3013
_ERRNO_RE = re.compile(r"\[(3\d{3})\]")
_SIZE_RE = re.compile(r"^\s*Size:\s*(\d+)\s*$", re.MULTILINE)
_READ_CHUNK = 1 << 20   # a read hands on bytes as they come, not 8 MiB at a time


# ------------------------------------------------------------------ pure helpers
def split_url(url: str) -> tuple[str, str]:
    """root://host:port//data/x?authz=... -> ("root://host:port", "/data/x?authz=...")."""
    p = urlsplit(url)
    if p.scheme not in SCHEMES or not p.netloc:
        raise PermanentError(f"not a root:// URL: {shown_url(url)}")
    path = "/" + p.path.lstrip("/")
    return f"{p.scheme}://{p.netloc}", path + (f"?{p.query}" if p.query else "")


def shown_url(url: str) -> str:
    """A URL fit for a message: no query string (tokens travel there as ?authz=)."""
    return url.split("?", 1)[0]


def parse_checksum(text: str) -> tuple[str, str] | None:
    """`adler32 312101e7` (as xrdfs prints it, or as the bindings return it) -> ("adler32", "312101e7")."""
    words = text.replace("\x00", " ").split()
    if len(words) < 2:
        return None
    return words[0].lower(), words[1].lower()


def parse_stat_size(text: str) -> int | None:
    m = _SIZE_RE.search(text)
    return int(m.group(1)) if m else None


def parse_errno(text: str) -> int | None:
    """The server's error number in an XRootD client message: `[ERROR] Server responded with an
    error: [3011] Unable to locate ...` -> 3011; None for client-side faults (connection etc.)."""
    m = _ERRNO_RE.search(text)
    return int(m.group(1)) if m else None


def error_for(code: int | None, message: str, what: str) -> Exception:
    """The taxonomy for an XRootD failure: server error number (None: the client's own fault)."""
    detail = f"{what}: {' '.join(message.split())[:400]}"
    if code in _REFUSED:
        return PermanentError(f"storage refused {detail} ({_REFUSED[code]})")
    if code in _PERMANENT:
        return PermanentError(detail)
    if code is None and ("Invalid address" in message or "Invalid URL" in message):
        return PermanentError(detail)
    # not found (a parent vanished?), no space, I/O, overload, timeouts, connection faults
    return RetryableError(detail)


# ------------------------------------------------------------------ the two ways of talking root://
class _Writer(abc.ABC):
    @abc.abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the upload; raises the taxonomy's errors if the storage did not take it."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop without finishing (the caller then removes whatever is left)."""


class _Client(abc.ABC):
    """What the transport needs from root://; server is root://host:port, path is /data/x."""

    @abc.abstractmethod
    def size(self, server: str, path: str) -> int | None:
        """None if nothing is there."""

    @abc.abstractmethod
    def checksum(self, server: str, path: str) -> tuple[str, str] | None:
        """(algorithm, hex) the server answers; None if it has no checksum to give.
        Raises FileNotFoundError if nothing is there."""

    @abc.abstractmethod
    def rm(self, server: str, path: str) -> None:
        """Remove; nothing there is success."""

    # can a writer be opened only if nothing is at the URL (the server refusing atomically)?
    exclusive_create = False

    @abc.abstractmethod
    def writer(self, url: str, exclusive: bool = False) -> _Writer:
        """A writer to `url`: replacing what is there, or (exclusive, where exclusive_create)
        refused with _Exists if anything is."""

    @abc.abstractmethod
    def reader(self, url: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """What `url` holds, streamed (see Transport.open); ObjectMissing if nothing is there."""


class CliClient(_Client):
    """xrdcp / xrdfs, one process per operation. They sometimes take ~5 s extra to exit, hence
    the generous process time limits on top of the XRootD client's own timeouts."""

    def __init__(self, timeout: float, digest_timeout: float, xrdcp: str = "xrdcp",
                 xrdfs: str = "xrdfs") -> None:
        self.timeout, self.digest_timeout = timeout, digest_timeout
        self.xrdcp, self.xrdfs = xrdcp, xrdfs
        t = str(max(1, int(timeout)))
        # without these a dead server costs the client's default 5 x 120 s of reconnecting
        self.env = {**os.environ, "XRD_CONNECTIONWINDOW": t, "XRD_CONNECTIONRETRY": "1",
                    "XRD_REQUESTTIMEOUT": t, "XRD_STREAMTIMEOUT": t}

    def _fs(self, server: str, *args: str, limit: float | None = None) -> tuple[int, str, str]:
        env = self.env
        if limit is not None:
            env = {**env, "XRD_REQUESTTIMEOUT": str(max(1, int(limit)))}
        wait = (limit or self.timeout) + 30
        try:
            r = subprocess.run([self.xrdfs, server, *args], check=False, capture_output=True, text=True, env=env,
                               timeout=wait, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RetryableError(f"xrdfs {args[0]} {shown_url(args[-1])}: no answer in {wait:.0f} s") from None
        except FileNotFoundError:
            raise PermanentError(f"{self.xrdfs} not found: install the XRootD client (Debian: "
                                 "xrootd-client) or the XRootD Python bindings") from None
        return r.returncode, r.stdout, r.stderr

    def size(self, server: str, path: str) -> int | None:
        rc, out, err = self._fs(server, "stat", path)
        if rc != 0:
            code = parse_errno(err)
            if code == NOT_FOUND:
                return None
            raise error_for(code, err or out, f"stat {server}/{shown_url(path)}")
        size = parse_stat_size(out)
        if size is None:
            raise RetryableError(f"stat {server}/{shown_url(path)}: no size in the answer: {out[:200]!r}")
        return size

    def checksum(self, server: str, path: str) -> tuple[str, str] | None:
        rc, out, err = self._fs(server, "query", "checksum", path, limit=self.digest_timeout)
        if rc != 0:
            code = parse_errno(err)
            if code == NOT_FOUND:
                raise FileNotFoundError(path)
            if code == _UNSUPPORTED:
                return None
            raise error_for(code, err or out, f"checksum query {server}/{shown_url(path)}")
        return parse_checksum(out)

    def rm(self, server: str, path: str) -> None:
        rc, out, err = self._fs(server, "rm", path)
        if rc != 0:
            code = parse_errno(err)
            if code != NOT_FOUND:
                raise error_for(code, err or out, f"rm {server}/{shown_url(path)}")

    def writer(self, url: str, exclusive: bool = False) -> _Writer:
        return _CliWriter(self, url)

    @contextlib.contextmanager
    def reader(self, url: str) -> Iterator[BinaryIO]:
        """`xrdcp URL -`: the object on xrdcp's stdout. Its exit status is read at the end of the
        stream, so a copy that fails after some bytes raises there instead of looking short."""
        shown = shown_url(url)
        # stderr to a file, not a pipe: a chatty xrdcp must never block while we read its stdout
        err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        try:
            proc = subprocess.Popen([self.xrdcp, "--nopbar", url, "-"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err, env=self.env)
        except FileNotFoundError:
            err.close()
            raise PermanentError(f"{self.xrdcp} not found: install the XRootD client (Debian: "
                                 "xrootd-client) or the XRootD Python bindings") from None
        assert proc.stdout is not None
        out = proc.stdout

        def chunks() -> Iterator[bytes]:
            yield from iter(lambda: out.read(_READ_CHUNK), b"")
            try:
                rc = proc.wait(self.timeout + 30)
            except subprocess.TimeoutExpired:
                raise RetryableError(f"xrdcp from {shown} did not finish") from None
            if rc != 0:
                err.seek(0)
                # the message may quote the URL with its token (?authz=): shown without it
                msg = err.read().decode(errors="replace").replace(url, shown).strip()
                code = parse_errno(msg)
                if code == NOT_FOUND:
                    raise ObjectMissing(f"xrdcp {shown}: no such file")
                raise error_for(code, msg or f"xrdcp exit status {rc}", f"xrdcp from {shown}")
        try:
            with ChunkStream(chunks()) as stream:
                yield stream  # type: ignore[misc]
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            out.close()
            err.close()


class _CliWriter(_Writer):
    def __init__(self, cli: CliClient, url: str) -> None:
        self.cli, self.url = cli, url
        # stderr to a file, not a pipe: a chatty xrdcp must never block on a full pipe while we write
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close() / abort()
        try:
            # --posc: the server drops the file if xrdcp goes away without a clean close
            self.proc = subprocess.Popen([cli.xrdcp, "--nopbar", "--silent", "--force", "--posc", "-", url],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.err,
                                         env=cli.env)
        except FileNotFoundError:
            self.err.close()
            raise PermanentError(f"{cli.xrdcp} not found: install the XRootD client (Debian: "
                                 "xrootd-client) or the XRootD Python bindings") from None
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            # a 1 MiB pipe instead of 64 KiB: fewer switches between us and xrdcp on a busy host
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._stdin().fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)

    def _stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def write(self, chunk: bytes) -> None:
        try:
            self._stdin().write(chunk)
        except (BrokenPipeError, ValueError):
            self.close()  # raises what xrdcp said
            raise RetryableError(f"xrdcp to {shown_url(self.url)} stopped reading") from None

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._stdin().close()
        try:
            rc = self.proc.wait(self.cli.timeout + 30)
        except subprocess.TimeoutExpired:
            self.abort()
            raise RetryableError(f"xrdcp to {shown_url(self.url)} did not finish") from None
        self.err.seek(0)
        msg = self.err.read().decode(errors="replace")
        self.err.close()
        if rc != 0:
            raise error_for(parse_errno(msg), msg or f"xrdcp exit status {rc}", f"xrdcp to {shown_url(self.url)}")

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            self._stdin().close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        self.err.close()


class PythonClient(_Client):
    """The XRootD Python bindings (pyxrootd): no process per operation."""

    def __init__(self, timeout: float, digest_timeout: float) -> None:
        from XRootD import client
        from XRootD.client.flags import OpenFlags, QueryCode
        self._client, self._open, self._query = client, OpenFlags, QueryCode
        self.timeout, self.digest_timeout = int(timeout), int(digest_timeout)
        self._lock = threading.Lock()
        self._fs: dict[str, Any] = {}

    def _filesystem(self, server: str) -> Any:
        with self._lock:
            if server not in self._fs:
                self._fs[server] = self._client.FileSystem(server)
            return self._fs[server]

    def size(self, server: str, path: str) -> int | None:
        st, info = self._filesystem(server).stat(path, timeout=self.timeout)
        if not st.ok:
            if st.errno == NOT_FOUND:
                return None
            raise _status_error(st, f"stat {server}/{shown_url(path)}")
        return int(info.size)

    def checksum(self, server: str, path: str) -> tuple[str, str] | None:
        st, answer = self._filesystem(server).query(self._query.CHECKSUM, path, timeout=self.digest_timeout)
        if not st.ok:
            if st.errno == NOT_FOUND:
                raise FileNotFoundError(path)
            if st.errno == _UNSUPPORTED:
                return None
            raise _status_error(st, f"checksum query {server}/{shown_url(path)}")
        text = answer.decode(errors="replace") if isinstance(answer, bytes) else str(answer)
        return parse_checksum(text)

    def rm(self, server: str, path: str) -> None:
        st, _ = self._filesystem(server).rm(path, timeout=self.timeout)
        if not st.ok and st.errno != NOT_FOUND:
            raise _status_error(st, f"rm {server}/{shown_url(path)}")

    exclusive_create = True

    def writer(self, url: str, exclusive: bool = False) -> _Writer:
        f = self._client.File()
        # NEW: the server creates the file only if nothing is there, in the open itself
        flags = (self._open.NEW if exclusive else self._open.DELETE) | self._open.MAKEPATH | self._open.POSC
        st, _ = f.open(url, flags, timeout=self.timeout)
        if not st.ok:
            if exclusive and st.errno == ITS_THERE:
                raise _Exists(url)
            raise _status_error(st, f"open {shown_url(url)} for writing")
        return _PythonWriter(f, url, self.timeout)

    @contextlib.contextmanager
    def reader(self, url: str) -> Iterator[BinaryIO]:
        shown = shown_url(url)
        f = self._client.File()
        st, _ = f.open(url, self._open.READ, timeout=self.timeout)
        if not st.ok:
            if st.errno == NOT_FOUND:
                raise ObjectMissing(f"open {shown}: no such file")
            raise _status_error(st, f"open {shown} for reading")

        def chunks() -> Iterator[bytes]:
            offset = 0
            while True:
                st, data = f.read(offset, _READ_CHUNK, timeout=self.timeout)
                if not st.ok:
                    raise _status_error(st, f"read {shown}")
                if not data:
                    return
                offset += len(data)
                yield data
        try:
            with ChunkStream(chunks()) as stream:
                yield stream  # type: ignore[misc]
        finally:
            with contextlib.suppress(Exception):
                f.close(timeout=self.timeout)


class _PythonWriter(_Writer):
    def __init__(self, f: Any, url: str, timeout: int) -> None:
        self.f, self.url, self.timeout, self.offset = f, url, timeout, 0

    def write(self, chunk: bytes) -> None:
        st, _ = self.f.write(chunk, self.offset, len(chunk), timeout=self.timeout)
        if not st.ok:
            raise _status_error(st, f"write to {shown_url(self.url)}")
        self.offset += len(chunk)

    def close(self) -> None:
        st, _ = self.f.close(timeout=self.timeout)
        if not st.ok:
            raise _status_error(st, f"close {shown_url(self.url)}")

    def abort(self) -> None:
        # closing would persist the partial file; the caller removes it
        with contextlib.suppress(Exception):
            self.f.close(timeout=5)


def _status_error(st: Any, what: str) -> Exception:
    return error_for(st.errno if st.errno else None, str(st.message), what)


def bindings_problem() -> str | None:
    """Why the XRootD Python bindings cannot be used on this host; None when they can."""
    try:
        import XRootD.client  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install is as good as none
        return f"{type(exc).__name__}: {exc}"
    return None


def bindings_available() -> bool:
    return bindings_problem() is None


# ------------------------------------------------------------------ the transport
class XRootTransport(Transport):
    """Uploads over root://.

    backend: "python" (the XRootD bindings), "cli" (xrdcp/xrdfs) or "auto" (bindings if importable).
    timeout: seconds for each request; digest_timeout for a checksum query (the server may read
             the whole file to answer it).
    verify_upload: "adler32" (the server must answer a checksum query) or "size".
    isolate_verification: per server, a checksum query runs alone, never beside an upload or
             another query (XRootD 5.5.3; see http.py); False lets everything overlap.
    puts_per_server: with isolate_verification, at most this many uploads to one server at once
             (0: any number; root:// itself never showed XRootD's HTTP faults).
    gate_board: the servers' gates, shared with other transports that reach the same servers.
    """

    scheme = "root"
    leaves_partials = True
    schemes = SCHEMES

    def __init__(self, *, timeout: float = 60.0, digest_timeout: float = 600.0,
                 verify_upload: VerifyUpload = "adler32", chunk_size: int = CHUNK,
                 backend: Backend = "auto", xrdcp: str = "xrdcp", xrdfs: str = "xrdfs",
                 isolate_verification: bool = True, puts_per_server: int = 0,
                 gate_board: GateBoard | None = None) -> None:
        if verify_upload not in ("adler32", "size"):
            raise ValueError(f"verify_upload must be 'adler32' or 'size', not {verify_upload!r}")
        self.verify_upload = verify_upload
        self.chunk_size = chunk_size
        if backend == "auto":
            backend = "python" if bindings_available() else "cli"
        if backend == "cli" and (shutil.which(xrdcp) is None or shutil.which(xrdfs) is None):
            log.warning("xrdcp/xrdfs not found on PATH: root:// uploads will fail", xrdcp=xrdcp, xrdfs=xrdfs)
        self.backend = backend
        self._client: _Client = (PythonClient(timeout, digest_timeout) if backend == "python"
                                 else CliClient(timeout, digest_timeout, xrdcp, xrdfs))
        self._gates = HostGates(isolate_verification, puts_per_server, gate_board)

    # ------------------------------------------------------------ the interface
    def put(self, source: Source, url: str, expected: Expected, pace: Pacer,
            also: Sequence[Consumer] = ()) -> Digests:
        server, path = split_url(url)
        # A URL this version may not replace is written with an exclusive open where the client
        # has one: the server refuses it atomically if anything is there, which a look first (a
        # stat per upload) could only tell for the moment of the look. What is found there is
        # then judged as a look would have judged it.
        exclusive = not expected.may_replace and self._client.exclusive_create
        looked = expected.found_empty and expected.may_replace
        if not exclusive and not looked and self._already_there(server, path, expected):
            return expected.digests()
        with self._gates.shared(server):
            try:
                got = self._upload(source, url, server, path, expected, pace, also, exclusive=exclusive)
            except _Exists:
                got = None
        if got is None:
            if self._already_there(server, path, expected):     # raises DestinationOccupied for other bytes
                return expected.digests()
            raise RetryableError(f"{server}/{shown_url(path)} was taken, then freed, while being written")
        self._check_copy(server, path, got, keep=not expected.may_replace)
        return got

    def stat(self, url: str, verify: str = "reread") -> RemoteStat | None:
        server, path = split_url(url)
        return self._remote(server, path)

    def delete(self, url: str) -> None:
        server, path = split_url(url)
        self._client.rm(server, path)

    def exists(self, url: str) -> bool:
        server, path = split_url(url)
        return self._client.size(server, path) is not None

    def open(self, url: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """What `url` holds, through the same XRootD client the uploads use (xrdcp to stdout, or
        the bindings). Not gated: a read is no checksum query, and the old reader was never gated."""
        split_url(url)   # PermanentError for a URL that is not root://
        return self._client.reader(url)

    # ------------------------------------------------------------ steps
    def _remote(self, server: str, path: str) -> RemoteStat | None:
        size = self._client.size(server, path)
        if size is None:
            return None
        with self._gates.exclusive(server):
            try:
                cks = self._client.checksum(server, path)
            except FileNotFoundError:
                return None
        adler = cks[1].rjust(8, "0") if cks is not None and cks[0] == "adler32" else None
        return RemoteStat(size, adler)

    def _already_there(self, server: str, path: str, expected: Expected) -> bool:
        size = self._client.size(server, path)
        if size is None:
            return False
        if expected.known and size == expected.size:
            remote = self._remote(server, path)
            if remote is None:
                return False
            if self.describes_copy(remote, expected.size, expected.adler32, by_size=not expected.may_replace) \
                    and (expected.may_replace or expected.known_writer):
                # size + adler32 recognise a copy only where the ledger knows who wrote it
                log.debug("identical copy already there", url=f"{server}/{shown_url(path)}")
                return True
        if not expected.may_replace:
            raise DestinationOccupied(f"{server}/{shown_url(path)} holds other bytes that this file version "
                                      "did not write; they are never replaced")
        log.info("replacing what is there before uploading", url=f"{server}/{shown_url(path)}", size=size)
        self._client.rm(server, path)
        return False

    def _upload(self, source: Source, url: str, server: str, path: str, expected: Expected,
                pace: Pacer, also: Sequence[Consumer] = (), exclusive: bool = False) -> Digests:
        # fresh chunks: the bindings' write may still hold a chunk when the next is read
        tee = read_once(source, expected, pace=pace, also=also, chunk_size=self.chunk_size, fresh=True)
        writer: _Writer | None = None
        try:
            with tee:
                writer = self._client.writer(url, exclusive)
                for chunk in tee.chunks():
                    writer.write(chunk)  # type: ignore[arg-type]  # fresh: bytes
                got = tee.digests()
                w, writer = writer, None
                w.close()
            return got
        except _Exists:
            raise                 # nothing was written: what is there is not ours to discard
        except BaseException:
            if writer is not None:
                writer.abort()
            self._discard(server, path, keep=not expected.may_replace)
            raise

    def _check_copy(self, server: str, path: str, got: Digests, keep: bool = False) -> None:
        shown = f"{server}/{shown_url(path)}"
        try:
            remote = self._remote(server, path)
        except BaseException:
            self._discard(server, path, keep)
            raise
        problem = copy_problem(remote, got, self.verify_upload, shown, "an adler32 checksum query")
        if problem:
            error, discard = problem
            if discard:
                self._discard(server, path, keep)
            raise error

    def _discard(self, server: str, path: str, keep: bool = False) -> None:
        if keep:
            # not this version's URL to clear: what lies there may be another writer's (see http.py)
            log.warning("a failed upload's URL is left as it is: what lies there may be another writer's",
                        url=f"{server}/{shown_url(path)}")
            return
        try:
            self._client.rm(server, path)
        except Exception as exc:  # noqa: BLE001 - best effort: the next attempt removes it first anyway
            log.warning("could not remove a partial or bad copy", url=f"{server}/{shown_url(path)}",
                        error=str(exc))
