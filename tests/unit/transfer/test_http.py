"""HttpTransport against an in-memory WebDAV server behind httpx.MockTransport.

The fake server can be told to behave like the storages met in the field: XRootD (creates
parents, answers Want-Digest), a plain WebDAV server (no Digest, 409 for missing parents), a
storage that lies about checksums or answers another algorithm, and one that fails mid-upload.
"""

from __future__ import annotations

import dataclasses

import base64
import hashlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import httpx
import pytest
import structlog

from edge_agent.errors import ChecksumMismatch, DestinationOccupied, FileChanged, FileVanished, PermanentError, RetryableError, ShuttingDown
from edge_agent.transfer.base import Expected, RemoteStat
from edge_agent.transfer.http import (
    GateBoard,
    HostGates,
    HttpTransport,
    adler32_of_digest,
    md5_of_digest,
    parse_digests,
    shown_url,
    status_error,
    wire_url,
)

DATA = os.urandom(300_000)
URL = "https://dav.example.org:2880/data/lake1/night1/f1.fits"
CHUNK = 64 * 1024


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def expected_for(data: bytes, md5: bool = False, may_replace: bool = True) -> Expected:
    # may_replace: the pipeline's word that what lies at the URL is this version's own (a bad copy)
    return Expected(len(data), blake3.blake3(data).hexdigest(), adler(data),
                    hashlib.md5(data).hexdigest() if md5 else None, may_replace=may_replace)


class FakeDav:
    """A WebDAV server in a dict. Knobs are plain attributes set by each test."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/", "/data/", "/data/lake1/"}
        self.log: list[tuple[str, str]] = []          # (method, path)
        self.requests: list[httpx.Request] = []
        self.digest: str = "adler32"                  # adler32 | none | md5 | lie | stale
        self.create_parents = True                    # XRootD does; nginx without create_full_put_path doesn't
        self.put_status: int | None = None            # force an answer to PUT
        self.put_error: Exception | None = None       # raise this after storing a partial body
        self.stale: bytes | None = None               # what "stale" digests describe
        self.status_for: dict[str, int] = {}          # method -> forced status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.log.append((request.method, path))
        self.requests.append(request)
        if request.method in self.status_for:
            return httpx.Response(self.status_for[request.method])
        return getattr(self, "do_" + request.method)(request, path)

    def parent(self, path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[0] + "/"

    def do_HEAD(self, request: httpx.Request, path: str) -> httpx.Response:
        if path not in self.files:
            return httpx.Response(404)
        data = self.files[path]
        headers = {"Content-Length": str(len(data))}
        if "want-digest" in request.headers:
            if self.digest == "adler32":
                headers["Digest"] = f"adler32={adler(data)}"
            elif self.digest == "md5":
                headers["Digest"] = "md5=" + base64.b64encode(hashlib.md5(data).digest()).decode()
            elif self.digest == "lie":
                headers["Digest"] = "adler32=0badf00d"
            elif self.digest == "stale":
                headers["Digest"] = f"adler32={adler(self.stale or b'')}"
            elif self.digest == "sha":
                # another algorithm's name with an adler32-looking value: never taken for adler32
                headers["Digest"] = f"sha-256={adler(data)}"
        return httpx.Response(200, headers=headers)

    def do_PUT(self, request: httpx.Request, path: str) -> httpx.Response:
        if self.put_status is not None:
            return httpx.Response(self.put_status)
        if not self.create_parents and self.parent(path) not in self.dirs:
            return httpx.Response(409)
        body = request.content
        if self.put_error is not None:
            self.files[path] = body[: len(body) // 2]   # a partial file stays behind (XRootD defect 2)
            raise self.put_error
        self.files[path] = body
        d = self.parent(path)
        while d not in self.dirs:
            self.dirs.add(d)
            d = self.parent(d)
        return httpx.Response(201)

    def do_GET(self, request: httpx.Request, path: str) -> httpx.Response:
        if path not in self.files:
            return httpx.Response(404)
        return httpx.Response(200, content=self.files[path])

    def do_DELETE(self, request: httpx.Request, path: str) -> httpx.Response:
        if self.files.pop(path, None) is None:
            return httpx.Response(404)
        return httpx.Response(204)

    def do_MKCOL(self, request: httpx.Request, path: str) -> httpx.Response:
        if path in self.dirs:
            return httpx.Response(405)
        if self.parent(path) not in self.dirs:
            return httpx.Response(409)
        self.dirs.add(path)
        return httpx.Response(201)

    def methods(self) -> list[str]:
        return [m for m, _ in self.log]


class Pace:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_after = fail_after

    def __call__(self, n: int) -> None:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise ShuttingDown("stopping")
        self.calls.append(n)


@pytest.fixture
def dav() -> FakeDav:
    return FakeDav()


@pytest.fixture
def make(dav: FakeDav) -> Iterator[Callable[..., HttpTransport]]:
    made: list[HttpTransport] = []

    def _make(**kw: object) -> HttpTransport:
        t = HttpTransport(transport=httpx.MockTransport(dav), chunk_size=CHUNK, **kw)  # type: ignore[arg-type]
        made.append(t)
        return t
    yield _make
    for t in made:
        t.close()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "f1.fits"
    p.write_bytes(DATA)
    return p


KEY = "/data/lake1/night1/f1.fits"


# ------------------------------------------------------------------ the happy path
def test_put_streams_with_content_length_and_verifies(make, dav: FakeDav, src: Path) -> None:
    pace = Pace()
    got = make().put(str(src), URL, expected_for(DATA), pace)
    assert dav.files[KEY] == DATA
    assert (got.size, got.adler32, got.blake3) == (len(DATA), adler(DATA), blake3.blake3(DATA).hexdigest())
    assert dav.methods() == ["HEAD", "PUT", "HEAD"]
    put = next(r for r in dav.requests if r.method == "PUT")
    assert put.headers["Content-Length"] == str(len(DATA))
    assert "transfer-encoding" not in put.headers          # never chunked (XRootD defect 1)
    verify = dav.requests[-1]
    assert verify.headers["Want-Digest"] == "adler32"
    assert verify.headers["Connection"] == "close"
    # read in chunks, each paced before it is sent; memory is bounded by the chunk size
    assert sum(pace.calls) == len(DATA) and max(pace.calls) <= CHUNK and len(pace.calls) > 1


def test_a_url_found_empty_just_before_is_not_looked_at_again(make, dav: FakeDav, src: Path) -> None:
    """The transfer step looked (a HEAD) and recorded the URL as this version's: no second HEAD."""
    make().put(str(src), URL, dataclasses.replace(expected_for(DATA), found_empty=True), Pace())
    assert dav.files[KEY] == DATA and dav.methods() == ["PUT", "HEAD"]
    # without the right to replace, the word "found empty" changes nothing: it looks first
    dav.files.pop(KEY)
    dav.requests.clear()
    dav.log.clear()
    make().put(str(src), URL, dataclasses.replace(expected_for(DATA, may_replace=False), found_empty=True), Pace())
    assert dav.methods() == ["HEAD", "PUT", "HEAD"]


