"""access.py: replicas chosen in order, unreachable ones skipped, bytes never trusted unverified."""

from __future__ import annotations

import ssl
import zlib
from pathlib import Path

import httpx
import pytest

from edge_agent.access import (
    ChecksumMismatch,
    FileInfo,
    Lake,
    NoReachableReplica,
    ReplicaInfo,
    VerifiedStream,
    _Bearer,
    direct_url,
    signing_resolver,
    storage_client,
)
from edge_agent.errors import PermanentError
from edge_agent.lake.base import LakeFile
from edge_agent.lake.memory import MemoryCatalogue
from edge_agent.settings import RucioAuthSettings, RucioSettings

DATA = bytes(range(256)) * 4000   # ~1 MB: more than one chunk
ADLER = f"{zlib.adler32(DATA) & 0xFFFFFFFF:08x}"


@pytest.fixture(autouse=True)
def _structlog_as_it_was():  # type: ignore[no-untyped-def]
    """Lake() sets structlog up (warnings only) when nobody did; other tests expect the defaults."""
    yield
    import structlog
    structlog.reset_defaults()


def catalogue(replicas: list[ReplicaInfo], size: int = len(DATA), adler: str | None = ADLER) -> MemoryCatalogue:
    """The shipped in-memory catalogue holding s:f.fits with `replicas` (one URL each, several on one RSE)."""
    cat = MemoryCatalogue({})
    cat.register(LakeFile(rule="r", scope="s", name="f.fits", dataset="ds", size=size, adler32=adler or "", md5=None,
                          blake3="", copies=1, destinations=(), local_path="/daq/f.fits"))
    by_rse: dict[str, list[ReplicaInfo]] = {}
    for r in replicas:
        by_rse.setdefault(r.rse, []).append(r)
    for rse, reps in by_rse.items():
        cat.list_replica("s:f.fits", rse, *(r.pfn for r in reps), state=reps[0].state)
    return cat


def test_the_catalogue_is_read_as_the_api_says() -> None:
    lk, _ = lake({}, [rep("B", "b"), rep("A", "a", "COPYING"), rep("A", "a", "COPYING", "root")], size=7, adler="0000000f")
    assert lk.list_files("s:ds") == [FileInfo("s", "f.fits", 7, "0000000f")]
    assert lk.info("s:f.fits") == FileInfo("s", "f.fits", 7, "0000000f")
    assert lk.replicas("s:f.fits") == [ReplicaInfo("A", "https://a/data/f.fits", "COPYING"),
                                       ReplicaInfo("A", "root://a/data/f.fits", "COPYING"),
                                       ReplicaInfo("B", "https://b/data/f.fits", "AVAILABLE")]
    with pytest.raises(PermanentError, match="no DID s:other.fits"):
        lk.info("s:other.fits")


def lake(storage: dict[str, object], reps: list[ReplicaInfo], **kw) -> tuple[Lake, list[str]]:
    """A Lake over a fake catalogue; `storage` maps host -> bytes, an HTTP status, or an exception."""
    asked: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        asked.append(str(req.url))
        what = storage[req.url.host]
        if isinstance(what, Exception):
            raise what
        if isinstance(what, int):
            return httpx.Response(what)
        return httpx.Response(200, content=what)
    cat_kw = {k: kw.pop(k) for k in ("size", "adler") if k in kw}
    return Lake(catalogue(reps, **cat_kw), httpx.Client(transport=httpx.MockTransport(handler)), **kw), asked


def rep(rse: str, host: str, state: str = "AVAILABLE", scheme: str = "https") -> ReplicaInfo:
    return ReplicaInfo(rse, f"{scheme}://{host}/data/f.fits", state)


def test_good_bytes_are_returned_verified() -> None:
    lk, _ = lake({"a": DATA}, [rep("A", "a")])
    assert lk.read_bytes("s:f.fits") == DATA
    with lk.open("s:f.fits") as fh:
        assert fh.read() == DATA and fh.verified and fh.source == "A"


def test_other_bytes_raise_at_the_end_naming_the_replica() -> None:
    bad = bytearray(DATA)
    bad[5000] ^= 1
    lk, _ = lake({"a": bytes(bad), "b": DATA}, [rep("A", "a"), rep("B", "b")])
    with pytest.raises(ChecksumMismatch, match="from A .*adler32"):
        lk.read_bytes("s:f.fits")


