"""An S3 RSE in the Rucio lake, against fakes: Rucio (signurl, RSE attributes) and a signing S3 store.
What counts as a copy there (size + ETag = MD5), what is refused, and the read resolver."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import blake3
import httpx
import pytest

from edge_agent.app import mount_s3
from edge_agent.core.policy import judge_replicas
from edge_agent.errors import ConfigError, PermanentError, RetryableError
from edge_agent.lake.base import LakeFile
from edge_agent.lake.rucio_client import RucioClient
from edge_agent.lake.signed_reads import SignedReadResolver
from edge_agent.settings import Settings, load_settings
from edge_agent.transfer.base import Expected
from edge_agent.transfer.mock import MockTransport
from edge_agent.transfer.s3 import S3Transport

from .test_rucio import PASSWORD, CheckedCatalogue, FakeRucio, err
from ..transfer.test_s3 import FakeS3

S3_HOST = "https://s3.test:7443/bucket"


class FakeRucioS3(FakeRucio):
    """FakeRucio with an S3 RSE: https only, attribute sign_url=s3, and /credentials/signurl."""

    HOST: ClassVar[dict[str, str]] = {**FakeRucio.HOST, "https": S3_HOST}

    def __init__(self, store: FakeS3) -> None:
        super().__init__()
        self.rses["S3"] = {"deterministic": True, "schemes": ["https"], "attrs": {"S3": True, "sign_url": "s3"}}
        self.store = store
        self.signed: list[dict[str, str]] = []

    def pfn(self, scheme: str, rse: str, scope: str, name: str) -> str:
        if rse == "S3":
            return f"{S3_HOST}/{scope}/{name}"
        return super().pfn(scheme, rse, scope, name)

    def protocols(self, request: httpx.Request, body: Any, rse: str) -> httpx.Response:
        if rse != "S3":
            return super().protocols(request, body, rse)
        return httpx.Response(200, json=[{"scheme": "https", "hostname": "s3.test", "port": 7443, "prefix": "/bucket/",
                                          "domains": {"wan": {"read": 1, "write": 1, "delete": 1}}}])

    def attrs(self, request: httpx.Request, body: Any, rse: str) -> httpx.Response:
        if rse not in self.rses:
            return err(404, "RSENotFound", f"RSE '{rse}' cannot be found in vo 'def'")
        return httpx.Response(200, json={rse: True, **self.rses[rse].get("attrs", {})})

    def signurl(self, request: httpx.Request, body: Any) -> httpx.Response:
        q = {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}
        self.signed.append(q)
        if q.get("svc") != "s3" or q.get("op") not in ("read", "write", "delete"):
            return err(400, "ValueError", "bad svc or op")
        return httpx.Response(200, text=self.store.sign(q["op"], q["url"]),
                              headers={"Content-Type": "application/octet-stream"})

    ROUTES: ClassVar[list[tuple[str, Any]]] = [(r"GET /rses/([^/]+)/attr/", attrs), (r"GET /credentials/signurl", signurl),
                                               (r"GET /rses/([^/]+)/protocols", protocols), *FakeRucio.ROUTES]


def settings(tmp: Path, md5: bool = True) -> Settings:
    return Settings(
        state_dir=str(tmp / "state"),
        lake={"kind": "rucio", "rucio": {"url": "http://rucio.test", "account": "root",
                                         "auth": {"type": "userpass", "username": "ddmlab", "password": PASSWORD}}},
        destinations={"s3": {"kind": "rse", "rse": "S3", "sign_url": "s3", "signed_url_lifetime_seconds": 60}},
        rules={"push": {"directory": str(tmp / "daq"), "scope": "test", "destinations": ["s3"], "copies": 1,
                        "md5": md5}})


@pytest.fixture
def store() -> FakeS3:
    return FakeS3()


@pytest.fixture
def rucio(store: FakeS3) -> FakeRucioS3:
    return FakeRucioS3(store)


@pytest.fixture
def client(tmp_path: Path, rucio: FakeRucioS3) -> RucioClient:
    s = settings(tmp_path)
    assert s.lake.rucio is not None
    return RucioClient(s.lake.rucio, transport=httpx.MockTransport(rucio), sleep=lambda t: None)


@pytest.fixture
def lake(tmp_path: Path, client: RucioClient, store: FakeS3) -> CheckedCatalogue:
    def sign(op: str, url: str) -> str:
        return client.signed_url("S3", op, url, 60)
    s3 = S3Transport(sign, transport=httpx.MockTransport(store))
    lake = CheckedCatalogue(settings(tmp_path), {"http": MockTransport("http")}, client,
                            max_bytes={"S3": s3.max_object_bytes})
    mount_s3(lake.transports, {"S3": s3}, lake.storage_prefixes)
    return lake


def local_file(tmp: Path, data: bytes, size: int | None = None) -> LakeFile:
    p = tmp / "daq" / "f1.fits"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return LakeFile(rule="push", scope="test", name="f1", dataset=None, size=len(data) if size is None else size,
                    adler32=f"{zlib.adler32(data) & 0xFFFFFFFF:08x}", md5=hashlib.md5(data).hexdigest(),
                    blake3=blake3.blake3(data).hexdigest(), copies=1, destinations=("s3",), local_path=str(p))


def push(lake: CheckedCatalogue, f: LakeFile) -> str:
    lake.register(f)
    (t,) = lake.targets(f)
    lake.transports.for_url(t.url).put(f.local_path, t.url, Expected(f.size, f.blake3, f.adler32, f.md5), lambda n: None)
    lake.add_replica(f, t.location, t.url)
    return t.url


def test_an_s3_destination_is_written_through_signed_urls(lake: CheckedCatalogue, rucio: FakeRucioS3,
                                                         store: FakeS3, tmp_path: Path) -> None:
    data = b"night" * 1000
    f = local_file(tmp_path, data)
    url = push(lake, f)
    assert url == f"{S3_HOST}/test/f1"
    assert store.objects["/bucket/test/f1"] == data
    assert {(q["rse"], q["op"], q["url"], q["lifetime"]) for q in rucio.signed} == {
        ("S3", "read", url, "60"), ("S3", "write", url, "60")}
    (rep,) = lake.replicas(f)
    # S3 has no adler32: the copy carries the agent's own, because size and ETag (= MD5) match
    assert (rep.location, rep.size, rep.adler32, rep.problem, rep.url) == ("S3", len(data), f.adler32, None, url)
    assert rep.adler32_from_catalogue      # and the evidence says so
    assert judge_replicas([rep], f.size, f.adler32).count == 1


def test_an_overwritten_object_is_not_counted(lake: CheckedCatalogue, store: FakeS3, tmp_path: Path) -> None:
    data = b"a" * 4096
    f = local_file(tmp_path, data)
    push(lake, f)
    other = b"b" * 4096                    # same size, other bytes: only the ETag can tell
    store.objects["/bucket/test/f1"] = other
    store.etags["/bucket/test/f1"] = hashlib.md5(other).hexdigest()
    (rep,) = lake.replicas(f)
    assert rep.size == 4096 and rep.problem and "ETag" in rep.problem
    c = judge_replicas([rep], f.size, f.adler32)
    assert c.count == 0 and "ETag" in c.bad[0][1]


def test_a_signed_pfn_from_the_catalogue_is_signed_afresh(lake: CheckedCatalogue, rucio: FakeRucioS3,
                                                         store: FakeS3, tmp_path: Path) -> None:
    data = b"c" * 100
    f = local_file(tmp_path, data)
    push(lake, f)
    # Rucio hands accounts allowed to sign an already signed PFN from list_replicas
    rucio.HOST = {**rucio.HOST, "https": S3_HOST}
    orig = rucio.pfn
    rucio.pfn = lambda scheme, rse, scope, name: orig(scheme, rse, scope, name) + "?X-Amz-Signature=old"  # type: ignore[method-assign]
    (rep,) = lake.replicas(f)
    assert rep.problem is None and rep.url == f"{S3_HOST}/test/f1"
    assert rucio.signed[-1]["url"] == f"{S3_HOST}/test/f1"


def test_a_file_larger_than_one_put_is_refused_before_it_is_registered(lake: CheckedCatalogue, rucio: FakeRucioS3,
                                                                       tmp_path: Path) -> None:
    f = local_file(tmp_path, b"x", size=(5 << 30) + 1)
    with pytest.raises(PermanentError, match="more than one signed PUT"):
        lake.register(f)
    assert rucio.count("POST", "/replicas") == 0 and not rucio.dids


def test_read_resolver_signs_s3_replicas_only(client: RucioClient, rucio: FakeRucioS3, store: FakeS3) -> None:
    resolve = SignedReadResolver(client, lifetime=30)
    url = resolve("S3", f"{S3_HOST}/test/f1?X-Amz-Signature=stale")
    assert url.startswith(f"{S3_HOST}/test/f1?sig=read-") and rucio.signed[-1] == {
        "rse": "S3", "svc": "s3", "op": "read", "url": f"{S3_HOST}/test/f1", "lifetime": "30"}
    store.objects["/bucket/test/f1"] = b"hello"
    store.etags["/bucket/test/f1"] = hashlib.md5(b"hello").hexdigest()
    assert httpx.Client(transport=httpx.MockTransport(store)).get(url).content == b"hello"
    plain = "root://xrd:1094//data/lake1/test/f1"
    assert resolve("LAKE1", plain) == plain
    n = len(rucio.signed)
    resolve("S3", f"{S3_HOST}/test/f2")
    assert rucio.count("GET", "/rses/S3/attr/") == 1, "attributes are cached"
    assert len(rucio.signed) == n + 1


def test_signed_url_that_is_not_a_url_is_retryable(client: RucioClient, rucio: FakeRucioS3) -> None:
    rucio.fail[("GET", "/credentials/signurl")] = httpx.Response(200, text="")
    with pytest.raises(RetryableError):
        client.signed_url("S3", "write", f"{S3_HOST}/test/f1")


def test_signing_refused_waits_for_the_permission(client: RucioClient, rucio: FakeRucioS3) -> None:
    """About the account, not the file: retried (files wait), never a refusal of the file."""
    from edge_agent.errors import RetryableError
    rucio.fail[("GET", "/credentials/signurl")] = err(401, "AccessDenied", "Account root can not sign URLs")
    with pytest.raises(RetryableError):
        client.signed_url("S3", "write", f"{S3_HOST}/test/f1")


def test_settings_need_md5_for_s3_and_ca_cert_only_with_sign_url(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="md5 = true"):
        settings(tmp_path, md5=False)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f"""
[lake]
kind = "rucio"
[lake.rucio]
url = "http://rucio.test"
account = "root"
[lake.rucio.auth]
username = "u"
password = "p"
[destinations.x]
kind = "rse"
rse = "X"
ca_cert = "/etc/ssl/x.pem"
[rules.r]
directory = "{tmp_path}/d"
scope = "test"
destinations = ["x"]
""")
    with pytest.raises(ConfigError, match="ca_cert is used only with sign_url"):
        load_settings(cfg)


def test_an_s3_rse_not_configured_as_such_is_refused_with_the_fix(tmp_path: Path, client: RucioClient,
                                                                  rucio: FakeRucioS3) -> None:
    s = Settings(state_dir=str(tmp_path / "state"), lake=settings(tmp_path).lake,
                 destinations={"s3": {"kind": "rse", "rse": "S3"}},
                 rules={"push": {"directory": str(tmp_path / "daq"), "scope": "test", "destinations": ["s3"],
                                 "copies": 1}})
    lake = CheckedCatalogue(s, {"https": MockTransport("https")}, client)
    with pytest.raises(PermanentError, match='sign_url = "s3"'):
        lake.targets(local_file(tmp_path, b"x"))
