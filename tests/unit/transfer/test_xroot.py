"""XRootTransport without a server: the parsing and error mapping alone, then the transport
driven through a fake `xrdcp`/`xrdfs` pair (and fake Python bindings) that keep files in a
directory and can be told to lie about checksums, refuse, or fail mid-upload."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import sys
import textwrap
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import blake3
import pytest

from edge_agent.errors import ChecksumMismatch, DestinationOccupied, FileChanged, FileVanished, PermanentError, RetryableError, ShuttingDown
from edge_agent.transfer.base import Expected, RemoteStat
from edge_agent.transfer.http import GateBoard
from edge_agent.transfer.xroot import (
    XRootTransport,
    error_for,
    parse_checksum,
    parse_errno,
    parse_stat_size,
    shown_url,
    split_url,
)

DATA = os.urandom(300_000)
URL = "root://xrd.example.org:1094//data/lake1/night1/f1.fits"
PATH = "/data/lake1/night1/f1.fits"
CHUNK = 64 * 1024


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def expected_for(data: bytes, may_replace: bool = True) -> Expected:
    # may_replace: the pipeline's word that what lies at the URL is this version's own (a bad copy)
    return Expected(len(data), blake3.blake3(data).hexdigest(), adler(data), may_replace=may_replace)


# ------------------------------------------------------------------ parsing and mapping
def test_split_url() -> None:
    assert split_url("root://127.0.0.1:11094//data/lake1/x") == ("root://127.0.0.1:11094", "/data/lake1/x")
    assert split_url("root://h:1094/data/x") == ("root://h:1094", "/data/x")
    assert split_url("roots://h//data/x?authz=tok") == ("roots://h", "/data/x?authz=tok")
    with pytest.raises(PermanentError):
        split_url("https://h/data/x")
    assert shown_url("root://h//data/x?authz=tok") == "root://h//data/x"


def test_parse_checksum() -> None:
    assert parse_checksum("adler32 312101e7\n") == ("adler32", "312101e7")
    assert parse_checksum("adler32 312101E7\x00") == ("adler32", "312101e7")      # as the bindings return it
    assert parse_checksum("md5 2e6ad99f26661341d1cdf49b6150375d") == ("md5", "2e6ad99f26661341d1cdf49b6150375d")
    assert parse_checksum("") is None and parse_checksum("adler32") is None


def test_parse_stat_size() -> None:
    out = "Path:   /data/x\nId:     6611\nSize:   1000000\nMTime:  2026-11-25 15:45:34\nFlags:  48\n"
    assert parse_stat_size(out) == 1_000_000
    assert parse_stat_size("Path: /x\n") is None


def test_parse_errno() -> None:
    msg = "[ERROR] Server responded with an error: [3011] Unable to locate /data/x; no such file or directory"
    assert parse_errno(msg) == 3011
    assert parse_errno("[FATAL] Connection error") is None


@pytest.mark.parametrize("code,kind", [(3010, PermanentError), (3030, PermanentError), (3025, PermanentError),
                                       (3000, PermanentError), (3016, PermanentError),
                                       (3009, RetryableError), (3021, RetryableError), (3007, RetryableError),
                                       (3012, RetryableError), (3024, RetryableError), (None, RetryableError)])
def test_error_mapping(code: int | None, kind: type[Exception]) -> None:
    e = error_for(code, f"[ERROR] Server responded with an error: [{code}] something", "xrdcp to root://h//x")
    assert type(e) is kind
    if code in (3010, 3030, 3025):
        assert "storage refused" in str(e)


def test_invalid_address_is_permanent() -> None:
    assert isinstance(error_for(None, "[FATAL] Invalid address", "stat"), PermanentError)


# ------------------------------------------------------------------ a fake xrdcp / xrdfs
FAKE_XRDFS = r'''
import json, os, sys, zlib, hashlib
conf = json.load(open(os.environ["FAKE_XRD_CONF"]))
root = conf["root"]
server, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(conf["log"], "a") as f:
    f.write(" ".join(["xrdfs", cmd] + args) + "\n")
def fail(code, text):
    sys.stderr.write(f"[ERROR] Server responded with an error: [{code}] {text}\n")
    sys.exit(54)
if conf.get("refuse"):
    fail(3010, "Unable to do it; permission denied")
if cmd == "query":
    path = args[1]
else:
    path = args[0]
local = root + path.split("?")[0]
if not os.path.isfile(local):
    fail(3011, f"Unable to locate {path}; no such file or directory")
data = open(local, "rb").read()
if cmd == "stat":
    print(f"Path:   {path}\nId:     1\nSize:   {len(data)}\nFlags:  48 (IsReadable|IsWritable)")
elif cmd == "rm":
    os.unlink(local)
elif cmd == "query":
    mode = conf.get("cks", "adler32")
    if mode == "unsupported":
        fail(3013, "checksums are not supported")
    elif mode == "lie":
        print("adler32 0badf00d")
    elif mode == "md5":
        print("md5 " + hashlib.md5(data).hexdigest())
    else:
        print(f"adler32 {zlib.adler32(data) & 0xffffffff:08x}")
'''

FAKE_XRDCP = r'''
import json, os, sys
conf = json.load(open(os.environ["FAKE_XRD_CONF"]))
if sys.argv[-1] == "-":          # xrdcp URL -: the object to stdout
    path = "/" + sys.argv[-2].split("//", 2)[2].lstrip("/")
    with open(conf["log"], "a") as f:
        f.write(" ".join(["xrdcp"] + sys.argv[1:-2] + [path, "-"]) + "\n")
    local = conf["root"] + path.split("?")[0]
    if not os.path.isfile(local):
        sys.stderr.write(f"[ERROR] Server responded with an error: [3011] Unable to open {sys.argv[-2]}\n")
        sys.exit(54)
    sys.stdout.buffer.write(open(local, "rb").read())
    sys.exit(0)
url = sys.argv[-1]
path = "/" + url.split("//", 2)[2].lstrip("/")
with open(conf["log"], "a") as f:
    f.write(" ".join(["xrdcp"] + sys.argv[1:-1] + [path]) + "\n")
if conf.get("refuse"):
    sys.stderr.write("[ERROR] Server responded with an error: [3010] Unable to open; permission denied\n")
    sys.exit(54)
local = conf["root"] + path.split("?")[0]
os.makedirs(os.path.dirname(local), exist_ok=True)
fail_after = conf.get("fail_after")
n = 0
with open(local, "wb") as out:
    while True:
        chunk = sys.stdin.buffer.read(65536)
        if not chunk:
            break
        out.write(chunk)
        n += len(chunk)
        if fail_after is not None and n >= fail_after:
            out.flush()
            sys.stderr.write("[ERROR] Server responded with an error: [3009] Unable to write; no space left\n")
            sys.exit(54)
'''


class FakeXrd:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "storage"
        self.root.mkdir()
        self.conf_path = tmp / "conf.json"
        self.log_path = tmp / "calls.log"
        self.log_path.write_text("")
        self.conf: dict[str, Any] = {}
        self.save()
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for name, body in (("xrdfs", FAKE_XRDFS), ("xrdcp", FAKE_XRDCP)):
            p = self.bin / name
            p.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
            p.chmod(p.stat().st_mode | stat.S_IXUSR)

    def set(self, **kw: Any) -> None:
        self.conf.update(kw)
        self.save()

    def save(self) -> None:
        self.conf_path.write_text(json.dumps({"root": str(self.root), "log": str(self.log_path), **self.conf}))

    def calls(self) -> list[str]:
        return [line.split()[0] + " " + line.split()[1] for line in self.log_path.read_text().splitlines()]

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def file(self, path: str = PATH) -> Path:
        return self.root / path.lstrip("/")

    def put(self, data: bytes, path: str = PATH) -> None:
        self.file(path).parent.mkdir(parents=True, exist_ok=True)
        self.file(path).write_bytes(data)


@pytest.fixture
def xrd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeXrd:
    fake = FakeXrd(tmp_path)
    monkeypatch.setenv("FAKE_XRD_CONF", str(fake.conf_path))
    return fake


@pytest.fixture
def make(xrd: FakeXrd) -> Callable[..., XRootTransport]:
    def _make(**kw: Any) -> XRootTransport:
        return XRootTransport(backend="cli", xrdcp=str(xrd.bin / "xrdcp"), xrdfs=str(xrd.bin / "xrdfs"),
                              chunk_size=CHUNK, timeout=10, **kw)
    return _make


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "f1.fits"
    p.write_bytes(DATA)
    return p


class Pace:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_after = fail_after

    def __call__(self, n: int) -> None:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise ShuttingDown("stopping")
        self.calls.append(n)


def test_put_streams_through_xrdcp_stdin_and_verifies(make, xrd: FakeXrd, src: Path) -> None:
    pace = Pace()
    got = make().put(str(src), URL, expected_for(DATA), pace)
    assert xrd.file().read_bytes() == DATA
    assert got.adler32 == adler(DATA) and got.blake3 == blake3.blake3(DATA).hexdigest()
    assert xrd.calls() == ["xrdfs stat", "xrdcp --nopbar", "xrdfs stat", "xrdfs query"]
    cp = next(line for line in xrd.lines() if line.startswith("xrdcp"))
    assert "--force" in cp and "--posc" in cp and " - " in cp     # from stdin, persist on successful close
    assert sum(pace.calls) == len(DATA) and max(pace.calls) <= CHUNK


def test_a_url_found_empty_just_before_is_not_stat_again(make, xrd: FakeXrd, src: Path) -> None:
    make().put(str(src), URL, dataclasses.replace(expected_for(DATA), found_empty=True), Pace())
    assert xrd.file().read_bytes() == DATA
    assert xrd.calls() == ["xrdcp --nopbar", "xrdfs stat", "xrdfs query"]


def test_identical_copy_is_success_without_upload(make, xrd: FakeXrd, src: Path) -> None:
    xrd.put(DATA)
    pace = Pace()
    make().put(str(src), URL, expected_for(DATA), pace)
    assert "xrdcp --nopbar" not in xrd.calls() and pace.calls == []


def test_other_content_is_removed_before_the_upload(make, xrd: FakeXrd, src: Path) -> None:
    xrd.put(os.urandom(len(DATA)))
    make().put(str(src), URL, expected_for(DATA), Pace())
    calls = xrd.calls()
    assert calls.index("xrdfs rm") < calls.index("xrdcp --nopbar")
    assert xrd.file().read_bytes() == DATA


def test_other_content_nobody_vouches_for_is_never_replaced(make, xrd: FakeXrd, src: Path) -> None:
    xrd.put(b"an older night's only copy")
    with pytest.raises(DestinationOccupied):
        make().put(str(src), URL, expected_for(DATA, may_replace=False), Pace())
    assert xrd.file().read_bytes() == b"an older night's only copy" and "xrdfs rm" not in xrd.calls()


def test_other_size_is_removed_without_a_checksum_query(make, xrd: FakeXrd, src: Path) -> None:
    xrd.put(b"partial")
    make().put(str(src), URL, expected_for(DATA), Pace())
    assert xrd.calls()[:3] == ["xrdfs stat", "xrdfs rm", "xrdcp --nopbar"]


def test_source_changed_since_hashing(make, xrd: FakeXrd, src: Path) -> None:
    recorded = expected_for(DATA)
    src.write_bytes(os.urandom(len(DATA)))
    with pytest.raises(FileChanged):
        make().put(str(src), URL, recorded, Pace())
    assert not xrd.file().exists() and xrd.calls()[-1] == "xrdfs rm"


def test_source_grew_since_hashing(make, xrd: FakeXrd, src: Path) -> None:
    recorded = expected_for(DATA)
    src.write_bytes(DATA + b"x" * 100)
    with pytest.raises(FileChanged):
        make().put(str(src), URL, recorded, Pace())
    assert not xrd.file().exists()


def test_checksum_mismatch_removes_the_copy(make, xrd: FakeXrd, src: Path) -> None:
    xrd.set(cks="lie")
    with pytest.raises(ChecksumMismatch, match="0badf00d"):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert not xrd.file().exists()


def test_another_algorithm_is_not_taken_for_adler32(make, xrd: FakeXrd, src: Path) -> None:
    xrd.set(cks="md5")
    with pytest.raises(PermanentError, match='verify_upload = "size"'):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert not xrd.file().exists()
    xrd.put(DATA)
    assert make().stat(URL) == RemoteStat(len(DATA), None)


@pytest.mark.parametrize("cks", ["unsupported", "md5"])
def test_no_adler32_with_verify_size_accepts_the_size(make, xrd: FakeXrd, src: Path, cks: str) -> None:
    xrd.set(cks=cks)
    make(verify_upload="size").put(str(src), URL, expected_for(DATA), Pace())
    assert xrd.file().read_bytes() == DATA


def test_failed_upload_removes_the_partial_file(make, xrd: FakeXrd, src: Path) -> None:
    xrd.set(fail_after=100_000)
    with pytest.raises(RetryableError, match="3009"):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert not xrd.file().exists() and xrd.calls()[-1] == "xrdfs rm"


def test_shutdown_mid_upload_removes_the_partial_file(make, xrd: FakeXrd, src: Path) -> None:
    with pytest.raises(ShuttingDown):
        make().put(str(src), URL, expected_for(DATA), Pace(fail_after=2))
    assert not xrd.file().exists() and xrd.calls()[-1] == "xrdfs rm"


def test_refused_is_permanent(make, xrd: FakeXrd, src: Path) -> None:
    xrd.set(refuse=True)
    with pytest.raises(PermanentError, match="storage refused"):
        make().put(str(src), URL, expected_for(DATA), Pace())


def test_missing_source_is_file_vanished(make, xrd: FakeXrd, tmp_path: Path) -> None:
    with pytest.raises(FileVanished):
        make().put(str(tmp_path / "gone"), URL, expected_for(DATA), Pace())


def test_stat_and_delete(make, xrd: FakeXrd) -> None:
    t = make()
    assert t.stat(URL) is None
    xrd.put(DATA)
    assert t.stat(URL) == RemoteStat(len(DATA), adler(DATA))
    t.delete(URL)
    assert not xrd.file().exists()
    t.delete(URL)                                   # nothing there: success


def test_missing_commands_are_a_permanent_error(tmp_path: Path, src: Path) -> None:
    t = XRootTransport(backend="cli", xrdcp=str(tmp_path / "no-xrdcp"), xrdfs=str(tmp_path / "no-xrdfs"))
    with pytest.raises(PermanentError, match="xrootd-client"):
        t.stat(URL)


# ------------------------------------------------------------------ the Python bindings, faked
class _Status:
    def __init__(self, errno: int = 0, message: str = "[SUCCESS]") -> None:
        self.ok = errno == 0
        self.errno = errno
        self.message = message


class _FakeStorage:
    files: ClassVar[dict[str, bytes]] = {}
    opens: ClassVar[list[tuple[str, int]]] = []
    stats: ClassVar[list[str]] = []
    cks = "adler32"


def _fake_bindings() -> types.ModuleType:
    store = _FakeStorage

    def nf(path: str) -> _Status:
        return _Status(3011, f"[ERROR] Server responded with an error: [3011] Unable to locate {path}")

    class FileSystem:
        def __init__(self, url: str) -> None:
            self.url = url

        def stat(self, path: str, timeout: int = 0) -> tuple[_Status, Any]:
            store.stats.append(path)
            if path not in store.files:
                return nf(path), None
            return _Status(), types.SimpleNamespace(size=len(store.files[path]))

        def query(self, code: int, path: str, timeout: int = 0) -> tuple[_Status, Any]:
            if path not in store.files:
                return nf(path), None
            if store.cks == "lie":
                return _Status(), b"adler32 0badf00d\x00"
            return _Status(), f"adler32 {adler(store.files[path])}\x00".encode()

        def rm(self, path: str, timeout: int = 0) -> tuple[_Status, None]:
            if store.files.pop(path, None) is None:
                return nf(path), None
            return _Status(), None

    class File:
        def open(self, url: str, flags: int = 0, timeout: int = 0) -> tuple[_Status, None]:
            self.path = "/" + url.split("//", 2)[2].lstrip("/")
            self.flags = flags
            if flags == 1:   # READ
                return (_Status(), None) if self.path in store.files else (nf(self.path), None)
            store.opens.append((self.path, flags))
            if flags & 8 and self.path in store.files:      # NEW: only where nothing is
                return _Status(3018, f"[ERROR] Server responded with an error: [3018] Unable to pcreate "
                                     f"{self.path}; file exists"), None
            store.files[self.path] = b""
            return _Status(), None

        def read(self, offset: int = 0, size: int = 0, timeout: int = 0) -> tuple[_Status, bytes]:
            return _Status(), store.files[self.path][offset:offset + size]

        def write(self, buffer: bytes, offset: int = 0, size: int = 0, timeout: int = 0) -> tuple[_Status, None]:
            assert isinstance(buffer, bytes)            # the real bindings refuse memoryviews
            assert offset == len(store.files[self.path])
            store.files[self.path] += buffer
            return _Status(), None

        def close(self, timeout: int = 0) -> tuple[_Status, None]:
            return _Status(), None

    flags = types.ModuleType("XRootD.client.flags")
    flags.OpenFlags = types.SimpleNamespace(READ=1, DELETE=2, NEW=8, MAKEPATH=256, POSC=128)  # type: ignore[attr-defined]
    flags.QueryCode = types.SimpleNamespace(CHECKSUM=3)  # type: ignore[attr-defined]
    client = types.ModuleType("XRootD.client")
    client.FileSystem = FileSystem  # type: ignore[attr-defined]
    client.File = File  # type: ignore[attr-defined]
    client.flags = flags  # type: ignore[attr-defined]
    pkg = types.ModuleType("XRootD")
    pkg.client = client  # type: ignore[attr-defined]
    return pkg


@pytest.fixture
def bindings(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_FakeStorage]]:
    pkg = _fake_bindings()
    monkeypatch.setitem(sys.modules, "XRootD", pkg)
    monkeypatch.setitem(sys.modules, "XRootD.client", pkg.client)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "XRootD.client.flags", pkg.client.flags)  # type: ignore[attr-defined]
    _FakeStorage.files = {}
    _FakeStorage.opens = []
    _FakeStorage.stats = []
    _FakeStorage.cks = "adler32"
    yield _FakeStorage


def test_auto_prefers_the_python_bindings(bindings: type[_FakeStorage], src: Path) -> None:
    t = XRootTransport(chunk_size=CHUNK)
    assert t.backend == "python"
    t.put(str(src), URL, expected_for(DATA), Pace())
    assert bindings.files[PATH] == DATA
    assert t.stat(URL) == RemoteStat(len(DATA), adler(DATA))
    t.put(str(src), URL, expected_for(DATA), Pace())          # identical: nothing written
    t.delete(URL)
    t.delete(URL)
    assert PATH not in bindings.files


def test_python_bindings_mismatch_and_changed_source(bindings: type[_FakeStorage], src: Path) -> None:
    t = XRootTransport(backend="python", chunk_size=CHUNK)
    bindings.cks = "lie"
    with pytest.raises(ChecksumMismatch):
        t.put(str(src), URL, expected_for(DATA), Pace())
    assert PATH not in bindings.files
    bindings.cks = "adler32"
    recorded = expected_for(DATA)
    src.write_bytes(hashlib.sha256(DATA).digest() * 10)
    with pytest.raises(FileChanged):
        t.put(str(src), URL, recorded, Pace())
    assert PATH not in bindings.files


def test_open_streams_through_xrdcp_and_a_missing_file_is_object_missing(make, xrd: FakeXrd) -> None:
    from edge_agent.errors import ObjectMissing
    xrd.put(DATA)
    t = make()
    with t.open(URL + "?authz=secret") as fh:
        assert fh.read() == DATA
    assert xrd.lines()[-1] == f"xrdcp --nopbar {PATH}?authz=secret -"   # the token travels with the URL
    with pytest.raises(ObjectMissing) as e, t.open(URL.replace("f1", "none") + "?authz=secret") as fh:
        fh.read()
    assert "secret" not in str(e.value)


def test_open_through_the_python_bindings(bindings: type[_FakeStorage]) -> None:
    from edge_agent.errors import ObjectMissing
    bindings.files[PATH] = DATA * 5
    t = XRootTransport(backend="python")
    with t.open(URL) as fh:
        assert fh.read() == DATA * 5
    with pytest.raises(ObjectMissing):
        t.open(URL.replace("f1", "none")).__enter__()


# ------------------------------------------------------------------ two uploads to one server (issue 14, item 4)
class _HoldInUpload:
    """Fed the upload's read: over root:// its reset comes inside the upload's gate. It says so and
    waits to be let go."""

    def __init__(self, go: threading.Event, anyone: threading.Event) -> None:
        self.ready, self.go, self.anyone = threading.Event(), go, anyone

    def reset(self) -> None:
        self.ready.set()
        self.anyone.set()
        assert self.go.wait(10)

    def update(self, chunk: bytes | memoryview) -> None:
        pass


class _WatchedBoard(GateBoard):
    def __init__(self) -> None:
        super().__init__()
        self.blocked = threading.Event()

    def wait(self, gate: Any) -> None:
        self.blocked.set()
        super().wait(gate)


def _start_two(t: XRootTransport, src: Path, go: threading.Event) -> tuple[list[threading.Thread], list[_HoldInUpload]]:
    anyone = threading.Event()
    holds = [_HoldInUpload(go, anyone), _HoldInUpload(go, anyone)]

    def one(i: int) -> None:
        t.put(str(src), URL.replace("f1.fits", f"two{i}.fits"), expected_for(DATA), Pace(), also=[holds[i]])
    threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    return threads, holds


def test_root_uploads_to_one_server_run_side_by_side_by_default(bindings: type[_FakeStorage], src: Path) -> None:
    go = threading.Event()
    threads, holds = _start_two(XRootTransport(backend="python", chunk_size=CHUNK), src, go)
    assert all(h.ready.wait(10) for h in holds)      # both inside their uploads at once
    go.set()
    for th in threads:
        th.join(20)
    assert bindings.files[PATH.replace("f1.fits", "two0.fits")] == DATA
    assert bindings.files[PATH.replace("f1.fits", "two1.fits")] == DATA


def test_root_uploads_one_at_a_time_with_puts_per_server_1(bindings: type[_FakeStorage], src: Path) -> None:
    go, board = threading.Event(), _WatchedBoard()
    t = XRootTransport(backend="python", chunk_size=CHUNK, puts_per_server=1, gate_board=board)
    threads, holds = _start_two(t, src, go)
    assert holds[0].anyone.wait(10)
    first = 0 if holds[0].ready.is_set() else 1
    assert board.blocked.wait(10)                     # one uploads, the other waits at the gate ...
    assert not holds[1 - first].ready.is_set()        # ... (it holds the gate's lock until it waits)
    go.set()
    for th in threads:
        th.join(20)
    assert holds[1 - first].ready.is_set()
    assert bindings.files[PATH.replace("f1.fits", "two0.fits")] == DATA
    assert bindings.files[PATH.replace("f1.fits", "two1.fits")] == DATA


def test_a_new_copy_is_created_exclusively_without_a_look_first(bindings: type[_FakeStorage], src: Path) -> None:
    """A URL this version may not replace: the server refuses the open if anything is there (atomic),
    instead of a stat per upload that could only tell for the moment of the look."""
    t = XRootTransport(backend="python", chunk_size=CHUNK)
    t.put(str(src), URL, expected_for(DATA, may_replace=False), Pace())
    assert bindings.files[PATH] == DATA
    assert bindings.opens == [(PATH, 8 | 256 | 128)]          # NEW | MAKEPATH | POSC
    assert bindings.stats == [PATH]                           # only the check of the copy written


def test_an_exclusive_open_that_finds_other_bytes_never_replaces_them(bindings: type[_FakeStorage], src: Path) -> None:
    t = XRootTransport(backend="python", chunk_size=CHUNK)
    bindings.files[PATH] = b"someone else's bytes"
    with pytest.raises(DestinationOccupied):
        t.put(str(src), URL, expected_for(DATA, may_replace=False), Pace())
    assert bindings.files[PATH] == b"someone else's bytes"


def test_an_exclusive_open_that_finds_this_versions_copy_counts_it(bindings: type[_FakeStorage], src: Path) -> None:
    t = XRootTransport(backend="python", chunk_size=CHUNK)
    bindings.files[PATH] = DATA
    e = expected_for(DATA, may_replace=False)
    e = dataclasses.replace(e, known_writer=True)             # written under this name by these bytes
    assert t.put(str(src), URL, e, Pace()).adler32 == adler(DATA)
    assert bindings.files[PATH] == DATA and len(bindings.opens) == 1


def test_a_url_this_version_may_replace_is_still_looked_at_and_cleared_first(bindings: type[_FakeStorage],
                                                                            src: Path) -> None:
    t = XRootTransport(backend="python", chunk_size=CHUNK)
    bindings.files[PATH] = b"a partial copy of ours"
    t.put(str(src), URL, expected_for(DATA, may_replace=True), Pace())
    assert bindings.files[PATH] == DATA
    assert bindings.opens == [(PATH, 2 | 256 | 128)]          # DELETE | MAKEPATH | POSC