def test_a_short_file_is_a_mismatch() -> None:
    lk, _ = lake({"a": DATA[:-1]}, [rep("A", "a")])
    with pytest.raises(ChecksumMismatch, match="bytes read"):
        lk.read_bytes("s:f.fits")


def test_the_stream_gives_bytes_as_they_come_and_raises_instead_of_end_of_file() -> None:
    bad = b"x" * len(DATA)
    lk, _ = lake({"a": bad}, [rep("A", "a")])
    fh = lk.open("s:f.fits")
    assert fh.read(10) == b"x" * 10 and not fh.verified    # an early close claims nothing
    fh.close()
    fh = lk.open("s:f.fits")
    got = b""
    with pytest.raises(ChecksumMismatch):
        while chunk := fh.read(65536):
            got += chunk
    assert got == bad and not fh.verified
    fh.close()


def test_unreachable_or_missing_replicas_are_skipped_for_the_next() -> None:
    lk, asked = lake({"a": httpx.ConnectError("refused"), "b": 503, "c": 404, "d": DATA},
                     [rep("A", "a"), rep("B", "b"), rep("C", "c"), rep("D", "d")])
    with lk.open("s:f.fits") as fh:
        assert fh.read() == DATA and fh.source == "D"
    assert [u.split("/")[2] for u in asked] == ["a", "b", "c", "d"]


def test_no_reachable_replica_lists_each_one_tried() -> None:
    lk, _ = lake({"a": 503, "b": 404}, [rep("A", "a"), rep("B", "b")])
    with pytest.raises(NoReachableReplica) as e:
        lk.read_bytes("s:f.fits")
    assert "A https://a/data/f.fits" in str(e.value) and "HTTP 404" in str(e.value)


def test_only_available_replicas_and_the_asked_rse_are_read() -> None:
    lk, asked = lake({"a": DATA, "b": DATA}, [rep("A", "a", "COPYING"), rep("B", "b")])
    assert lk.verify("s:f.fits") == "B" and asked == ["https://b/data/f.fits"]
    with pytest.raises(NoReachableReplica, match="on A"):
        lk.read_bytes("s:f.fits", rse="A")


def test_http_is_preferred_to_root_and_davs_is_read_as_https() -> None:
    lk, asked = lake({"a": DATA}, [rep("A", "a", scheme="root"), rep("A", "a", scheme="davs")])
    lk.read_bytes("s:f.fits")
    assert asked == ["https://a/data/f.fits"]


def test_resolution_is_pluggable_for_signed_urls() -> None:
    def signer(pfn: str, rse: str) -> str | None:
        return pfn.replace("s3://", "https://") + "?X-Amz-Signature=abc" if pfn.startswith("s3://") else None
    assert direct_url("s3://bucket/key", "S3") is None            # the default cannot read it
    lk, asked = lake({"bucket": DATA}, [ReplicaInfo("S3", "s3://bucket/f.fits", "AVAILABLE")], resolver=signer)
    assert lk.read_bytes("s:f.fits") == DATA and asked == ["https://bucket/f.fits?X-Amz-Signature=abc"]


def test_signing_resolver_signs_through_rucio_then_reads_as_the_default() -> None:
    signed: list[tuple[str, str]] = []

    def sign(rse: str, pfn: str) -> str:          # SignedReadResolver's order: (rse, pfn)
        signed.append((rse, pfn))
        return pfn + "?X-Amz-Signature=abc" if rse == "S3" else pfn
    resolve = signing_resolver(sign)
    assert resolve("https://gw/b/k", "S3") == "https://gw/b/k?X-Amz-Signature=abc"
    assert resolve("davs://x/f", "XRD") == "https://x/f"          # then read as direct_url would
    assert resolve("gsiftp://x/f", "OLD") is None
    assert signed == [("S3", "https://gw/b/k"), ("XRD", "davs://x/f"), ("OLD", "gsiftp://x/f")]


