"""HttpTransport and XRootTransport against the real XRootD 5.5.3 of the test lake.

Besides uploads, these tests meet the server's known defects on purpose (see the shared notes
on storage endpoints) and show that the transports survive them: checksums cached per
whole-second mtime, partial files left by aborted PUTs, and a storage that lies, by corrupting
stored bytes or XRootD's checksum xattr behind its back.

Every root:// test runs on both clients, the XRootD Python bindings (PyPI xrootd 6.x, "python")
and the xrdcp/xrdfs commands (Debian's 5.5.3, "cli"); neither is skipped: where the bindings do
not import, their half fails. What a 6.x client meets in the 5.5.3 server: test_xroot_versions.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support import require_xrootd_bindings

from edge_agent.errors import ChecksumMismatch, ObjectMissing, ShuttingDown
from edge_agent.hashing import hash_file
from edge_agent.transfer.base import Expected
from edge_agent.transfer.http import HttpTransport, adler32_of_digest
from edge_agent.transfer.xroot import XRootTransport

from .storage import Area, adler, expected_for, no_pace

pytestmark = pytest.mark.lake

MiB = 1024 * 1024
CKS_XATTR = "user.XrdCks.adler32"


def fresh_head(url: str) -> httpx.Response:
    """HEAD + Want-Digest on a connection of its own (XRootD defect 4: never reuse one for this)."""
    with httpx.Client(timeout=60) as c:
        return c.head(url, headers={"Want-Digest": "adler32"})


@pytest.fixture
def http() -> Iterator[HttpTransport]:
    t = HttpTransport(timeout=60, chunk_size=4 * MiB)
    yield t
    t.close()


def corrupt_in_place(path: Path, keep_mtime: bool) -> None:
    """Flip one byte of a stored file behind XRootD's back (size unchanged)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        # what a writer at a later second would leave: XRootD sees a new mtime
        os.utime(path, (st.st_atime + 2, st.st_mtime + 2))


def lie_in_xattr(path: Path, value: str = "0badf00d") -> None:
    """Rewrite the adler32 XRootD cached in its xattr (XrdCksData: name[16], fmTime[8], csTime[4],
    reserved[3], length[1], value[64]), keeping the mtime key so that the server believes it."""
    raw = bytearray(os.getxattr(path, CKS_XATTR))
    assert raw[:7] == b"adler32" and raw[31] == 4, raw[:40]
    raw[32:36] = bytes.fromhex(value)
    os.setxattr(path, CKS_XATTR, bytes(raw))


# ------------------------------------------------------------------ HTTP
@pytest.mark.parametrize("size", [1, MiB, 20 * MiB], ids=["1B", "1MiB", "20MiB"])
def test_http_upload_is_verified_by_the_server(http: HttpTransport, area: Area, write_src, size: int) -> None:
    data = os.urandom(size)
    src = write_src("f", data)
    url = area.http(f"night1/f{size}")
    got = http.put(src, url, expected_for(data), no_pace)
    assert got.adler32 == adler(data)
    assert hash_file(area.local(f"night1/f{size}")).blake3 == got.blake3
    h = fresh_head(url)
    assert adler32_of_digest(h.headers.get("Digest")) == adler(data)
    st = http.stat(url)
    assert st is not None and (st.size, st.adler32) == (size, adler(data))


def test_http_reupload_of_an_identical_copy_is_a_no_op(http: HttpTransport, area: Area, write_src) -> None:
    data = os.urandom(MiB)
    src, url = write_src("f", data), area.http("same")
    http.put(src, url, expected_for(data), no_pace)
    before = area.local("same").stat()
    time.sleep(1.1)           # a rewrite would show in mtime
    http.put(src, url, expected_for(data), no_pace)
    after = area.local("same").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_http_overwrite_within_the_same_second_reports_the_new_checksum(http: HttpTransport, area: Area,
                                                                        write_src) -> None:
    """XRootD defect 3: the checksum is cached per whole-second mtime. The delete-first rule
    makes the second upload a new file, whose checksum is computed afresh."""
    for attempt in range(5):
        a, b = os.urandom(MiB), os.urandom(MiB)
        url = area.http(f"over{attempt}")
        http.put(write_src("a", a), url, expected_for(a), no_pace)       # verified: checksum now cached
        t_a = int(area.local(f"over{attempt}").stat().st_mtime)
        http.put(write_src("b", b), url, expected_for(b), no_pace)
        t_b = int(area.local(f"over{attempt}").stat().st_mtime)
        st = http.stat(url)
        assert st is not None and st.adler32 == adler(b)
        assert adler32_of_digest(fresh_head(url).headers.get("Digest")) == adler(b)
        if t_a == t_b:
            return
    pytest.fail("could not get two uploads into the same second in 5 tries")