def test_md5_is_hashed_in_the_same_pass_when_recorded(make, dav: FakeDav, src: Path) -> None:
    got = make().put(str(src), URL, expected_for(DATA, md5=True), Pace())
    assert got.md5 == hashlib.md5(DATA).hexdigest()


def test_zero_byte_file_is_sent_with_content_length_zero(make, dav: FakeDav, tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    make().put(str(p), URL, expected_for(b""), Pace())
    put = next(r for r in dav.requests if r.method == "PUT")
    assert put.headers["Content-Length"] == "0" and dav.files[KEY] == b""


def test_davs_is_https_on_the_wire(make, dav: FakeDav, src: Path) -> None:
    make().put(str(src), "davs://dav.example.org:2880/data/lake1/night1/f1.fits", expected_for(DATA), Pace())
    assert all(r.url.scheme == "https" for r in dav.requests)
    assert wire_url("davs://h/x") == "https://h/x" and wire_url("http://h/x") == "http://h/x"


# ------------------------------------------------------------------ idempotency and overwrites
def test_identical_copy_is_success_without_upload(make, dav: FakeDav, src: Path) -> None:
    dav.files[KEY] = DATA
    pace = Pace()
    got = make().put(str(src), URL, expected_for(DATA), pace)
    assert got.adler32 == adler(DATA)
    assert dav.methods() == ["HEAD", "HEAD"] and pace.calls == []


def test_other_content_is_deleted_before_the_upload(make, dav: FakeDav, src: Path) -> None:
    # same size, other bytes: XRootD would report the OLD checksum after an overwrite in the same second
    dav.files[KEY] = os.urandom(len(DATA))
    make().put(str(src), URL, expected_for(DATA), Pace())
    assert dav.methods() == ["HEAD", "HEAD", "DELETE", "PUT", "HEAD"]
    assert dav.files[KEY] == DATA


def test_other_content_nobody_vouches_for_is_never_replaced(make, dav: FakeDav, src: Path) -> None:
    dav.files[KEY] = b"an older night's only copy"
    for exp in (expected_for(DATA, may_replace=False), Expected(len(DATA), None)):
        with pytest.raises(DestinationOccupied):
            make().put(str(src), URL, exp, Pace())
    assert "DELETE" not in dav.methods() and "PUT" not in dav.methods()
    assert dav.files[KEY] == b"an older night's only copy"


def test_other_size_is_deleted_without_asking_for_a_digest(make, dav: FakeDav, src: Path) -> None:
    dav.files[KEY] = b"partial"
    make().put(str(src), URL, expected_for(DATA), Pace())
    assert dav.methods() == ["HEAD", "DELETE", "PUT", "HEAD"]


def test_a_copy_without_digest_is_replaced_not_trusted(make, dav: FakeDav, src: Path) -> None:
    dav.files[KEY] = DATA
    dav.digest = "none"
    make(verify_upload="size").put(str(src), URL, expected_for(DATA), Pace())
    assert "DELETE" in dav.methods() and "PUT" in dav.methods()


# ------------------------------------------------------------------ what was sent is what was hashed
def test_source_changed_since_hashing_raises_and_removes_the_copy(make, dav: FakeDav, src: Path) -> None:
    recorded = expected_for(DATA)
    src.write_bytes(os.urandom(len(DATA)))        # same size, other bytes
    with pytest.raises(FileChanged):
        make().put(str(src), URL, recorded, Pace())
    assert dav.methods()[-1] == "DELETE" and KEY not in dav.files


@pytest.mark.parametrize("now", [DATA + b"more", DATA[:-1000]])
def test_source_grew_or_shrank_raises_file_changed(make, dav: FakeDav, src: Path, now: bytes) -> None:
    recorded = expected_for(DATA)
    src.write_bytes(now)
    with pytest.raises(FileChanged):
        make().put(str(src), URL, recorded, Pace())
    assert KEY not in dav.files and dav.methods()[-1] == "DELETE"


# ------------------------------------------------------------------ verification
def test_digest_mismatch_deletes_and_raises(make, dav: FakeDav, src: Path) -> None:
    dav.digest = "lie"
    with pytest.raises(ChecksumMismatch, match="0badf00d"):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert dav.methods()[-1] == "DELETE" and KEY not in dav.files


def test_stale_digest_of_a_previous_file_is_a_mismatch(make, dav: FakeDav, src: Path) -> None:
    # XRootD defect 4: a HEAD answered 200 with the previous file's digest
    dav.digest, dav.stale = "stale", b"the previous file"
    with pytest.raises(ChecksumMismatch):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert KEY not in dav.files


@pytest.mark.parametrize("digest", ["md5", "sha"])
def test_another_algorithms_digest_is_not_accepted(make, dav: FakeDav, src: Path, digest: str) -> None:
    dav.digest = digest
    with pytest.raises(PermanentError, match="Want-Digest"):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert KEY not in dav.files
    dav.files[KEY] = DATA
    assert make().stat(URL) == RemoteStat(len(DATA), None)


def test_no_digest_with_verify_adler32_is_permanent_and_says_what_to_do(make, dav: FakeDav, src: Path) -> None:
    dav.digest = "none"
    with pytest.raises(PermanentError) as ei:
        make(verify_upload="adler32").put(str(src), URL, expected_for(DATA), Pace())
    assert "Want-Digest" in str(ei.value) and 'verify_upload = "size"' in str(ei.value)
    assert KEY not in dav.files


def test_no_digest_with_verify_size_accepts_the_size(make, dav: FakeDav, src: Path) -> None:
    dav.digest = "none"
    got = make(verify_upload="size").put(str(src), URL, expected_for(DATA), Pace())
    assert got.size == len(DATA) and dav.files[KEY] == DATA


def test_size_mismatch_after_upload_is_a_mismatch_even_with_verify_size(make, dav: FakeDav, src: Path) -> None:
    dav.digest = "none"
    real_put = dav.do_PUT

    def truncating(request: httpx.Request, path: str) -> httpx.Response:
        r = real_put(request, path)
        dav.files[path] = dav.files[path][:-1]
        return r
    dav.do_PUT = truncating  # type: ignore[method-assign]
    with pytest.raises(ChecksumMismatch):
        make(verify_upload="size").put(str(src), URL, expected_for(DATA), Pace())
    assert KEY not in dav.files


# ------------------------------------------------------------------ parents
def test_missing_parents_are_made_with_mkcol_and_the_put_retried_once(make, dav: FakeDav, src: Path) -> None:
    dav.create_parents = False
    url = "https://dav.example.org:2880/data/lake1/a/b/c/f1.fits"
    make().put(str(src), url, expected_for(DATA), Pace())
    assert dav.files["/data/lake1/a/b/c/f1.fits"] == DATA
    assert dav.log == [("HEAD", "/data/lake1/a/b/c/f1.fits"), ("PUT", "/data/lake1/a/b/c/f1.fits"),
                       ("MKCOL", "/data/lake1/a/b/c/"), ("MKCOL", "/data/lake1/a/b/"),
                       ("MKCOL", "/data/lake1/a/"), ("MKCOL", "/data/lake1/a/b/"),
                       ("MKCOL", "/data/lake1/a/b/c/"), ("PUT", "/data/lake1/a/b/c/f1.fits"),
                       ("HEAD", "/data/lake1/a/b/c/f1.fits")]


def test_a_put_that_keeps_answering_409_is_permanent(make, dav: FakeDav, src: Path) -> None:
    dav.put_status = 409
    with pytest.raises(PermanentError, match="409"):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert dav.methods().count("PUT") == 2


def test_a_redirected_put_is_sent_to_the_data_server(make, dav: FakeDav, src: Path) -> None:
    # dCache/EOS doors redirect a PUT to a pool/FST node
    real_put = dav.do_PUT

    def door(request: httpx.Request, path: str) -> httpx.Response:
        if request.url.host == "dav.example.org":
            return httpx.Response(307, headers={"Location": "https://pool7.example.org:2881" + path + "?t=1"})
        return real_put(request, path)
    dav.do_PUT = door  # type: ignore[method-assign]
    make().put(str(src), URL, expected_for(DATA), Pace())
    puts = [r for r in dav.requests if r.method == "PUT"]
    assert [r.url.host for r in puts] == ["dav.example.org", "pool7.example.org"]
    assert puts[1].content == DATA and dav.files[KEY] == DATA


# ------------------------------------------------------------------ the first read of a version
class Scan:
    """A consumer like the FITS scan: sees every byte of exactly one pass."""

    def __init__(self) -> None:
        self.data = bytearray()

    def update(self, chunk: bytes | memoryview) -> None:
        self.data += chunk

    def reset(self) -> None:
        self.data.clear()


def test_a_first_read_hashes_while_sending_and_verifies(make, dav: FakeDav, src: Path) -> None:
    scan = Scan()
    got = make().put(str(src), URL, Expected(len(DATA), None, want_md5=True), Pace(), also=[scan])
    assert dav.files[KEY] == DATA and bytes(scan.data) == DATA
    assert (got.size, got.blake3, got.adler32, got.md5) == (
        len(DATA), blake3.blake3(DATA).hexdigest(), adler(DATA), hashlib.md5(DATA).hexdigest())
    assert dav.methods() == ["HEAD", "PUT", "HEAD"]        # verified by the digest of what was read


def test_a_first_read_replaces_whatever_is_there_without_asking_for_its_digest(make, dav: FakeDav,
                                                                                src: Path) -> None:
    dav.files[KEY] = DATA                                  # even identical bytes: unknown content is no match
    make().put(str(src), URL, Expected(len(DATA), None, may_replace=True), Pace())
    assert dav.methods() == ["HEAD", "DELETE", "PUT", "HEAD"]


def test_a_first_read_of_a_file_that_grew_is_file_changed(make, dav: FakeDav, src: Path) -> None:
    src.write_bytes(DATA + b"more")
    with pytest.raises(FileChanged, match="while it was being read"):
        make().put(str(src), URL, Expected(len(DATA), None), Pace())
    assert KEY not in dav.files


def test_a_first_read_lied_about_is_a_mismatch(make, dav: FakeDav, src: Path) -> None:
    dav.digest = "lie"
    with pytest.raises(ChecksumMismatch):
        make().put(str(src), URL, Expected(len(DATA), None, may_replace=True), Pace())
    assert KEY not in dav.files


def test_a_failed_upload_to_a_url_not_this_versions_own_deletes_nothing(make, dav: FakeDav, src: Path) -> None:
    """Review 3: the URL was found empty, but what lies there after a failed PUT or a failed check
    may be another writer's object: it is never deleted (a partial copy never counts anyway)."""
    dav.digest = "lie"
    with pytest.raises(ChecksumMismatch):
        make().put(str(src), URL, Expected(len(DATA), None), Pace())
    assert "DELETE" not in dav.methods() and KEY in dav.files


def test_a_resent_body_starts_the_consumers_over(make, dav: FakeDav, src: Path) -> None:
    dav.create_parents = False
    dav.dirs = {"/", "/data/"}
    scan = Scan()
    make().put(str(src), URL, Expected(len(DATA), None), Pace(), also=[scan])
    assert dav.methods().count("PUT") == 2 and bytes(scan.data) == DATA


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("status,kind", [(500, RetryableError), (502, RetryableError), (503, RetryableError),
                                         (507, RetryableError), (429, RetryableError), (408, RetryableError),
                                         (401, PermanentError), (403, PermanentError), (400, PermanentError),
                                         (405, PermanentError), (413, PermanentError)])
def test_put_status_mapping(make, dav: FakeDav, src: Path, status: int, kind: type[Exception]) -> None:
    dav.put_status = status
    with pytest.raises(kind) as ei:
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert type(ei.value) is kind
    if status in (401, 403):
        assert "storage refused" in str(ei.value)
    assert dav.methods()[-1] == "DELETE"           # whatever the server kept is removed


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
                                 httpx.WriteError("reset"), httpx.RemoteProtocolError("eof")])
