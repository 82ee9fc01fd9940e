"""The S3 transport against an httpx.MockTransport that behaves like a pre-signed S3 endpoint:
signatures per operation, expiry, ETag = MD5 of a single PUT, ranged reads."""

from __future__ import annotations

import dataclasses

import hashlib
import zlib
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import blake3
import httpx
import pytest

from edge_agent.errors import ChecksumMismatch, FileChanged, PermanentError, RetryableError
from edge_agent.transfer.base import Expected
from edge_agent.transfer.s3 import MAX_SINGLE_PUT, S3Transport, etag_md5, object_size

PFN = "https://s3.test:7443/bucket/test/a1/62/f1"


class FakeS3:
    """Objects by path; a URL is valid when its `sig` was issued for the request's method and
    is not in `expired`. Every request is kept for the asserts."""

    METHOD: ClassVar[dict[str, str]] = {"read": "GET", "write": "PUT", "delete": "DELETE"}

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.issued: list[tuple[str, str]] = []     # (operation, pfn) the signer was asked for
        self.expired: set[int] = set()              # numbers of issued URLs that are expired
        self.requests: list[httpx.Request] = []
        self.fail_put: Exception | None = None
        self.put_status: int | None = None

    def sign(self, op: str, url: str) -> str:
        self.issued.append((op, url))
        return f"{url}?sig={op}-{len(self.issued)}&X-Amz-Signature=secret{len(self.issued)}"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        q = parse_qs(urlsplit(str(request.url)).query)
        sig = (q.get("sig") or [""])[0]
        op, _, n = sig.partition("-")
        if self.METHOD.get(op) != request.method or int(n or 0) in self.expired:
            return httpx.Response(403, text="<Error><Code>AccessDenied</Code></Error>")
        path = request.url.path
        if request.method == "PUT":
            assert "Transfer-Encoding" not in request.headers, "S3 needs Content-Length, never chunked"
            body = request.read()
            assert int(request.headers["Content-Length"]) == len(body)
            if self.fail_put:
                raise self.fail_put
            if self.put_status:
                return httpx.Response(self.put_status)
            self.objects[path] = body
            self.etags[path] = hashlib.md5(body).hexdigest()
            return httpx.Response(200, headers={"ETag": f'"{self.etags[path]}"'})
        if request.method == "DELETE":
            self.objects.pop(path, None)
            return httpx.Response(204)
        if path not in self.objects:
            return httpx.Response(404)
        data = self.objects[path]
        etag = {"ETag": f'"{self.etags[path]}"'}
        if request.headers.get("Range") == "bytes=0-0":
            if not data:
                return httpx.Response(416, headers={"Content-Range": "bytes */0", **etag})
            return httpx.Response(206, content=data[:1], headers={"Content-Range": f"bytes 0-0/{len(data)}",
                                                                  **etag})
        return httpx.Response(200, content=data, headers=etag)

    def methods(self) -> list[str]:
        return [r.method for r in self.requests]


def expected_of(data: bytes, md5: bool = True, may_replace: bool = True) -> Expected:
    # may_replace: the pipeline's word that the URL is this version's own (found empty, or its bad copy)
    return Expected(len(data), blake3.blake3(data).hexdigest(), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
                    hashlib.md5(data).hexdigest() if md5 else None, may_replace=may_replace)


@pytest.fixture
def s3() -> FakeS3:
    return FakeS3()


def transport(s3: FakeS3, **kw: object) -> S3Transport:
    return S3Transport(s3.sign, transport=httpx.MockTransport(s3), chunk_size=4096, **kw)  # type: ignore[arg-type]


def write(tmp_path: Path, data: bytes, name: str = "f1") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_one_signed_put_per_file_hashed_in_the_same_pass(tmp_path: Path, s3: FakeS3) -> None:
    data = bytes(range(256)) * 100
    t = transport(s3)
    got = t.put(write(tmp_path, data), PFN, expected_of(data), lambda n: None)
    assert got.md5 == hashlib.md5(data).hexdigest() and got.size == len(data)
    assert s3.objects["/bucket/test/a1/62/f1"] == data
    # read (is it there?), write, read (verify): each on its own signature, one PUT
    assert [op for op, _ in s3.issued] == ["read", "write", "read"]
    assert all(url == PFN for _, url in s3.issued)
    assert s3.methods() == ["GET", "PUT", "GET"]
    assert all("Authorization" not in r.headers for r in s3.requests)
    other = b"x" * 10
    t.put(write(tmp_path, other, "f2"), PFN.replace("f1", "f2"), expected_of(other), lambda n: None)
    assert [op for op, _ in s3.issued][3:] == ["read", "write", "read"], "a new signed URL for every file"


