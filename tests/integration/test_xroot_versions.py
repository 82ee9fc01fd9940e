"""A 6.x client against the 5.5.3 server: the XRootD Python bindings (PyPI xrootd 6.x, what a venv
gets, also in the RPM and the container) talking to the lake's XRootD (Debian's 5.5.3), the
combination a site with an older storage meets.

Each server interaction the root:// transport relies on is made through the bindings: first as the
raw answer of the server (the error numbers the transport maps), then as what the transport makes of
it. The in-process abort of an upload is in test_transports_real.py (test_root_aborted_upload_leaves_nothing,
on both clients); here a client that dies in the middle of an upload.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from support import require_xrootd_bindings

from edge_agent.errors import DestinationOccupied, PermanentError, RetryableError
from edge_agent.transfer.xroot import ITS_THERE, NOT_FOUND, XRootTransport, parse_checksum, split_url

from .storage import Area, adler, expected_for, no_pace

pytestmark = pytest.mark.lake

MiB = 1024 * 1024
NOT_AUTHORISED = 3010    # kXR_NotAuthorized: the server's answer to a file system permission denied


@pytest.fixture
def bindings() -> Any:
    require_xrootd_bindings()
    from XRootD import client
    return client


@pytest.fixture
def xroot(bindings: Any) -> XRootTransport:
    t = XRootTransport(backend="python", timeout=60, chunk_size=MiB)
    assert t.backend == "python"
    return t


def major(version: str) -> int:
    return int(version.strip().lstrip("v").split(".")[0])


def raw_open(bindings: Any, url: str, flags: int) -> Any:
    """The server's answer to an open, as the bindings give it (the file is closed again)."""
    f = bindings.File()
    st, _ = f.open(url, flags, timeout=60)
    if st.ok:
        f.close(timeout=60)
    return st


def test_the_client_is_6x_and_the_server_5(lake, bindings: Any) -> None:  # type: ignore[no-untyped-def]
    from XRootD.client.flags import QueryCode
    client_version = bindings.__version__
    xrdfs = subprocess.run(["xrdfs", lake.root_url, "query", "config", "version"], capture_output=True,
                           text=True, timeout=60, check=True, stdin=subprocess.DEVNULL)
    server_version = xrdfs.stdout.strip()
    print(f"\n[XRootD client (Python bindings) {client_version}, server {server_version}]")
    assert major(client_version) >= 6, client_version
    assert major(server_version) == 5, f"the lake's XRootD is {server_version}: this test is about a 5.x server"
    st, answer = bindings.FileSystem(lake.root_url).query(QueryCode.CONFIG, "version", timeout=60)
    assert st.ok and answer.decode().strip("\x00\n ") == server_version   # the bindings ask it the same


def test_an_exclusive_create_over_a_file_is_refused_and_other_bytes_never_replaced(
        bindings: Any, xroot: XRootTransport, area: Area, write_src: Callable[[str, bytes], str]) -> None:
    from XRootD.client.flags import OpenFlags
    a, b = os.urandom(MiB), os.urandom(MiB)
    url = area.root("excl/f")
    xroot.put(write_src("a", a), url, expected_for(a, may_replace=False), no_pace)   # exclusive, MAKEPATH
    st = raw_open(bindings, url, OpenFlags.NEW | OpenFlags.MAKEPATH | OpenFlags.POSC)
    assert not st.ok and st.errno == ITS_THERE, st
    with pytest.raises(DestinationOccupied):
        xroot.put(write_src("b", b), url, expected_for(b, may_replace=False), no_pace)
    assert area.local("excl/f").read_bytes() == a


def test_a_missing_file_is_not_found(bindings: Any, xroot: XRootTransport, area: Area,
                                     write_src: Callable[[str, bytes], str]) -> None:
    from XRootD.client.flags import QueryCode
    xroot.put(write_src("a", b"x"), area.root("here"), expected_for(b"x"), no_pace)    # the directory exists
    server, path = split_url(area.root("missing"))
    fs = bindings.FileSystem(server)
    st, _ = fs.stat(path, timeout=60)
    assert not st.ok and st.errno == NOT_FOUND, st
    st, _ = fs.query(QueryCode.CHECKSUM, path, timeout=60)
    assert not st.ok and st.errno == NOT_FOUND, st
    assert xroot.stat(area.root("missing")) is None and not xroot.exists(area.root("missing"))