def test_http_defect_3_is_real_and_the_transport_repairs_it(http: HttpTransport, area: Area, write_src) -> None:
    """Without delete-first, an overwrite in the same second keeps reporting the old checksum."""
    seen_stale = False
    for attempt in range(5):
        a, b = os.urandom(MiB), os.urandom(MiB)
        url = area.http(f"raw{attempt}")
        with httpx.Client(timeout=60) as c:
            assert c.put(url, content=a).status_code in (200, 201)
        assert adler32_of_digest(fresh_head(url).headers.get("Digest")) == adler(a)    # cached now
        t0 = int(area.local(f"raw{attempt}").stat().st_mtime)
        with httpx.Client(timeout=60) as c:
            assert c.put(url, content=b).status_code in (200, 201)                   # overwrite in place
        if int(area.local(f"raw{attempt}").stat().st_mtime) != t0:
            continue
        st = http.stat(url)
        assert st is not None
        seen_stale = st.adler32 == adler(a)
        # the stale answer is a mismatch for b: put() deletes it and uploads again
        http.put(write_src("b", b), url, expected_for(b), no_pace)
        st = http.stat(url)
        assert st is not None and st.adler32 == adler(b)
        break
    else:
        pytest.fail("could not get two PUTs into the same second in 5 tries")
    assert seen_stale, "XRootD no longer reports the old checksum after a same-second overwrite (fixed?)"


def test_http_corrupted_bytes_are_reported_and_repaired(http: HttpTransport, area: Area, write_src) -> None:
    data = os.urandom(MiB)
    src, url = write_src("f", data), area.http("rot")
    http.put(src, url, expected_for(data), no_pace)
    corrupt_in_place(area.local("rot"), keep_mtime=False)
    st = http.stat(url)
    assert st is not None and st.size == len(data) and st.adler32 != adler(data)
    assert st.adler32 == adler(area.local("rot").read_bytes())
    # put() does not take it for the identical copy: it replaces it
    http.put(src, url, expected_for(data), no_pace)
    assert area.local("rot").read_bytes() == data


def test_http_bitrot_that_keeps_mtime_is_invisible_to_a_checksum_query(http: HttpTransport, area: Area,
                                                                       write_src) -> None:
    """A limit, not a feature: XRootD answers the cached checksum while mtime is unchanged, so
    only reading the bytes back finds this corruption."""
    data = os.urandom(MiB)
    url = area.http("bitrot")
    http.put(write_src("f", data), url, expected_for(data), no_pace)
    corrupt_in_place(area.local("bitrot"), keep_mtime=True)
    st = http.stat(url)
    assert st is not None and st.adler32 == adler(data)
    assert adler(area.local("bitrot").read_bytes()) != adler(data)


def test_http_a_lying_checksum_xattr_is_a_mismatch(http: HttpTransport, area: Area, write_src) -> None:
    data = os.urandom(MiB)
    src, url = write_src("f", data), area.http("lie")
    http.put(src, url, expected_for(data), no_pace)
    lie_in_xattr(area.local("lie"))
    st = http.stat(url)
    assert st is not None and st.adler32 == "0badf00d"
    http.put(src, url, expected_for(data), no_pace)            # not identical: replaced, verified
    st = http.stat(url)
    assert st is not None and st.adler32 == adler(data)