def test_network_faults_are_retryable(make, dav: FakeDav, src: Path, exc: Exception) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise exc
    t = HttpTransport(transport=httpx.MockTransport(broken), chunk_size=CHUNK)
    with pytest.raises(RetryableError):
        t.put(str(src), URL, expected_for(DATA), Pace())
    with pytest.raises(RetryableError):
        t.stat(URL)
    with pytest.raises(RetryableError):
        t.delete(URL)


def test_head_refused_is_permanent(make, dav: FakeDav, src: Path) -> None:
    dav.status_for["HEAD"] = 403
    with pytest.raises(PermanentError, match="storage refused"):
        make().put(str(src), URL, expected_for(DATA), Pace())


def test_missing_source_is_file_vanished(make, dav: FakeDav, tmp_path: Path) -> None:
    with pytest.raises(FileVanished):
        make().put(str(tmp_path / "gone"), URL, expected_for(DATA), Pace())
    assert KEY not in dav.files


def test_unreadable_source_is_permanent(make, dav: FakeDav, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("edge_agent.localfs._open_regular_at", denied)   # what every transport opens with
    with pytest.raises(PermanentError, match="Permission denied"):
        make().put(str(src), URL, expected_for(DATA), Pace())


def test_status_error_taxonomy() -> None:
    assert isinstance(status_error(504, "x"), RetryableError)
    assert isinstance(status_error(404, "x"), PermanentError)
    assert "storage refused" in str(status_error(401, "PUT u"))


# ------------------------------------------------------------------ partial uploads
def test_failed_upload_removes_the_partial_copy(make, dav: FakeDav, src: Path) -> None:
    dav.put_error = httpx.ReadError("connection reset")
    with pytest.raises(RetryableError):
        make().put(str(src), URL, expected_for(DATA), Pace())
    assert KEY not in dav.files and dav.methods()[-1] == "DELETE"


def test_shutdown_during_upload_removes_the_partial_copy(make, dav: FakeDav, src: Path) -> None:
    dav.files[KEY] = b"left by an earlier, aborted attempt"
    with pytest.raises(ShuttingDown):
        make().put(str(src), URL, expected_for(DATA), Pace(fail_after=2))
    assert KEY not in dav.files and dav.methods()[-1] == "DELETE"


def test_a_failing_cleanup_does_not_hide_the_real_error(make, dav: FakeDav, src: Path) -> None:
    dav.put_status = 503
    dav.status_for["DELETE"] = 500
    with pytest.raises(RetryableError, match="503"):
        make().put(str(src), URL, expected_for(DATA), Pace())


# ------------------------------------------------------------------ stat and delete
def test_stat(make, dav: FakeDav) -> None:
    t = make()
    assert t.stat(URL) is None
    dav.files[KEY] = DATA
    assert t.stat(URL) == RemoteStat(len(DATA), adler(DATA))
    assert t.stat(URL, verify="recorded") == RemoteStat(len(DATA), adler(DATA))
    dav.digest = "none"
    assert t.stat(URL) == RemoteStat(len(DATA), None)
    assert dav.requests[-1].headers["Want-Digest"] == "adler32"


def test_delete_missing_is_success(make, dav: FakeDav) -> None:
    t = make()
    t.delete(URL)
    dav.files[KEY] = DATA
    t.delete(URL)
    assert KEY not in dav.files
    dav.status_for["DELETE"] = 503
    with pytest.raises(RetryableError):
        t.delete(URL)
    dav.status_for["DELETE"] = 403
    with pytest.raises(PermanentError, match="storage refused"):
        t.delete(URL)


# ------------------------------------------------------------------ credentials
def test_bearer_token_is_sent_and_never_logged(make, dav: FakeDav, src: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)                # httpx and httpcore log requests at INFO/DEBUG
    secret = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.sig"
    tokens = iter([secret] * 100)
    dav.files[KEY] = b"something else"
    with structlog.testing.capture_logs() as logs:
        make(token=lambda: next(tokens)).put(str(src), URL + "?authz=topsecret", expected_for(DATA), Pace())
        del dav.files[KEY]
        dav.put_status = 403
        with pytest.raises(PermanentError) as ei:
            make(token=lambda: secret).put(str(src), URL + "?authz=topsecret", expected_for(DATA), Pace())
    assert all(r.headers["Authorization"] == f"Bearer {secret}" for r in dav.requests)
    assert logs, "the delete-before-overwrite is logged"
    text = repr(logs) + str(ei.value)
    assert secret not in text and "topsecret" not in text and "Bearer" not in text
    assert secret not in caplog.text


def test_no_token_no_authorization_header(make, dav: FakeDav, src: Path) -> None:
    make(token=lambda: None).put(str(src), URL, expected_for(DATA), Pace())
    assert all("authorization" not in r.headers for r in dav.requests)


def test_shown_url_drops_credentials() -> None:
    assert shown_url("https://u:pw@h.example:443/p/f?authz=abc#x") == "https://h.example:443/p/f"


def test_client_certificate_is_loaded_into_the_ssl_context(tmp_path: Path) -> None:
    import ssl
    import subprocess
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=edge-agent-test"],
                       check=False, capture_output=True)
    if r.returncode != 0:
        pytest.skip("openssl not available")
    from edge_agent.transfer.http import ssl_context
    ctx = ssl_context(True, str(cert), str(key))
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
    proxy = tmp_path / "proxy.pem"
    proxy.write_bytes(cert.read_bytes() + key.read_bytes())
    ssl_context(False, str(proxy))                      # a proxy holds both
    assert ssl_context(False).verify_mode == ssl.CERT_NONE
    assert ssl_context(str(cert)).verify_mode == ssl.CERT_REQUIRED   # a CA file
    HttpTransport(verify=str(tmp_path), cert=str(cert), key=str(key)).close()   # a CA directory