def test_the_checksum_query_answers_adler32(bindings: Any, xroot: XRootTransport, area: Area,
                                            write_src: Callable[[str, bytes], str]) -> None:
    from XRootD.client.flags import QueryCode
    data = os.urandom(3 * MiB + 1)
    url = area.root("cks")
    xroot.put(write_src("f", data), url, expected_for(data), no_pace)
    server, path = split_url(url)
    st, answer = bindings.FileSystem(server).query(QueryCode.CHECKSUM, path, timeout=60)
    assert st.ok and isinstance(answer, bytes), st
    assert parse_checksum(answer.decode()) == ("adler32", adler(data)), answer
    remote = xroot.stat(url)
    assert remote is not None and (remote.size, remote.adler32) == (len(data), adler(data))


def test_delete_and_delete_again(bindings: Any, xroot: XRootTransport, area: Area,
                                 write_src: Callable[[str, bytes], str]) -> None:
    url = area.root("gone")
    xroot.put(write_src("f", b"bytes"), url, expected_for(b"bytes"), no_pace)
    xroot.delete(url)
    assert not area.local("gone").exists()
    server, path = split_url(url)
    st, _ = bindings.FileSystem(server).rm(path, timeout=60)
    assert not st.ok and st.errno == NOT_FOUND, st          # what a second delete hears ...
    xroot.delete(url)                                       # ... is success


def test_missing_parents_are_made_by_the_open(xroot: XRootTransport, area: Area,
                                              write_src: Callable[[str, bytes], str]) -> None:
    data = os.urandom(1000)
    for may_replace in (True, False):          # an open with DELETE, and an exclusive one (NEW)
        name = f"deep{int(may_replace)}/a/b/c/f"
        xroot.put(write_src("f", data), area.root(name), expected_for(data, may_replace), no_pace)
        assert area.local(name).read_bytes() == data


def test_a_client_that_dies_mid_upload_leaves_a_partial_file_the_next_upload_replaces(
        bindings: Any, xroot: XRootTransport, area: Area, write_src: Callable[[str, bytes], str]) -> None:
    """POSC (persist on successful close) does not drop the file at once: the 5.5.3 server holds
    it for its client to come back (ofs.persist's hold, 10 minutes by default), visible at its
    partial size. So a copy is never counted by its existence, and the next upload of the same
    version replaces it (other size: removed without a checksum query, then written)."""
    url = area.root("died")
    child = textwrap.dedent(f"""
        import os
        from XRootD import client
        from XRootD.client.flags import OpenFlags
        f = client.File()
        st, _ = f.open({url!r}, OpenFlags.DELETE | OpenFlags.MAKEPATH | OpenFlags.POSC, timeout=60)
        assert st.ok, st
        for i in range(4):
            st, _ = f.write(b"p" * {MiB}, i * {MiB}, timeout=60)
            assert st.ok, st
        os._exit(9)       # gone without a close
    """)
    assert subprocess.run([sys.executable, "-c", child], timeout=120, check=False).returncode == 9
    assert xroot.exists(url) and area.local("died").stat().st_size == 4 * MiB
    # asked for its checksum while held, the server answers 3020 (file busy): retried, never counted
    with pytest.raises(RetryableError, match=r"\[3020\]"):
        xroot.stat(url)
    data = os.urandom(8 * MiB)
    got = xroot.put(write_src("f", data), url, expected_for(data), no_pace)
    assert got.adler32 == adler(data) and area.local("died").read_bytes() == data


def test_permission_denied_is_permanent(bindings: Any, xroot: XRootTransport, area: Area,
                                        write_src: Callable[[str, bytes], str]) -> None:
    """The data directory belongs to the server's user (xrootd); what root keeps from it is refused."""
    from XRootD.client.flags import OpenFlags
    assert os.geteuid() == 0, "the lake's tests run as root (the server drops to the xrootd user)"
    data = os.urandom(1000)
    xroot.put(write_src("f", data), area.root("secret"), expected_for(data), no_pace)
    (area.dir / "locked").mkdir(mode=0o555)                      # root's, not writable by xrootd
    st = raw_open(bindings, area.root("locked/f"), OpenFlags.NEW | OpenFlags.MAKEPATH | OpenFlags.POSC)
    assert not st.ok and st.errno == NOT_AUTHORISED, st
    with pytest.raises(PermanentError, match="not authorised"):
        xroot.put(write_src("f", data), area.root("locked/f"), expected_for(data), no_pace)
    area.local("secret").chmod(0)                               # unreadable for xrootd
    with pytest.raises(PermanentError, match="not authorised"):
        xroot.stat(area.root("secret"))                          # the checksum query is refused
    with pytest.raises(PermanentError, match="not authorised"), xroot.open(area.root("secret")) as fh:
        fh.read()
