"""The Rucio REST client against httpx.MockTransport: authentication, renewal, secrets, the error table."""

from __future__ import annotations

import base64
import io
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from structlog.testing import capture_logs

from edge_agent import logs
from edge_agent.errors import AlreadyDone, ConfigError, PermanentError, RetryableError
from edge_agent.lake.rucio_client import AuthFailed, NotFound, RucioClient, jwt_expiry, rucio_error
from edge_agent.settings import RucioSettings

URL = "http://rucio.test"
PASSWORD = "pw-Xy7-very-secret"
SECRET = "client-secret-Q9"
T0 = 1_800_000_000.0   # the fake clock's start


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def http_date(t: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(t))


def settings(**kw: Any) -> RucioSettings:
    auth = kw.pop("auth", {"type": "userpass", "username": "ddmlab", "password": PASSWORD})
    return RucioSettings(url=URL, account="root", auth=auth, **kw)


def jwt(exp: float | None, sub: str = "agent") -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    payload: dict[str, Any] = {"sub": sub, "aud": "rucio"}
    if exp is not None:
        payload["exp"] = int(exp)
    return f"{b64({'alg': 'RS256'})}.{b64(payload)}.c2lnbmF0dXJl"


def error(status: int, cls: str, msg: str) -> httpx.Response:
    return httpx.Response(status, headers={"ExceptionClass": cls, "ExceptionMessage": msg},
                          json={"ExceptionClass": cls, "ExceptionMessage": msg})