# ------------------------------------------------------------------ digests
def test_parse_digests() -> None:
    assert parse_digests("adler32=0a1b2c3d, MD5=HUXZLQLMuI/KZ5KDcJPcOA==") == {
        "adler32": "0a1b2c3d", "md5": "HUXZLQLMuI/KZ5KDcJPcOA=="}
    assert parse_digests(None) == {} and parse_digests("garbage") == {}
    assert adler32_of_digest("ADLER32=0A1B2C3D") == "0a1b2c3d"
    assert adler32_of_digest("adler32=a1b2c3") == "00a1b2c3"        # leading zeros dropped by some servers
    assert adler32_of_digest("md5=HUXZLQLMuI/KZ5KDcJPcOA==") is None
    assert adler32_of_digest("adler32=zzzz") == "zzzz"             # compares unequal, never "no answer"
    assert md5_of_digest("md5=" + base64.b64encode(hashlib.md5(b"x").digest()).decode()) == \
        hashlib.md5(b"x").hexdigest()
    assert md5_of_digest("md5=" + hashlib.md5(b"x").hexdigest()) == hashlib.md5(b"x").hexdigest()


# ------------------------------------------------------------------ verification never overlaps uploads
def test_host_gate_verification_waits_for_uploads_in_flight() -> None:
    gates = HostGates()
    order: list[str] = []
    uploading, release = threading.Event(), threading.Event()

    def upload() -> None:
        with gates.shared("h:1"):
            order.append("upload start")
            uploading.set()
            release.wait(5)
            order.append("upload end")

    def verify() -> None:
        with gates.exclusive("h:1"):
            order.append("verify")

    t1 = threading.Thread(target=upload)
    t1.start()
    uploading.wait(5)
    t2 = threading.Thread(target=verify)
    t2.start()
    time.sleep(0.1)
    with gates.exclusive("other:1"):                  # another server is not held up
        order.append("other server")
    release.set()
    t1.join(5)
    t2.join(5)
    assert order == ["upload start", "other server", "upload end", "verify"]