def test_md5_is_computed_in_the_pass_even_when_none_was_recorded(tmp_path: Path, s3: FakeS3) -> None:
    data = b"abc" * 1000
    got = transport(s3).put(write(tmp_path, data), PFN, expected_of(data, md5=False), lambda n: None)
    assert got.md5 == hashlib.md5(data).hexdigest()


def test_identical_object_is_not_sent_again(tmp_path: Path, s3: FakeS3) -> None:
    data = b"same" * 500
    s3.objects["/bucket/test/a1/62/f1"] = data
    s3.etags["/bucket/test/a1/62/f1"] = hashlib.md5(data).hexdigest()
    transport(s3).put(write(tmp_path, data), PFN, expected_of(data), lambda n: None)
    assert s3.methods() == ["GET"]


def test_expired_put_url_is_renewed_once(tmp_path: Path, s3: FakeS3) -> None:
    data = b"late" * 2000
    s3.expired = {2}        # the first write URL (the 2nd URL issued) expired before the PUT
    got = transport(s3).put(write(tmp_path, data), PFN, expected_of(data), lambda n: None)
    assert [op for op, _ in s3.issued] == ["read", "write", "write", "read"]
    assert s3.methods() == ["GET", "PUT", "PUT", "GET"]
    assert got.md5 == hashlib.md5(data).hexdigest() and s3.objects["/bucket/test/a1/62/f1"] == data


def test_a_second_403_is_permanent_and_names_no_signature(tmp_path: Path, s3: FakeS3) -> None:
    data = b"no" * 100
    s3.expired = {2, 3}
    with pytest.raises(PermanentError) as err:
        transport(s3).put(write(tmp_path, data), PFN, expected_of(data), lambda n: None)
    assert "403" in str(err.value) and "secret" not in str(err.value) and "sig=" not in str(err.value)
    assert "bucket/test/a1/62/f1" not in s3.objects


def test_expired_read_url_is_renewed(s3: FakeS3) -> None:
    s3.objects["/bucket/k"] = b"hello"
    s3.etags["/bucket/k"] = hashlib.md5(b"hello").hexdigest()
    s3.expired = {1}
    st = transport(s3).stat("https://s3.test:7443/bucket/k")
    assert st is not None and (st.size, st.md5, st.adler32) == (5, hashlib.md5(b"hello").hexdigest(), None)
    assert [op for op, _ in s3.issued] == ["read", "read"]


def test_etag_mismatch_is_a_failed_copy_removed_with_a_signed_delete(tmp_path: Path, s3: FakeS3) -> None:
    data = b"payload" * 300
    real_call = s3.__call__

    def lying(request: httpx.Request) -> httpx.Response:
        r = real_call(request)
        if request.method == "PUT":
            s3.etags[request.url.path] = "0" * 32      # the storage claims other bytes
        return r

    t = S3Transport(s3.sign, transport=httpx.MockTransport(lying))
    with pytest.raises(ChecksumMismatch, match="ETag"):
        t.put(write(tmp_path, data), PFN, expected_of(data), lambda n: None)
    assert s3.methods()[-1] == "DELETE" and s3.issued[-1] == ("delete", PFN)
    assert "/bucket/test/a1/62/f1" not in s3.objects


def test_multipart_etag_never_counts_as_md5() -> None:
    assert etag_md5('"0123456789abcdef0123456789abcdef-3"') is None
    assert etag_md5('W/"0123456789abcdef0123456789abcdef"') is None
    assert etag_md5('"0123456789ABCDEF0123456789ABCDEF"') == "0123456789abcdef0123456789abcdef"
    assert etag_md5(None) is None