class Server:
    """A scripted Rucio: userpass auth issuing numbered tokens, and `routes` for the rest."""

    def __init__(self, clock: Clock, lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = {}
        self.password = PASSWORD
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
        path = request.url.path
        if path in ("/auth/userpass", "/auth/x509"):
            if path == "/auth/userpass" and request.headers.get("X-Rucio-Password") != self.password:
                return error(401, "CannotAuthenticate", "Cannot authenticate to account root with given credentials")
            with self.lock:
                token = f"root-ddmlab-edge-agent-{len(self.issued):032x}"
                self.issued.append(token)
                self.valid.add(token)
            return httpx.Response(200, headers={
                "X-Rucio-Auth-Token": token, "Date": http_date(self.clock.now),
                "X-Rucio-Auth-Token-Expires": http_date(self.clock.now + self.lifetime)})
        if path == "/ping":
            return httpx.Response(200, json={"version": "41.5.1"})
        if request.headers.get("X-Rucio-Auth-Token") not in self.valid:
            return error(401, "CannotAuthenticate", "Cannot authenticate with given credentials")
        handler = self.routes.get((request.method, path))
        if handler is None:
            return httpx.Response(404, text="no route")
        return handler(request)

    def auths(self) -> int:
        return sum(1 for r in self.requests if r.url.path.startswith("/auth/"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Server:
    s = Server(clock)
    s.routes[("GET", "/dids/test/f1")] = lambda r: httpx.Response(200, json={"scope": "test", "name": "f1",
                                                                             "type": "FILE", "bytes": 10})
    return s


def make(server: Callable[[httpx.Request], httpx.Response], clock: Clock | None = None,
         sleeps: list[float] | None = None, **kw: Any) -> RucioClient:
    return RucioClient(settings(**kw), transport=httpx.MockTransport(server), clock=clock or Clock(),
                       sleep=(sleeps.append if sleeps is not None else lambda s: None))


# ---------------------------------------------------------------- userpass and the token cache

def test_userpass_headers_and_one_token_for_many_calls(server: Server, clock: Clock) -> None:
    c = make(server, clock, vo="abc")
    for _ in range(3):
        assert c.get_did("test", "f1")["bytes"] == 10
    auth = [r for r in server.requests if r.url.path == "/auth/userpass"]
    assert len(auth) == 1
    h = auth[0].headers
    assert (h["X-Rucio-Account"], h["X-Rucio-Username"], h["X-Rucio-Password"], h["X-Rucio-VO"]) == \
        ("root", "ddmlab", PASSWORD, "abc")
    calls = [r for r in server.requests if r.url.path == "/dids/test/f1"]
    assert {r.headers["X-Rucio-Auth-Token"] for r in calls} == {server.issued[0]}


def test_token_is_renewed_five_minutes_before_it_expires(server: Server, clock: Clock) -> None:
    c = make(server, clock)
    c.get_did("test", "f1")
    clock.now += 3600 - 310          # 5 min 10 s left: still good
    c.get_did("test", "f1")
    assert server.auths() == 1
    clock.now += 20                  # 4 min 50 s left: renewed before use
    c.get_did("test", "f1")
    assert server.auths() == 2
    assert server.requests[-1].headers["X-Rucio-Auth-Token"] == server.issued[1]


def test_short_lived_tokens_are_renewed_half_way(clock: Clock) -> None:
    server = Server(clock, lifetime=240)
    server.routes[("GET", "/x")] = lambda r: httpx.Response(200, json={})
    c = make(server, clock)
    c.request("GET", "/x")
    clock.now += 100
    c.request("GET", "/x")
    assert server.auths() == 1
    clock.now += 30
    c.request("GET", "/x")
    assert server.auths() == 2


def test_token_lifetime_is_measured_on_the_servers_clock(server: Server, clock: Clock) -> None:
    # the server's clock is 2 h behind ours: its Date and Expires headers still give a 1 h token
    def skewed(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/userpass":
            server.issued.append(tok := f"tok{len(server.issued)}")
            server.valid.add(tok)
            return httpx.Response(200, headers={"X-Rucio-Auth-Token": tok, "Date": http_date(clock.now - 7200),
                                                "X-Rucio-Auth-Token-Expires": http_date(clock.now - 3600)})
        return server(request)
    c = make(skewed, clock)
    c.get_did("test", "f1")
    clock.now += 1800
    c.get_did("test", "f1")
    assert len(server.issued) == 1


def test_a_refused_cached_token_is_renewed_once_and_the_call_repeated(server: Server, clock: Clock) -> None:
    c = make(server, clock)
    c.get_did("test", "f1")
    server.valid.clear()             # e.g. the server's token table was purged
    assert c.get_did("test", "f1")["name"] == "f1"
    assert server.auths() == 2
    assert [r.url.path for r in server.requests[-3:]] == ["/dids/test/f1", "/auth/userpass", "/dids/test/f1"]


def test_a_token_refused_twice_is_an_auth_failure(server: Server, clock: Clock) -> None:
    c = make(server, clock)
    server.routes[("GET", "/dids/test/f1")] = lambda r: error(401, "CannotAuthenticate", "nope")
    with pytest.raises(AuthFailed) as ei:
        c.get_did("test", "f1")
    assert isinstance(ei.value, RetryableError)
    assert server.auths() == 2


def test_wrong_password_is_retryable_names_account_and_hides_the_password(server: Server, clock: Clock) -> None:
    server.password = "something-else"
    c = make(server, clock)
    with capture_logs() as captured, pytest.raises(RetryableError) as ei:
        c.get_did("test", "f1")
    msg = str(ei.value)
    assert msg.startswith("Rucio rejected the credentials of account root (userpass): 401 CannotAuthenticate")
    assert PASSWORD not in msg and PASSWORD not in repr(captured)
    assert isinstance(ei.value, AuthFailed) and not isinstance(ei.value, PermanentError)


def test_concurrent_threads_share_one_authentication(server: Server, clock: Clock) -> None:
    gate = threading.Event()
    slow = server.__call__

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/userpass":
            gate.wait(1)
        return slow(request)
    c = make(handler, clock)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                c.get_did("test", "f1")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert not errors and server.auths() == 1


# ---------------------------------------------------------------- secrets never leak

def test_no_secret_in_logs_or_errors_through_structlog(server: Server, clock: Clock) -> None:
    buf = io.StringIO()
    logs.setup("debug", "json", stream=buf)
    texts: list[str] = []
    try:
        with capture_logs() as raw:
            c = make(server, clock)
            c.get_did("test", "f1")
            server.valid.clear()
            c.get_did("test", "f1")
            # a server that echoes the token and the password back in its error message
            tok = server.issued[-1]
            server.routes[("GET", "/echo")] = lambda r: error(400, "InvalidObject",
                                                              f"bad header {tok} with {PASSWORD}")
            with pytest.raises(PermanentError) as ei:
                c.request("GET", "/echo")
            texts.append(str(ei.value))
        structlog.get_logger("edge_agent.lake.rucio").info("after", text=texts[0])
    finally:
        structlog.reset_defaults()
    everything = buf.getvalue() + repr(raw) + " ".join(texts)
    assert "rucio token obtained" in everything          # the log did run
    for secret in [PASSWORD, *server.issued]:
        assert secret not in everything, secret
    assert "***" in texts[0]


# ---------------------------------------------------------------- oidc

def test_token_file_is_read_and_reread_when_it_changes(tmp_path: Path, clock: Clock) -> None:
    f = tmp_path / "token"
    first, second = jwt(T0 + 3600), jwt(T0 + 7200, sub="other")
    f.write_text(first + "\n")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["X-Rucio-Auth-Token"])
        return httpx.Response(200, json={"scope": "test", "name": "f1"})
    c = make(handler, clock, auth={"type": "oidc", "token_file": str(f)})
    c.get_did("test", "f1")
    c.get_did("test", "f1")
    f.write_text(second)
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    c.get_did("test", "f1")
    assert seen == [first, first, second]


def test_token_file_is_reread_when_its_token_nears_expiry(tmp_path: Path, clock: Clock) -> None:
    f = tmp_path / "token"
    f.write_text(jwt(T0 + 1000))
    reads: list[str] = []
    c = make(lambda r: (reads.append(r.headers["X-Rucio-Auth-Token"]), httpx.Response(200, json={}))[1],
             clock, auth={"type": "oidc", "token_file": str(f)})
    real_read = Path.read_text
    n = {"reads": 0}

    def counting(self: Path, *a: Any, **kw: Any) -> str:
        n["reads"] += 1
        return real_read(self, *a, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "read_text", counting)
        c.request("GET", "/x")
        clock.now += 600              # 400 s left: still good
        c.request("GET", "/x")
        assert n["reads"] == 1
        clock.now += 120               # 280 s left: read again before use
        c.request("GET", "/x")
        assert n["reads"] == 2


def test_expired_token_in_file_says_what_to_check(tmp_path: Path, clock: Clock) -> None:
    f = tmp_path / "token"
    f.write_text(jwt(T0 - 30))
    c = make(lambda r: httpx.Response(200), clock, auth={"type": "oidc", "token_file": str(f)})
    with pytest.raises(AuthFailed, match=r"expired 30 s ago; is whatever refreshes it") as ei:
        c.request("GET", "/x")
    assert jwt(T0 - 30) not in str(ei.value)


def test_missing_token_file_is_an_auth_failure(tmp_path: Path, clock: Clock) -> None:
    c = make(lambda r: httpx.Response(200), clock, auth={"type": "oidc", "token_file": str(tmp_path / "nope")})
    with pytest.raises(AuthFailed, match="cannot read the token file"):
        c.token()


def test_jwt_expiry() -> None:
    assert jwt_expiry(jwt(123)) == 123
    assert jwt_expiry(jwt(None)) is None
    assert jwt_expiry("opaque-token") is None
    assert jwt_expiry("a.!!!.c") is None


def oidc_cc() -> dict[str, Any]:
    return {"type": "oidc", "token_url": "https://idp.test/token", "client_id": "edge", "client_secret": SECRET,
            "scope": "openid profile", "audience": "rucio"}


def test_client_credentials_flow_and_renewal(clock: Clock) -> None:
    grants: list[dict[str, list[str]]] = []
    used: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "idp.test":
            from urllib.parse import parse_qs
            grants.append(parse_qs(request.content.decode()))
            return httpx.Response(200, json={"access_token": f"at-{len(grants)}", "expires_in": 1200,
                                             "token_type": "Bearer"})
        used.append(request.headers["X-Rucio-Auth-Token"])
        return httpx.Response(200, json={})
    c = make(handler, clock, auth=oidc_cc())
    c.request("GET", "/x")
    clock.now += 800                 # 400 s left
    c.request("GET", "/x")
    clock.now += 150                 # 250 s left: renewed
    c.request("GET", "/x")
    assert used == ["at-1", "at-1", "at-2"]
    assert grants[0] == {"grant_type": ["client_credentials"], "client_id": ["edge"], "client_secret": [SECRET],
                         "scope": ["openid profile"], "audience": ["rucio"]}


def test_client_credentials_refused_hides_the_secret(clock: Clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "invalid_client",
                                         "error_description": f"bad secret {SECRET}"})
    c = make(handler, clock, auth=oidc_cc())
    with capture_logs() as captured, pytest.raises(AuthFailed) as ei:
        c.token()
    assert "rejected the credentials of client edge for account root (oidc)" in str(ei.value)
    assert SECRET not in str(ei.value) and SECRET not in repr(captured)


def test_client_credentials_issuer_down_is_retryable(clock: Clock) -> None:
    c = make(lambda r: httpx.Response(503, text="maintenance"), clock, auth=oidc_cc())
    with pytest.raises(RetryableError, match="503"):
        c.token()


# ---------------------------------------------------------------- x509 and TLS

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("x509")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=edge-agent/O=Lab"], check=True, capture_output=True)
    return cert, key


def test_x509_authenticates_with_the_certificate(server: Server, clock: Clock, certs: tuple[Path, Path]) -> None:
    c = make(server, clock, auth={"type": "x509", "cert": str(certs[0]), "key": str(certs[1])})
    c.get_did("test", "f1")
    auth = [r for r in server.requests if r.url.path.startswith("/auth/")]
    assert [r.url.path for r in auth] == ["/auth/x509"]
    assert auth[0].headers["X-Rucio-Account"] == "root" and "X-Rucio-Password" not in auth[0].headers


def test_x509_with_an_unreadable_certificate_is_an_auth_failure(server: Server, clock: Clock,
                                                                 tmp_path: Path) -> None:
    c = make(server, clock, auth={"type": "x509", "cert": str(tmp_path / "proxy.pem")})
    with pytest.raises(AuthFailed, match="cannot load the client certificate .*proxy.pem"):
        c.token()


def test_tls_is_verified_by_default_and_ca_cert_builds_a_context(certs: tuple[Path, Path]) -> None:
    assert RucioClient(settings())._verify is True
    ctx = RucioClient(settings(ca_cert=str(certs[0])))._verify
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_tls_verify_off_is_loud() -> None:
    with capture_logs() as captured:
        ctx = RucioClient(settings(tls_verify=False))._verify
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_NONE
    assert any(e["log_level"] == "warning" and "TLS VERIFICATION IS OFF" in e["event"] for e in captured)


def test_missing_ca_cert_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_cert"):
        RucioClient(settings(ca_cert=str(tmp_path / "nope.pem")))


# ---------------------------------------------------------------- the error table

@pytest.mark.parametrize(("status", "cls", "kind"), [
    (409, "Duplicate", AlreadyDone),
    (409, "DataIdentifierAlreadyExists", AlreadyDone),
    (409, "FileAlreadyExists", AlreadyDone),
    (409, "DuplicateContent", AlreadyDone),
    (409, "DuplicateRule", AlreadyDone),
    (500, "DatabaseException", RetryableError),
    (500, "RucioException", RetryableError),
    (503, "DatabaseException", RetryableError),
    (500, "", RetryableError),
    (502, "", RetryableError),
    (404, "", RetryableError),                   # not Rucio's answer: a proxy, a wrong url
    (409, "ReplicationRuleCreationTemporaryFailed", RetryableError),
    (401, "CannotAuthenticate", AuthFailed),
    (404, "ScopeNotFound", NotFound),
    (404, "RSENotFound", NotFound),
    (404, "DataIdentifierNotFound", NotFound),
    (500, "ReplicaNotFound", NotFound),          # PUT /replicas says not-found with a 500
    (400, "InvalidObject", PermanentError),
    (400, "InvalidPath", PermanentError),
    (400, "ValueError", PermanentError),
    (500, "InvalidObject", PermanentError),      # > 1000 items
    (500, "UnsupportedOperation", PermanentError),
    (409, "InsufficientAccountLimit", PermanentError),
    (409, "InsufficientTargetRSEs", PermanentError),
    (409, "InvalidRSEExpression", PermanentError),
    (409, "UnsupportedOperation", PermanentError),
    (423, "ReplicaIsLocked", PermanentError),
    (401, "AccessDenied", PermanentError),
])
def test_error_table(status: int, cls: str, kind: type[Exception]) -> None:
    err = rucio_error(status, cls or None, "the message", "POST /rules/ (test:f1)", "account root (userpass)")
    assert isinstance(err, kind)
    if kind is not AuthFailed and kind is not RetryableError:
        assert not isinstance(err, RetryableError)
    assert "POST /rules/ (test:f1)" in str(err) and "the message" in str(err)
    if cls:
        assert cls in str(err)


def test_database_locked_message_is_retryable_whatever_the_class() -> None:
    err = rucio_error(500, "RucioException", "(sqlite3.OperationalError) database is locked", "POST /replicas")
    assert isinstance(err, RetryableError)


def test_permanent_message_reads_well() -> None:
    err = rucio_error(409, "InsufficientAccountLimit", "there is insufficient quota on RSE EDGE_LAKE1",
                      "POST /rules/ (test:f1, 2 copies on lake=true)")
    assert str(err) == ("Rucio refused POST /rules/ (test:f1, 2 copies on lake=true): 409 InsufficientAccountLimit: "
                        "there is insufficient quota on RSE EDGE_LAKE1")


def test_error_class_from_the_json_body_when_headers_lack_it(server: Server, clock: Clock) -> None:
    server.routes[("GET", "/dids/test/nope")] = lambda r: httpx.Response(
        404, json={"ExceptionClass": "DataIdentifierNotFound", "ExceptionMessage": "Data identifier not found"})
    with pytest.raises(NotFound, match="DataIdentifierNotFound"):
        make(server, clock).get_did("test", "nope")


def test_connection_refused_and_timeouts_are_retryable(clock: Clock) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)
    with pytest.raises(RetryableError, match=r"^Rucio at http://rucio.test: connection refused \(GET /ping\)$"):
        make(refused, clock).ping()
    with pytest.raises(RetryableError, match="no answer in time"):
        make(slow, clock).ping()


def test_a_busy_server_is_asked_again_briefly(server: Server, clock: Clock) -> None:
    answers = [error(500, "DatabaseException", "An unknown Database Exception has occurred."),
               error(503, "DatabaseException", "too many requests"), httpx.Response(201, text="Created")]
    server.routes[("POST", "/replicas")] = lambda r: answers.pop(0)
    sleeps: list[float] = []
    c = make(server, clock, sleeps=sleeps)
    c.add_replicas("EDGE_LAKE1", [{"scope": "test", "name": "f1", "bytes": 1, "adler32": "00000001"}])
    assert sleeps == [0.5, 1.5] and not answers
    server.routes[("POST", "/replicas")] = lambda r: error(500, "RucioException",
                                                           "(sqlite3.OperationalError) database is locked")
    with pytest.raises(RetryableError, match="database is locked"):
        c.add_replicas("EDGE_LAKE1", [{"scope": "test", "name": "f1"}])


# ---------------------------------------------------------------- calls

def test_lines_answers_with_infinity() -> None:
    r = httpx.Response(200, text='{"a": 1}\n\n{"LAKE1": Infinity}\n')
    assert RucioClient.lines(r) == [{"a": 1}, {"LAKE1": float("inf")}]
    assert RucioClient.lines(httpx.Response(200, text='["x"]')) == ["x"]
    assert RucioClient.lines(httpx.Response(200, text="")) == []


def test_add_replicas_in_batches(server: Server, clock: Clock) -> None:
    bodies: list[Any] = []
    server.routes[("POST", "/replicas")] = lambda r: (bodies.append(json.loads(r.content)),
                                                      httpx.Response(201, text="Created"))[1]
    make(server, clock, batch_size=2).add_replicas(
        "BUF", [{"scope": "test", "name": f"f{i}", "bytes": 1, "adler32": "00000001"} for i in range(5)])
    assert [len(b["files"]) for b in bodies] == [2, 2, 1] and {b["rse"] for b in bodies} == {"BUF"}


def test_add_did_is_idempotent(server: Server, clock: Clock) -> None:
    answers = [httpx.Response(201, text="Created"),
               error(409, "DataIdentifierAlreadyExists", "Data Identifier already exists!")]
    server.routes[("POST", "/dids/test/ds1")] = lambda r: answers.pop(0)
    c = make(server, clock)
    assert c.add_did("test", "ds1", "DATASET") is True
    assert c.add_did("test", "ds1", "DATASET") is False


def test_attach_ignores_duplicates(server: Server, clock: Clock) -> None:
    bodies: list[Any] = []
    server.routes[("POST", "/dids/attachments")] = lambda r: (
        bodies.append(json.loads(r.content)), error(409, "DuplicateContent", "UNIQUE constraint failed"))[1]
    make(server, clock).attach([("test", "ct", [("test", "ds")]), ("test", "ds", [("test", "f1")])])
    assert bodies == [{"attachments": [{"scope": "test", "name": "ct", "dids": [{"scope": "test", "name": "ds"}]},
                                       {"scope": "test", "name": "ds", "dids": [{"scope": "test", "name": "f1"}]}],
                       "ignore_duplicate": True}]


def test_add_rule_and_duplicate_rule_gives_the_existing_id(server: Server, clock: Clock) -> None:
    bodies: list[Any] = []
    answers = [httpx.Response(201, text='["aaaa"]'), error(409, "DuplicateRule", "UNIQUE constraint failed")]
    server.routes[("POST", "/rules/")] = lambda r: (bodies.append(json.loads(r.content)), answers.pop(0))[1]
    server.routes[("GET", "/dids/test/f1/rules")] = lambda r: httpx.Response(200, text="\n".join(json.dumps(x) for x in [
        {"id": "other", "account": "root", "rse_expression": "lake=true", "copies": 1},
        {"id": "bbbb", "account": "someone", "rse_expression": "lake=true", "copies": 2},
        {"id": "aaaa", "account": "root", "rse_expression": "lake=true", "copies": 2}]) + "\n")
    c = make(server, clock)
    assert c.add_rule("test", "f1", 2, "lake=true", lifetime=86400, activity="Raw", grouping="NONE") == "aaaa"
    assert c.add_rule("test", "f1", 2, "lake=true", lifetime=86400, activity="Raw", grouping="NONE") == "aaaa"
    assert bodies[0] == {"dids": [{"scope": "test", "name": "f1"}], "account": "root", "copies": 2,
                         "rse_expression": "lake=true", "grouping": "NONE", "lifetime": 86400, "activity": "Raw"}


def test_duplicate_rule_that_cannot_be_found_is_retryable(server: Server, clock: Clock) -> None:
    server.routes[("POST", "/rules/")] = lambda r: error(409, "DuplicateRule", "dup")
    server.routes[("GET", "/dids/test/f1/rules")] = lambda r: httpx.Response(200, text="")
    with pytest.raises(RetryableError, match="DuplicateRule"):
        make(server, clock).add_rule("test", "f1", 2, "lake=true")


def test_tombstone_is_idempotent_and_a_lock_is_permanent(server: Server, clock: Clock) -> None:
    answers = [httpx.Response(201, text="Created"),
               error(404, "ReplicaNotFound", "Replica test:f1 on RSE BUF could not be found."),
               error(423, "ReplicaIsLocked", "Replica test:f1 on RSE BUF is locked.")]
    server.routes[("POST", "/replicas/tombstone")] = lambda r: answers.pop(0)
    c = make(server, clock)
    assert c.tombstone("BUF", "test", "f1") is True
    assert c.tombstone("BUF", "test", "f1") is False
    with pytest.raises(PermanentError, match="423 ReplicaIsLocked"):
        c.tombstone("BUF", "test", "f1")


def test_lfns2pfns_sends_repeated_lfn_params(server: Server, clock: Clock) -> None:
    server.routes[("GET", "/rses/LAKE1/lfns2pfns")] = lambda r: httpx.Response(
        200, json={lfn: f"http://h/{lfn}" for lfn in r.url.params.get_list("lfn")} | {"q": str(r.url.params)})
    out = make(server, clock).lfns2pfns("LAKE1", ["test:a", "test:b"], "http")
    assert out["test:a"] == "http://h/test:a" and out["q"] == "lfn=test%3Aa&lfn=test%3Ab&scheme=http&operation=write"


def test_rse_protocols_are_cached_for_a_while(server: Server, clock: Clock) -> None:
    n = {"calls": 0}

    def protocols(r: httpx.Request) -> httpx.Response:
        n["calls"] += 1
        return httpx.Response(200, json=[{"scheme": "http"}, {"scheme": "root"}])
    server.routes[("GET", "/rses/LAKE1/protocols")] = protocols
    c = make(server, clock)
    assert [p["scheme"] for p in c.rse_protocols("LAKE1")] == ["http", "root"]
    c.rse_protocols("LAKE1")
    clock.now += 601
    c.rse_protocols("LAKE1")
    assert n["calls"] == 2


def test_names_are_quoted_in_paths(server: Server, clock: Clock) -> None:
    server.routes[("GET", "/dids/test/a b+c")] = lambda r: httpx.Response(200, json={"raw": r.url.raw_path.decode()})
    assert make(server, clock).get_did("test", "a b+c")["raw"] == "/dids/test/a%20b%2Bc"


def test_update_replica_states_unknown_replica_is_not_found(server: Server, clock: Clock) -> None:
    server.routes[("PUT", "/replicas")] = lambda r: error(500, "ReplicaNotFound", "No row found")
    with pytest.raises(NotFound):
        make(server, clock).update_replica_states("LAKE2", [{"scope": "test", "name": "f1", "state": "A"}])


def test_client_credentials_issuer_unreachable_is_retryable_and_named(clock: Clock) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
    with pytest.raises(RetryableError, match=r"^token issuer at https://idp.test: connection refused"):
        make(refused, clock, auth=oidc_cc()).token()


def test_lfns2pfns_keeps_each_request_line_short_enough_for_the_server(server: Server, clock: Clock) -> None:
    """gunicorn refuses a request line over 4,094 bytes (414 URI Too Long): 50 names of 100
    characters, one job's worth, were refused whole and every file then asked for itself."""
    lines: list[int] = []

    def lfns2pfns(r: httpx.Request) -> httpx.Response:
        line = len(r.method) + 1 + len(r.url.raw_path) + len(" HTTP/1.1")
        lines.append(line)
        if line > 4094:
            return httpx.Response(414, text="<html>URI Too Long</html>")
        return httpx.Response(200, json={lfn: f"root://h//{lfn}" for lfn in r.url.params.get_list("lfn")})
    server.routes[("GET", "/rses/LAKE1/lfns2pfns")] = lfns2pfns
    names = [f"test:{i:03d}_" + "x" * 95 for i in range(50)]
    out = make(server, clock).lfns2pfns("LAKE1", names, "root")
    assert out == {n: f"root://h//{n}" for n in names}
    assert 1 < len(lines) <= 3 and max(lines) <= 4094
    lines.clear()
    short = [f"test:f{i}" for i in range(128)]     # short names: many in one call
    assert len(make(server, clock).lfns2pfns("LAKE1", short, "root")) == 128 and len(lines) == 1