def test_host_gate_new_uploads_wait_for_a_waiting_verification() -> None:
    gates = HostGates()
    order: list[str] = []
    in_upload, release = threading.Event(), threading.Event()

    def first() -> None:
        with gates.shared("h"):
            in_upload.set()
            release.wait(5)
            order.append("first upload done")

    def verify() -> None:
        with gates.exclusive("h"):
            order.append("verify")

    def second() -> None:
        with gates.shared("h"):
            order.append("second upload")

    threads = [threading.Thread(target=first)]
    threads[0].start()
    in_upload.wait(5)
    threads.append(threading.Thread(target=verify))
    threads[1].start()
    time.sleep(0.1)
    threads.append(threading.Thread(target=second))
    threads[2].start()
    time.sleep(0.1)
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["first upload done", "verify", "second upload"]


class Overlap:
    """Wraps the fake server: counts requests in flight per method while each takes a moment."""

    def __init__(self, dav: FakeDav) -> None:
        self.dav = dav
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.most_total = 0
        self.most_puts = 0
        self.mixed = False    # a HEAD/DELETE/MKCOL beside another request

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            busy = sum(self.now.values())
            others = busy - self.now.get("PUT", 0)
            if busy and (request.method != "PUT" or others):
                self.mixed = True
            self.now[request.method] = self.now.get(request.method, 0) + 1
            self.most_total = max(self.most_total, sum(self.now.values()))
            self.most_puts = max(self.most_puts, self.now.get("PUT", 0))
        time.sleep(0.005)
        try:
            with self.lock:   # the fake's dicts are not thread-safe
                return self.dav(request)
        finally:
            with self.lock:
                self.now[request.method] -= 1