class CorruptAfterPut(httpx.BaseTransport):
    """The network seam with a storage that damages what it was given: every successful PUT
    is followed by a flipped byte on disk, before the client can verify."""

    def __init__(self, local: Callable[[str], Path]) -> None:
        self.local = local
        self.pool = httpx.HTTPTransport()
        self.fresh = httpx.HTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        t = self.fresh if request.method == "HEAD" else self.pool
        r = t.handle_request(request)
        if request.method == "PUT" and r.status_code in (200, 201, 204):
            r.read()
            corrupt_in_place(self.local(request.url.path), keep_mtime=False)
        return r

    def close(self) -> None:
        self.pool.close()
        self.fresh.close()


def test_http_put_verification_catches_a_storage_that_damaged_the_copy(area: Area, write_src) -> None:
    data = os.urandom(MiB)
    url = area.http("damaged")
    seam = CorruptAfterPut(lambda path: area.lake.data_dir / path.lstrip("/"))
    with HttpTransport(transport=seam) as t, pytest.raises(ChecksumMismatch):
        t.put(write_src("f", data), url, expected_for(data), no_pace)
    assert not area.local("damaged").exists()


def test_http_aborted_upload_leaves_nothing(http: HttpTransport, area: Area, write_src) -> None:
    data = os.urandom(20 * MiB)
    url = area.http("aborted")
    sent: list[int] = []

    def pace(n: int) -> None:
        if sent:
            raise ShuttingDown("stop")
        sent.append(n)
    with pytest.raises(ShuttingDown):
        http.put(write_src("f", data), url, expected_for(data), pace)
    time.sleep(0.5)
    assert http.stat(url) is None and not area.local("aborted").exists()


def test_http_defect_2_an_aborted_put_leaves_a_partial_file(area: Area) -> None:
    """Why a replica is never counted by its existence."""
    url = area.http("partial")

    def body() -> Iterator[bytes]:
        yield os.urandom(4 * MiB)
        time.sleep(0.3)
        raise RuntimeError("the client dies")
    with httpx.Client(timeout=60) as c, pytest.raises(RuntimeError):
        c.put(url, content=body(), headers={"Content-Length": str(20 * MiB)})
    time.sleep(0.5)
    h = fresh_head(url)
    if h.status_code == 404:
        pytest.skip("this XRootD removed the aborted upload")
    assert h.status_code == 200 and int(h.headers["Content-Length"]) < 20 * MiB


# ------------------------------------------------------------------ root://
# both clients, always: "python" fails (never skips) where the bindings do not import
BACKENDS = ["cli", "python"]


@pytest.fixture(params=BACKENDS)
def xroot(request: pytest.FixtureRequest) -> XRootTransport:
    if request.param == "python":
        require_xrootd_bindings()
    t = XRootTransport(backend=request.param, timeout=60, chunk_size=4 * MiB)
    assert t.backend == request.param
    return t