def test_partial_upload_is_removed_with_a_signed_delete(tmp_path: Path, s3: FakeS3) -> None:
    data = b"z" * 50_000
    s3.objects["/bucket/test/a1/62/f1"] = b"old half"
    s3.etags["/bucket/test/a1/62/f1"] = "1" * 32
    s3.fail_put = httpx.WriteError("connection reset while sending")
    with pytest.raises(RetryableError):
        transport(s3).put(write(tmp_path, data), PFN, dataclasses.replace(expected_of(data), may_replace=True),
                          lambda n: None)
    assert s3.issued[-1] == ("delete", PFN) and s3.methods()[-1] == "DELETE"
    assert "/bucket/test/a1/62/f1" not in s3.objects


def test_server_error_on_put_is_retryable_and_cleans_up(tmp_path: Path, s3: FakeS3) -> None:
    data = b"q" * 100
    s3.put_status = 503
    with pytest.raises(RetryableError):
        transport(s3).put(write(tmp_path, data), PFN, expected_of(data), lambda n: None)
    assert s3.methods()[-1] == "DELETE"


def test_file_changed_during_upload_is_removed(tmp_path: Path, s3: FakeS3) -> None:
    data = b"a" * 1000
    path = write(tmp_path, data)
    stale = expected_of(b"b" * 1000)            # hashed earlier, other bytes now
    with pytest.raises(FileChanged):
        transport(s3).put(path, PFN, stale, lambda n: None)
    assert s3.methods()[-1] == "DELETE" and "/bucket/test/a1/62/f1" not in s3.objects


def test_more_than_one_put_can_carry_is_refused_before_anything_is_signed(s3: FakeS3) -> None:
    huge = Expected(MAX_SINGLE_PUT + 1, "b" * 64, "00000001", "c" * 32)
    with pytest.raises(PermanentError, match="5368709120 bytes"):
        transport(s3).put("/nonexistent/huge.fits", PFN, huge, lambda n: None)
    assert s3.issued == [] and s3.requests == []


def test_exactly_the_limit_is_allowed(tmp_path: Path, s3: FakeS3) -> None:
    data = b"1234"
    got = transport(s3, max_object_bytes=4).put(write(tmp_path, data), PFN, expected_of(data), lambda n: None)
    assert got.size == 4


def test_empty_object_and_missing_object(s3: FakeS3) -> None:
    s3.objects["/bucket/empty"] = b""
    s3.etags["/bucket/empty"] = hashlib.md5(b"").hexdigest()
    t = transport(s3)
    st = t.stat("https://s3.test:7443/bucket/empty")
    assert st is not None and st.size == 0 and st.md5 == hashlib.md5(b"").hexdigest()
    assert t.stat("https://s3.test:7443/bucket/nothing") is None


def test_delete_is_signed_and_idempotent(s3: FakeS3) -> None:
    s3.objects["/bucket/k"] = b"1"
    t = transport(s3)
    t.delete("https://s3.test:7443/bucket/k")
    t.delete("https://s3.test:7443/bucket/k")
    assert [op for op, _ in s3.issued] == ["delete", "delete"] and s3.objects == {}


def test_object_size_reads_content_range() -> None:
    r = httpx.Response(206, headers={"Content-Range": "bytes 0-0/123"})
    assert object_size(r) == 123
    assert object_size(httpx.Response(416, headers={"Content-Range": "bytes */0"})) == 0
    assert object_size(httpx.Response(206, headers={"Content-Range": "garbage"})) is None


def test_a_failed_put_to_a_url_not_this_versions_own_deletes_nothing(tmp_path: Path, s3: FakeS3) -> None:
    data = b"q" * 100
    s3.put_status = 503
    with pytest.raises(RetryableError):
        transport(s3).put(write(tmp_path, data), PFN, expected_of(data, may_replace=False), lambda n: None)
    assert "DELETE" not in s3.methods()


def test_open_reads_through_a_signed_url_renewed_once_if_refused(s3: FakeS3) -> None:
    from edge_agent.errors import ObjectMissing
    s3.objects["/bucket/k"] = b"hello" * 3000
    s3.etags["/bucket/k"] = hashlib.md5(s3.objects["/bucket/k"]).hexdigest()
    s3.expired = {1}
    with transport(s3).open("https://s3.test:7443/bucket/k?X-Amz-Signature=old") as fh:
        assert fh.read() == b"hello" * 3000
    assert s3.issued == [("read", "https://s3.test:7443/bucket/k")] * 2    # signed afresh, unsigned PFN
    with pytest.raises(ObjectMissing):
        transport(s3).open("https://s3.test:7443/bucket/none").__enter__()