def _upload_many(t: HttpTransport, src: Path, n: int = 12) -> None:
    def one(i: int) -> None:
        t.put(str(src), URL.replace("f1.fits", f"f{i}.fits"), expected_for(DATA), Pace())
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)


def test_by_default_one_request_at_a_time_per_server(dav: FakeDav, src: Path) -> None:
    # what XRootD 5.5.3 survives: see the module's docstring
    seam = Overlap(dav)
    with HttpTransport(transport=httpx.MockTransport(seam), chunk_size=CHUNK) as t:
        _upload_many(t, src)
    assert len(dav.files) == 12 and seam.most_total == 1 and not seam.mixed


def test_puts_may_run_side_by_side_when_allowed(dav: FakeDav, src: Path) -> None:
    seam = Overlap(dav)
    with HttpTransport(transport=httpx.MockTransport(seam), chunk_size=CHUNK, puts_per_server=0) as t:
        _upload_many(t, src)
    assert len(dav.files) == 12 and seam.most_puts > 1
    assert not seam.mixed          # ... but a HEAD, DELETE or MKCOL still runs alone


def test_isolation_off_lets_everything_overlap(dav: FakeDav, src: Path) -> None:
    seam = Overlap(dav)
    with HttpTransport(transport=httpx.MockTransport(seam), chunk_size=CHUNK, isolate_requests=False) as t:
        _upload_many(t, src)
    assert len(dav.files) == 12 and seam.most_total > 1 and seam.mixed


