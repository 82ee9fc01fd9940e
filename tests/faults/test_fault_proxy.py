"""The fault proxy itself (tests/faults/fault_proxy.py), against a small in-process HTTP/1.1 server:
it forwards keep-alive connections, Content-Length and chunked bodies intact, and each fault does
what it says, as often as it is told, and is counted."""

from __future__ import annotations

import http.server
import os
import threading
import zlib
from collections.abc import Iterator
from typing import ClassVar

import httpx
import pytest

from tests.faults.fault_proxy import FaultProxy, lie_about_adler32, on, running


class Store(http.server.BaseHTTPRequestHandler):
    """PUT keeps a body, HEAD answers its size and adler32 Digest, GET sends it back chunked."""
    protocol_version = "HTTP/1.1"
    files: ClassVar[dict[str, bytes]] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_PUT(self) -> None:
        n = int(self.headers["Content-Length"])
        Store.files[self.path] = self.rfile.read(n)
        self._send(201, b"ok")

    def do_HEAD(self) -> None:
        data = Store.files.get(self.path)
        if data is None:
            self._send(404, b"", head=True)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Digest", f"adler32={zlib.adler32(data) & 0xFFFFFFFF:08x}")
        self.end_headers()

    def do_GET(self) -> None:
        data = Store.files.get(self.path, b"")
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(data), 10_000):
            part = data[i:i + 10_000]
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _send(self, status: int, body: bytes, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    Store.files.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Store)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        with running(f"http://127.0.0.1:{server.server_address[1]}") as p:
            yield p
    finally:
        server.shutdown()
        server.server_close()


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def test_forwards_keep_alive_and_bodies_intact(proxy: FaultProxy) -> None:
    data = os.urandom(3_000_000)
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        ports = set()
        for i in range(3):
            r = c.put(f"/f{i}", content=iter([data[:1_000_000], data[1_000_000:]]),
                      headers={"Content-Length": str(len(data))})
            assert r.status_code == 201 and r.text == "ok"
            ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
        h = c.head("/f1")
        got = c.get("/f2")
    assert len(ports) == 1                                   # one client connection, kept alive
    assert Store.files["/f0"] == data
    assert h.headers["Digest"] == f"adler32={adler(data)}" and h.headers["Content-Length"] == str(len(data))
    assert got.content == data                               # a chunked answer relayed whole
    assert proxy.hits() == 0 and [x[2] for x in proxy.seen("PUT")] == ["201"] * 3


def test_reset_mid_upload_once_then_forwards(proxy: FaultProxy) -> None:
    data = os.urandom(2_000_000)
    proxy.reset(after_bytes=100_000, match=on("PUT"), times=1)
    with pytest.raises(httpx.TransportError):
        httpx.put(proxy.url + "/a", content=data, timeout=30)
    assert Store.files.get("/a") != data                     # the server never got the whole body
    assert httpx.put(proxy.url + "/a", content=data, timeout=30).status_code == 201
    assert Store.files["/a"] == data and proxy.hits("reset") == 1


def test_answers_5xx_without_forwarding_as_often_as_told(proxy: FaultProxy) -> None:
    proxy.answer(503, match=on("PUT", path="/b"), times=2, headers={"ExceptionClass": "DatabaseException"})
    codes = [httpx.put(proxy.url + "/b", content=b"x" * 10, timeout=30) for _ in range(3)]
    assert [r.status_code for r in codes] == [503, 503, 201]
    assert codes[0].headers["ExceptionClass"] == "DatabaseException"
    assert proxy.hits("answer") == 2 and Store.files["/b"] == b"x" * 10


def test_stall_outlasts_the_client_timeout(proxy: FaultProxy) -> None:
    with proxy.stall(30, match=on("HEAD")), pytest.raises(httpx.ReadTimeout):
        httpx.head(proxy.url + "/c", timeout=0.5)
    assert httpx.head(proxy.url + "/c", timeout=30).status_code == 404    # removed: forwarded again


def test_stall_after_forwarding_lands_the_upload_but_never_answers(proxy: FaultProxy) -> None:
    proxy.stall(30, match=on("PUT"), times=1, forward=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.put(proxy.url + "/d", content=b"landed", timeout=1)
    assert Store.files["/d"] == b"landed"


def test_truncated_answer_is_a_protocol_error(proxy: FaultProxy) -> None:
    Store.files["/e"] = os.urandom(50_000)
    proxy.truncate(keep_bytes=1000, match=on("GET"), times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(proxy.url + "/e", timeout=30)
    assert httpx.get(proxy.url + "/e", timeout=30).content == Store.files["/e"]


def test_wrong_digest_and_delay(proxy: FaultProxy) -> None:
    Store.files["/g"] = data = b"some bytes"
    with proxy.wrong_digest(match=on("HEAD")):
        lied = httpx.head(proxy.url + "/g", timeout=30).headers["Digest"]
    assert lied == f"adler32={int(adler(data), 16) ^ 0xFFFFFFFF:08x}" != f"adler32={adler(data)}"
    assert httpx.head(proxy.url + "/g", timeout=30).headers["Digest"] == f"adler32={adler(data)}"
    proxy.delay(0.2, times=1)
    assert httpx.head(proxy.url + "/g", timeout=30).status_code == 200
    assert proxy.hits("digest") == 1 and proxy.hits("delay") == 1
    assert lie_about_adler32("md5=abc") is None