def xrdfs_checksum(area: Area, name: str) -> str:
    import subprocess
    out = subprocess.run(["xrdfs", area.lake.root_url, "query", "checksum", f"/{area.rel}/{name}"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[0] == "adler32"
    return out[1]


@pytest.mark.parametrize("size", [1, MiB, 20 * MiB], ids=["1B", "1MiB", "20MiB"])
def test_root_upload_and_checksum_query(xroot: XRootTransport, area: Area, write_src, size: int) -> None:
    data = os.urandom(size)
    url = area.root(f"night1/r{size}")
    got = xroot.put(write_src("f", data), url, expected_for(data), no_pace)
    assert got.adler32 == adler(data)
    assert xrdfs_checksum(area, f"night1/r{size}") == adler(data)
    assert hash_file(area.local(f"night1/r{size}")).blake3 == got.blake3
    # the same file over HTTP
    assert adler32_of_digest(fresh_head(area.http(f"night1/r{size}")).headers.get("Digest")) == adler(data)


def test_http_and_root_never_replace_bytes_the_version_does_not_own(http: HttpTransport, xroot: XRootTransport,
                                                                   area: Area, write_src) -> None:
    from edge_agent.errors import DestinationOccupied
    old, new = os.urandom(MiB), os.urandom(MiB)
    for transport, url, name in ((http, area.http("owned-h"), "owned-h"), (xroot, area.root("owned-r"), "owned-r")):
        transport.put(write_src("old", old), url, expected_for(old), no_pace)
        for exp in (expected_for(new, may_replace=False), Expected(len(new), None)):
            with pytest.raises(DestinationOccupied):
                transport.put(write_src("new", new), url, exp, no_pace)
        assert area.local(name).read_bytes() == old


def test_root_a_copy_no_one_may_replace_is_created_only_where_nothing_is(xroot: XRootTransport, area: Area,
                                                                        write_src) -> None:
    """With the bindings the open itself is exclusive (the server refuses it if anything is there);
    both backends end the same: written where nothing was, other bytes never touched, the same
    bytes by a known writer counted."""
    import dataclasses

    from edge_agent.errors import DestinationOccupied
    a, b = os.urandom(MiB), os.urandom(MiB)
    url = area.root("excl")
    got = xroot.put(write_src("a", a), url, expected_for(a, may_replace=False), no_pace)
    assert got.adler32 == adler(a) and area.local("excl").read_bytes() == a
    with pytest.raises(DestinationOccupied):
        xroot.put(write_src("b", b), url, expected_for(b, may_replace=False), no_pace)
    assert area.local("excl").read_bytes() == a
    known = dataclasses.replace(expected_for(a, may_replace=False), known_writer=True)
    assert xroot.put(write_src("a", a), url, known, no_pace).adler32 == adler(a)
    assert area.local("excl").read_bytes() == a


def test_root_reupload_identical_overwrite_and_delete(xroot: XRootTransport, area: Area, write_src) -> None:
    a, b = os.urandom(MiB), os.urandom(MiB)
    url = area.root("r")
    xroot.put(write_src("a", a), url, expected_for(a), no_pace)
    before = area.local("r").stat()
    xroot.put(write_src("a", a), url, expected_for(a), no_pace)          # identical: nothing sent
    after = area.local("r").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    xroot.put(write_src("b", b), url, expected_for(b), no_pace)          # other bytes: delete first
    st = xroot.stat(url)
    assert st is not None and st.adler32 == adler(b) and xrdfs_checksum(area, "r") == adler(b)
    xroot.delete(url)
    assert xroot.stat(url) is None and not area.local("r").exists()
    xroot.delete(url)


def test_root_a_lying_checksum_xattr_is_a_mismatch(xroot: XRootTransport, area: Area, write_src) -> None:
    data = os.urandom(MiB)
    src, url = write_src("f", data), area.root("lie")
    xroot.put(src, url, expected_for(data), no_pace)
    lie_in_xattr(area.local("lie"))
    st = xroot.stat(url)
    assert st is not None and st.adler32 == "0badf00d"
    xroot.put(src, url, expected_for(data), no_pace)
    st = xroot.stat(url)
    assert st is not None and st.adler32 == adler(data)


def test_root_aborted_upload_leaves_nothing(xroot: XRootTransport, area: Area, write_src) -> None:
    data = os.urandom(20 * MiB)
    url = area.root("aborted")
    sent: list[int] = []

    def pace(n: int) -> None:
        if sent:
            raise ShuttingDown("stop")
        sent.append(n)
    with pytest.raises(ShuttingDown):
        xroot.put(write_src("f", data), url, expected_for(data), pace)
    time.sleep(0.5)
    assert xroot.stat(url) is None and not area.local("aborted").exists()


def test_root_open_streams_the_bytes_and_a_missing_file_is_object_missing(xroot: XRootTransport, area: Area,
                                                                        write_src) -> None:
    """Reads (the access API, the audit's --deep) go through the same client as the uploads."""
    data = os.urandom(3 * MiB + 17)
    url = area.root("read/me")
    xroot.put(write_src("f", data), url, expected_for(data), no_pace)
    with xroot.open(url) as fh:
        assert fh.read() == data
    with pytest.raises(ObjectMissing), xroot.open(area.root("read/nothing")) as fh:
        fh.read()