def test_a_bearer_token_is_never_sent_with_a_signed_url() -> None:
    seen: list[str | None] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers.get("Authorization"))
        return httpx.Response(200)
    with httpx.Client(transport=httpx.MockTransport(handler), auth=_Bearer(lambda: "tok")) as c:
        c.get("https://storage/f")
        c.get("https://gw/b/k?X-Amz-Credential=a&X-Amz-Signature=abc")
    assert seen == ["Bearer tok", None]


def test_a_file_without_registered_adler32_is_never_called_verified() -> None:
    lk, _ = lake({"a": DATA}, [rep("A", "a")], adler=None)
    with pytest.raises(ChecksumMismatch, match="cannot be verified"):
        lk.read_bytes("s:f.fits")


def test_download_renames_only_verified_bytes(tmp_path: Path) -> None:
    lk, _ = lake({"a": DATA}, [rep("A", "a")])
    assert lk.download("s:f.fits", tmp_path).read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.fits"]
    bad, _ = lake({"a": DATA[::-1]}, [rep("A", "a")])
    out = tmp_path / "other"
    out.mkdir()
    with pytest.raises(ChecksumMismatch):
        bad.download("s:f.fits", out / "named.fits")
    assert list(out.iterdir()) == []


def test_file_urls_and_bare_paths_are_read(tmp_path: Path) -> None:
    p = tmp_path / "f.fits"
    p.write_bytes(DATA)
    lk, _ = lake({}, [ReplicaInfo("L", str(p), "AVAILABLE")])
    assert lk.read_bytes("s:f.fits") == DATA


def test_a_did_must_be_scope_colon_name() -> None:
    lk, _ = lake({}, [])
    with pytest.raises(ValueError, match="scope:name"):
        lk.replicas("nocolon")


def test_storage_tls_is_verified_by_default() -> None:
    class Client:
        def token(self) -> str:
            return "tok"
    r = RucioSettings(url="https://rucio.example", account="a",
                      auth=RucioAuthSettings(type="userpass", username="u", password="p"))
    with storage_client(r, Client()) as c:
        ctx = c._transport._pool._ssl_context
        assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname


def test_a_connection_lost_mid_file_is_a_retryable_error_not_an_end() -> None:
    from edge_agent.errors import RetryableError

    def body():  # type: ignore[no-untyped-def]
        yield DATA * 2   # more than one chunk arrives before the connection drops
        raise httpx.ReadError("connection reset")

    lk = Lake(catalogue([rep("A", "a")]), httpx.Client(transport=httpx.MockTransport(
        lambda req: httpx.Response(200, content=body()))))
    with lk.open("s:f.fits") as fh, pytest.raises(RetryableError, match="GET https://a/data/f.fits: ReadError"):
        fh.read()
    assert not fh.verified


def test_analysis_code_gets_warnings_only_unless_it_set_logging_up(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog
    lake({}, [])
    log = structlog.get_logger("edge_agent.lake.rucio_client")
    log.info("rucio call", call="GET /ping")
    log.warning("TLS VERIFICATION IS OFF", password="hunter2")
    err = capsys.readouterr().err
    assert "rucio call" not in err and "TLS VERIFICATION IS OFF" in err and "hunter2" not in err


@pytest.mark.parametrize("bad", [b"x" * len(DATA), DATA[:-1]], ids=["other bytes", "short"])
def test_a_mismatch_is_sticky_reading_on_never_gives_end_of_file(bad: bytes) -> None:
    # a caller that catches the mismatch and reads again must not see a clean (short) end of file
    lk, _ = lake({"a": bad}, [rep("A", "a")])
    with lk.open("s:f.fits") as fh:
        with pytest.raises(ChecksumMismatch):
            fh.read()
        for read in (fh.read, lambda: fh.read(10), lambda: fh.readinto(bytearray(10))):
            with pytest.raises(ChecksumMismatch):
                read()
        assert not fh.verified


def test_an_error_from_the_storage_is_sticky_too() -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield DATA[:100]
        raise ConnectionError("reset")
    fh = VerifiedStream(chunks(), 100, f"{zlib.adler32(DATA[:100]) & 0xFFFFFFFF:08x}", "t")
    assert fh.read(100) == DATA[:100]
    with pytest.raises(ConnectionError):
        fh.read(100)
    with pytest.raises(ConnectionError):   # not the clean end of a file whose bytes happened to match
        fh.read(100)
    assert not fh.verified