def test_verifications_of_one_server_are_serialised(make, dav: FakeDav) -> None:
    dav.files[KEY] = DATA
    inside = 0
    most = 0
    lock = threading.Lock()
    real_head = dav.do_HEAD

    def slow_head(request: httpx.Request, path: str) -> httpx.Response:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.02)
        with lock:
            inside -= 1
        return real_head(request, path)
    dav.do_HEAD = slow_head  # type: ignore[method-assign]
    t = make()
    threads = [threading.Thread(target=t.stat, args=(URL,)) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    assert most == 1


def test_exists_is_one_plain_head(make, dav: FakeDav) -> None:
    """Asked before a name is reserved: no checksum is computed by the server for it."""
    t = make()
    assert t.exists(URL) is False
    dav.files[KEY] = DATA
    assert t.exists(URL) is True
    assert dav.methods() == ["HEAD", "HEAD"]
    assert not [r for r in dav.requests if "want-digest" in {k.lower() for k in r.headers}]


def test_size_and_adler32_alone_never_make_another_writers_object_this_files_copy(make, dav: FakeDav,
                                                                                  tmp_path: Path) -> None:
    """Review 3: adler32 collides easily on small files ("run 121 ok" and "run 202 ok": 11 bytes,
    adler32 1486030e both). An object nobody in the ledger wrote is not taken for this file's copy."""
    mine, theirs = b"run 121 ok\n", b"run 202 ok\n"
    assert adler(mine) == adler(theirs)
    src = tmp_path / "mine"
    src.write_bytes(mine)
    dav.files[KEY] = theirs
    with pytest.raises(DestinationOccupied):
        make().put(str(src), URL, expected_for(mine, may_replace=False), Pace())
    assert dav.files[KEY] == theirs
    # written by a version with these very bytes (the ledger says so): recognised by size and adler32
    dav.files[KEY] = mine
    exp = Expected(len(mine), blake3.blake3(mine).hexdigest(), adler(mine), known_writer=True)
    assert make().put(str(src), URL, exp, Pace()).blake3 == exp.blake3


def test_open_streams_what_the_url_holds_and_a_missing_object_is_its_own_type(make, dav: FakeDav, src: Path) -> None:
    from edge_agent.errors import ObjectMissing
    t = make(token=lambda: "tok")
    t.put(str(src), URL, expected_for(DATA), Pace())
    with t.open(URL.replace("https://", "davs://")) as fh:
        assert fh.read() == DATA
    assert dav.requests[-1].method == "GET" and dav.requests[-1].headers["Authorization"] == "Bearer tok"
    with pytest.raises(ObjectMissing):
        t.open(URL + ".nothing").__enter__()
    dav.status_for["GET"] = 503
    with pytest.raises(RetryableError, match="HTTP 503"):
        t.open(URL).__enter__()


def test_open_through_a_client_given_uses_it_and_does_not_close_it(dav: FakeDav, src: Path) -> None:
    dav.files["/data/lake1/f"] = DATA
    with httpx.Client(transport=httpx.MockTransport(dav)) as client:
        t = HttpTransport(client=client, isolate_requests=False)
        with t.open("https://xrd.example/data/lake1/f") as fh:
            assert fh.read() == DATA
        t.close()
        assert not client.is_closed


# ------------------------------------------------------------------ two uploads to one server (issue 14, item 4)
class HoldBeforePut:
    """Fed the upload's read: its reset comes as the read starts, after the HEAD and before the PUT
    asks its gate. It says so and waits to be let go, so two uploads reach their PUTs together."""

    def __init__(self, go: threading.Event) -> None:
        self.ready, self.go = threading.Event(), go

    def reset(self) -> None:
        self.ready.set()
        assert self.go.wait(10)

    def update(self, chunk: bytes | memoryview) -> None:
        pass


class PutsMeet:
    """The fake server: each PUT is held until a second one is in flight beside it, or until the
    test lets it go (`release`); `most` is the most PUTs that were in flight at once."""

    def __init__(self, dav: FakeDav) -> None:
        self.dav, self.lock = dav, threading.Lock()
        self.now = self.most = 0
        self.arrived, self.release = threading.Event(), threading.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
                if self.now >= 2:
                    self.release.set()
            self.arrived.set()
            self.release.wait(10)   # a safety net only: what is asserted is what was seen
            with self.lock:
                self.now -= 1
        with self.lock:   # the fake's dicts are not thread-safe
            return self.dav(request)


class WatchedBoard(GateBoard):
    """The gates, telling when a holder first has to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked = threading.Event()

    def wait(self, gate) -> None:  # type: ignore[no-untyped-def]
        self.blocked.set()
        super().wait(gate)


def _two_puts(transports: list[HttpTransport], src: Path, go: threading.Event) -> tuple[list[threading.Thread],
                                                                                         list[HoldBeforePut]]:
    holds = [HoldBeforePut(go), HoldBeforePut(go)]

    def one(i: int) -> None:
        t = transports[i % len(transports)]
        t.put(str(src), URL.replace("f1.fits", f"two{i}.fits"), expected_for(DATA), Pace(), also=[holds[i]])
    threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for h in holds:
        assert h.ready.wait(10)      # both HEADs done: each upload is about to ask for its PUT
    return threads, holds


@pytest.mark.parametrize("gates", [{"puts_per_server": 2}, {"puts_per_server": 0}, {"isolate_requests": False}])
def test_two_puts_to_one_server_run_side_by_side_where_its_setting_allows(dav: FakeDav, src: Path,
                                                                         gates: dict[str, object]) -> None:
    seam, go = PutsMeet(dav), threading.Event()
    with HttpTransport(transport=httpx.MockTransport(seam), chunk_size=CHUNK, **gates) as t:  # type: ignore[arg-type]
        threads, _ = _two_puts([t], src, go)
        go.set()
        for th in threads:
            th.join(20)
    assert seam.most == 2
    assert dav.files["/data/lake1/night1/two0.fits"] == DATA and dav.files["/data/lake1/night1/two1.fits"] == DATA


@pytest.mark.parametrize("transports", [1, 2])
def test_two_puts_to_one_server_never_overlap_with_isolate_requests(dav: FakeDav, src: Path, transports: int) -> None:
    """The default (XRootD 5.5.3): the second PUT waits at the gate until the first has ended, also
    when it comes through another transport on the same board (another destination on that server)."""
    seam, go, board = PutsMeet(dav), threading.Event(), WatchedBoard()
    made = [HttpTransport(transport=httpx.MockTransport(seam), chunk_size=CHUNK, gate_board=board)
            for _ in range(transports)]
    threads, _ = _two_puts(made, src, go)
    go.set()
    assert seam.arrived.wait(10)      # one PUT is in flight ...
    assert board.blocked.wait(10)     # ... and the other waits at the gate (it holds the lock until it waits)
    seam.release.set()
    for th in threads:
        th.join(20)
    for t in made:
        t.close()
    assert seam.most == 1
    assert dav.files["/data/lake1/night1/two0.fits"] == DATA and dav.files["/data/lake1/night1/two1.fits"] == DATA


def test_verification_reuses_kept_alive_connections_only_without_isolation(dav: FakeDav, src: Path, make) -> None:
    make().put(str(src), URL, expected_for(DATA), Pace())
    assert dav.requests[-1].headers["Connection"] == "close"       # XRootD defect 4: a fresh connection
    make(isolate_requests=False).put(str(src), URL.replace("f1", "f2"), expected_for(DATA), Pace())
    assert dav.requests[-1].headers["Want-Digest"] == "adler32"
    assert "close" not in dav.requests[-1].headers.get("Connection", "")
