"""A small Rucio REST client on httpx: token authentication, the dozen calls the agent needs, and
Rucio's answers translated into the error taxonomy in one place (`rucio_error`).

No rucio-clients dependency. The calls and their answers were measured against Rucio 41.5.1
(/work/shared/notes/rucio-server.md). One instance is shared by the worker threads: one
httpx.Client (a connection pool), one cached token renewed a few minutes before it expires.

Secrets (password, client secret, tokens) never reach a log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import structlog

from ..errors import AlreadyDone, ConfigError, EdgeAgentError, PermanentError, RetryableError
from ..settings import RucioSettings
from .rucio_server import ServerRelease

log = structlog.get_logger("edge_agent.lake.rucio")

RENEW_BEFORE_S = 300.0           # renew a token this long before it expires
DEFAULT_TOKEN_LIFETIME_S = 3600.0  # Rucio's own, fixed in its code; used when the answer does not say
OPAQUE_TOKEN_RECHECK_S = 60.0    # a token file whose token has no readable expiry is re-read this often
# lfns2pfns takes its names as query parameters, and a server's front end refuses a long request
# line (gunicorn: 4,094 bytes, 414 URI Too Long; Apache: 8,190): the names' share of it, encoded.
LFNS_QUERY_BYTES = 3000
PROTOCOLS_TTL_S = 600.0          # an RSE's protocols are looked up again after this long
BUSY_RETRY_DELAYS_S = (0.5, 1.5)  # a server that says "busy" (database locked, 503) is asked again at once
MAX_MESSAGE = 500                # Rucio's messages can hold a whole RSE description
_T = TypeVar("_T")   # what a cached RSE answer parses to

# ---------------------------------------------------------------- errors

# Rucio exception classes that mean "it is there already": success for an idempotent step.
ALREADY_CLASSES = frozenset({
    "Duplicate", "DataIdentifierAlreadyExists", "FileAlreadyExists", "FileReplicaAlreadyExists",
    "DuplicateContent", "DuplicateRule", "SubscriptionDuplicate", "LifetimeExceptionDuplicate"})
# The credentials were not accepted: retryable (the data is kept, the agent waits, health() says why).
AUTH_CLASSES = frozenset({"CannotAuthenticate", "IdentityError", "IdentityNotFound", "NoAuthInformation",
                          "CannotAuthorize"})
# Passing trouble on the server side, whatever the status code.
RETRYABLE_CLASSES = frozenset({
    "DatabaseException", "ServiceUnavailable", "ResourceTemporaryUnavailable",
    "ReplicationRuleCreationTemporaryFailed", "ServerConnectionException", "RSENotConnected",
    "TransferToolTimeout"})
# Status codes that are passing by nature when Rucio itself did not name the problem.
RETRYABLE_STATUS = frozenset({404, 408, 425, 429, 500, 502, 503, 504})
BUSY_MARKERS = ("database is locked", "QueuePool", "too many requests")


class RucioAnswer(EdgeAgentError):
    """Mixed into the taxonomy: what Rucio answered, for callers that must tell cases apart."""

    def __init__(self, message: str, status: int | None = None, rucio_class: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.rucio_class = rucio_class


class RucioAlreadyDone(RucioAnswer, AlreadyDone):
    """Rucio answered that the effect exists already (success for an idempotent call)."""


class RucioRetryable(RucioAnswer, RetryableError):
    """Rucio could not answer now (a timeout, a 5xx): worth asking again."""


class RucioPermanent(RucioAnswer, PermanentError):
    """Rucio refused, and asking again will not change that."""


class NotFound(RucioPermanent):
    """Rucio says the thing does not exist (404 *NotFound, or a 500 carrying a *NotFound class)."""


class AuthFailed(RucioRetryable):
    """Rucio (or the token issuer) did not accept the agent's credentials."""


class SigningRefused(RucioRetryable):
    """Rucio will not sign URLs for the agent's account: a permission the site grants (the 38
    LTS series signs for root only; later releases also for an account with the attribute
    `sign-url`). About the account, not the file: files wait until it is granted."""


def rucio_error(status: int, rucio_class: str | None, message: str, call: str,
                who: str = "") -> RucioAnswer:
    """The one translation of a Rucio answer into the taxonomy.

    `call` names what was asked ("POST /rules/ (test:f1, 2 copies on lake=true)"), `who` the
    account and auth type ("account root (userpass)") for credential failures.
    """
    cls = rucio_class or ""
    text = " ".join(message.split())[:MAX_MESSAGE]
    said = f"{status} {cls}: {text}" if cls else f"{status}: {text or 'no message'}"
    if cls in ALREADY_CLASSES:
        return RucioAlreadyDone(f"Rucio {call}: already there ({said})", status, cls)
    if cls in AUTH_CLASSES or (status == 401 and not cls):
        return AuthFailed(f"Rucio rejected the credentials of {who or 'the agent'}: {said} (during {call}); "
                          "files wait until this is fixed", status, cls)
    if cls.endswith("NotFound"):
        return NotFound(f"Rucio {call}: {said}", status, cls)
    if cls in RETRYABLE_CLASSES or (status >= 500 and cls in ("", "RucioException")) \
            or any(m.lower() in text.lower() for m in BUSY_MARKERS):
        return RucioRetryable(f"Rucio {call}: {said} (will retry)", status, cls)
    if not cls and status in RETRYABLE_STATUS:
        # not an answer from Rucio's code (a proxy, a wrong URL, a restarting server)
        return RucioRetryable(f"Rucio {call}: {said} (not a Rucio answer: wrong url or a proxy in the way?)",
                              status, cls)
    if status == 401 or status == 403 or cls in ("AccessDenied", "ScopeAccessDenied", "RSEAccessDenied"):
        return RucioPermanent(f"Rucio denied {call} to {who or 'the agent'}: {said}", status, cls)
    return RucioPermanent(f"Rucio refused {call}: {said}", status, cls)


def _answer_class(r: httpx.Response) -> tuple[str | None, str]:
    """(ExceptionClass, ExceptionMessage) from the headers, else from a JSON body, else the text."""
    cls = r.headers.get("ExceptionClass")
    msg = r.headers.get("ExceptionMessage")
    if cls is None:
        try:
            body = json.loads(r.text) if r.text else None
        except ValueError:
            body = None
        if isinstance(body, dict) and "ExceptionClass" in body:
            cls, msg = str(body["ExceptionClass"]), str(body.get("ExceptionMessage", ""))
    return cls, msg if msg is not None else r.text[:MAX_MESSAGE]


def _is_busy(err: RucioAnswer) -> bool:
    return err.status == 503 or err.rucio_class == "DatabaseException" or \
        any(m.lower() in str(err).lower() for m in BUSY_MARKERS)


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return text


# ---------------------------------------------------------------- tokens

@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float
    expires_at: float


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (not verified: Rucio verifies), or None if it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _renew_at(now: float, lifetime: float) -> float:
    # short-lived tokens are renewed half-way, long ones RENEW_BEFORE_S before their end
    return now + max(lifetime - RENEW_BEFORE_S, lifetime / 2)


# ---------------------------------------------------------------- the client

class RucioClient:
    """Rucio's REST API, as much of it as the agent needs. Thread-safe.

    `transport` replaces the network (httpx.MockTransport in tests); `clock` and `sleep` the
    time (token renewal, caches, the short wait before asking a busy server again).
    """

    def __init__(self, settings: RucioSettings, *, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.url = settings.url
        self.auth_url = settings.auth_url or settings.url
        self.account = settings.account
        self.who = f"account {settings.account} ({settings.auth.type})"
        self._clock = clock
        self._sleep = sleep
        self._transport = transport
        self._timeout = httpx.Timeout(settings.timeout_seconds, connect=min(settings.timeout_seconds, 15.0))
        self._verify = self._tls_context()
        self._http = httpx.Client(verify=self._verify, timeout=self._timeout, transport=transport,
                                  limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
                                  headers={"User-Agent": "edge-agent", "Accept": "application/json, */*"})
        self._auth_lock = threading.Lock()
        self._token: _Token | None = None
        self._token_file_sig: tuple[int, int, int] | None = None
        self._cache_lock = threading.Lock()
        self._protocols: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._attributes: dict[str, tuple[float, dict[str, Any]]] = {}
        # rebound, never mutated: scrub() reads it without a lock
        self._secrets: tuple[str, ...] = tuple(
            x.get_secret_value() for x in (settings.auth.password, settings.auth.client_secret)
            if x is not None and x.get_secret_value())
        self._tokens: tuple[str, ...] = ()
        self.server = ServerRelease(self.url)
        # RSE -> (why Rucio last refused to sign a URL for it, the operation, the URL), cleared by a
        # signature: health() says it, and asks again
        self.signing_refused: dict[str, tuple[str, str, str]] = {}

    # ------------------------------------------------------------ TLS
    def _tls_context(self) -> ssl.SSLContext | bool:
        s = self.settings
        if s.ca_cert is None and s.tls_verify:
            return True
        ctx = self._base_context()
        if not s.tls_verify:
            log.warning("TLS VERIFICATION IS OFF for Rucio: anyone on the path can read the agent's credentials "
                        "and forge the lake's answers; set lake.rucio.tls_verify = true", url=self.url)
        return ctx

    def _base_context(self) -> ssl.SSLContext:
        s = self.settings
        ca = s.ca_cert
        try:
            if ca is not None:
                ctx = ssl.create_default_context(cafile=str(ca) if not ca.is_dir() else None,
                                                 capath=str(ca) if ca.is_dir() else None)
            else:
                ctx = ssl.create_default_context()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"lake.rucio.ca_cert = {ca}: cannot be loaded: {exc}") from None
        if not s.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # ------------------------------------------------------------ authentication
    def token(self) -> str:
        """A valid token: the cached one, or a new one when it is near its end (or the token
        file changed). Raises AuthFailed (credentials refused) or RetryableError (unreachable)."""
        with self._auth_lock:
            t = self._token
            if t is not None and self._clock() < t.renew_at and not self._token_file_changed():
                return t.value
            self._token = self._authenticate()
            return self._token.value

    def invalidate(self, used: str | None = None) -> None:
        """Forget the cached token (only if it is still `used`: another thread may have renewed it)."""
        with self._auth_lock:
            if self._token is not None and (used is None or self._token.value == used):
                self._token = None

    def _authenticate(self) -> _Token:
        kind = self.settings.auth.type
        if kind == "userpass":
            t = self._auth_userpass()
        elif kind == "x509":
            t = self._auth_x509()
        elif self.settings.auth.token_file is not None:
            t = self._auth_token_file()
        else:
            t = self._auth_client_credentials()
        self._remember(t.value)
        again = self._token is not None and self._token.value == t.value
        (log.debug if again else log.info)("rucio token obtained", account=self.account, auth=kind,
                                           valid_for_s=round(t.expires_at - self._clock()))
        return t

    def _remember(self, token: str) -> None:
        if token not in self._tokens:
            self._tokens = (self._tokens + (token,))[-5:]

    def _auth_headers(self) -> dict[str, str]:
        h = {"X-Rucio-Account": self.account, "X-Rucio-AppID": "edge-agent"}
        if self.settings.vo:
            h["X-Rucio-VO"] = self.settings.vo
        return h

    def _rucio_token(self, r: httpx.Response, call: str) -> _Token:
        if r.status_code != 200 or not r.headers.get("X-Rucio-Auth-Token"):
            cls, msg = _answer_class(r)
            if r.status_code == 200:
                cls, msg = "NoToken", "the answer carried no X-Rucio-Auth-Token"
            if r.status_code in (200, 400, 401, 403):
                # whatever Rucio calls it, a refused login is about the credentials
                said = f"{r.status_code} {cls}: {msg}" if cls else f"{r.status_code}: {msg}"
                raise AuthFailed(self.scrub(f"Rucio rejected the credentials of {self.who}: {said} "
                                            f"(during {call}); files wait until this is fixed"),
                                 r.status_code, cls)
            raise rucio_error(r.status_code, cls, self.scrub(msg), call, self.who)
        value = r.headers["X-Rucio-Auth-Token"]
        now = self._clock()
        expires, said_at = _http_date(r.headers.get("X-Rucio-Auth-Token-Expires")), _http_date(r.headers.get("Date"))
        # measured against the server's own clock when it says what time it is: a skewed local
        # clock must not make every token look expired (or eternal)
        if expires is not None:
            lifetime = expires - (said_at if said_at is not None else now)
        else:
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        lifetime = max(lifetime, 60.0)
        return _Token(value, _renew_at(now, lifetime), now + lifetime)

    def _auth_userpass(self) -> _Token:
        a = self.settings.auth
        assert a.username and a.password, "settings validation guarantees them"
        call = "GET /auth/userpass"
        r = self._raw("GET", self.auth_url + "/auth/userpass", call, headers={
            **self._auth_headers(), "X-Rucio-Username": a.username,
            "X-Rucio-Password": a.password.get_secret_value()})
        return self._rucio_token(r, call)

    def _auth_x509(self) -> _Token:
        # a fresh TLS context per authentication: a proxy renewed on disk (voms-proxy-init, a
        # cron job) is presented as it is now, on a connection of its own
        a = self.settings.auth
        assert a.cert is not None
        call = "GET /auth/x509"
        try:
            ctx = self._base_context()
            ctx.load_cert_chain(str(a.cert), str(a.key) if a.key else None)
        except (OSError, ssl.SSLError, ConfigError) as exc:
            raise AuthFailed(f"Rucio x509 authentication of {self.who}: cannot load the client certificate "
                             f"{a.cert}{' / key ' + str(a.key) if a.key else ''}: {exc}") from None
        c = httpx.Client(verify=ctx, timeout=self._timeout, transport=self._transport)
        try:
            r = self._raw("GET", self.auth_url + "/auth/x509", call, headers=self._auth_headers(), http=c)
        finally:
            if self._transport is None:   # an injected transport belongs to the caller
                c.close()
        return self._rucio_token(r, call)

    def _token_file_changed(self) -> bool:
        path = self.settings.auth.token_file
        if self.settings.auth.type != "oidc" or path is None:
            return False
        return self._file_sig(path) != self._token_file_sig

    @staticmethod
    def _file_sig(path: os.PathLike[str] | str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _auth_token_file(self) -> _Token:
        path = self.settings.auth.token_file
        assert path is not None
        sig = self._file_sig(path)
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise AuthFailed(f"Rucio oidc authentication of {self.who}: cannot read the token file {path}: "
                             f"{exc.strerror or exc}") from None
        self._token_file_sig = sig
        if not value:
            raise AuthFailed(f"Rucio oidc authentication of {self.who}: the token file {path} is empty")
        self._remember(value)
        now = self._clock()
        exp = jwt_expiry(value)
        if exp is None:
            return _Token(value, now + OPAQUE_TOKEN_RECHECK_S, now + OPAQUE_TOKEN_RECHECK_S)
        if exp <= now:
            raise AuthFailed(f"Rucio oidc authentication of {self.who}: the token in {path} expired "
                             f"{now - exp:.0f} s ago; is whatever refreshes it (oidc-agent, htgettoken) running?")
        # near its end: read the file again at every use until the refresher has replaced it
        return _Token(value, _renew_at(now, exp - now), exp)

    def _auth_client_credentials(self) -> _Token:
        a = self.settings.auth
        assert a.token_url and a.client_id and a.client_secret
        call = f"POST {a.token_url} (client credentials of {a.client_id})"
        r = self._raw("POST", a.token_url, call, service="token issuer", data={
            "grant_type": "client_credentials", "client_id": a.client_id,
            "client_secret": a.client_secret.get_secret_value(), "scope": a.scope, "audience": a.audience})
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
            why = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            why = self.scrub(str(why or r.text[:200] or "no access_token in the answer"))
            if r.status_code >= 500 or r.status_code == 429:
                raise RucioRetryable(f"token issuer {call}: {r.status_code}: {why} (will retry)", r.status_code)
            raise AuthFailed(f"the token issuer rejected the credentials of client {a.client_id} for "
                             f"{self.who}: {r.status_code}: {why}", r.status_code)
        value = str(body["access_token"])
        self._remember(value)
        now = self._clock()
        try:
            lifetime = float(body.get("expires_in") or 0)
        except (TypeError, ValueError):
            lifetime = 0.0
        if lifetime <= 0:
            exp = jwt_expiry(value)
            lifetime = exp - now if exp else DEFAULT_TOKEN_LIFETIME_S
        lifetime = max(lifetime, 60.0)
        return _Token(value, _renew_at(now, lifetime), now + lifetime)

    # ------------------------------------------------------------ transport
    def scrub(self, text: str) -> str:
        """`text` with every secret the client knows replaced by ***."""
        for secret in sorted(self._secrets + self._tokens, key=len, reverse=True):
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text

    def _raw(self, method: str, url: str, call: str, *, http: httpx.Client | None = None,
             service: str = "Rucio", **kw: Any) -> httpx.Response:
        started = time.monotonic()
        try:
            r = (http or self._http).request(method, url, **kw)
        except httpx.TransportError as exc:
            base = url.split("/", 3)
            where = "/".join(base[:3]) if len(base) >= 3 else url
            raise RucioRetryable(self.scrub(f"{service} at {where}: {_reason(exc)} ({call})")) from None
        log.debug("rucio call", call=call, status=r.status_code, ms=round((time.monotonic() - started) * 1000, 1))
        return r

    def request(self, method: str, path: str, call: str | None = None, *, auth: bool = True,
                json_body: Any = None, params: Mapping[str, Any] | None = None) -> httpx.Response:
        """One call to Rucio: the token added, renewed once on 401, a busy server asked again
        (briefly), any other failure raised as the taxonomy says."""
        call = call or f"{method} {path}"
        reauthed = False
        busy = 0
        while True:
            headers: dict[str, str] = {}
            token = None
            if auth:
                token = self.token()
                headers["X-Rucio-Auth-Token"] = token
            r = self._raw(method, self.url + path, call, headers=headers, json=json_body, params=params)
            if r.is_success:
                return r
            cls, msg = _answer_class(r)
            err = rucio_error(r.status_code, cls, self.scrub(msg), call, self.who)
            if isinstance(err, AuthFailed) and token is not None and not reauthed:
                # the cached token expired early, was revoked, or the server lost it
                log.info("rucio token refused, authenticating again", account=self.account, call=call)
                self.invalidate(token)
                reauthed = True
                continue
            if isinstance(err, RetryableError) and _is_busy(err) and busy < len(BUSY_RETRY_DELAYS_S):
                self._sleep(BUSY_RETRY_DELAYS_S[busy])
                busy += 1
                continue
            raise err

    @staticmethod
    def lines(r: httpx.Response) -> list[Any]:
        """A "lines" answer (one JSON object per line), or a plain JSON list. Rucio writes
        `Infinity` for unlimited values, which Python's json reads."""
        text = r.text.strip()
        if not text:
            return []
        if text.startswith("["):
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _batches(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        n = self.settings.batch_size
        for i in range(0, len(items), n):
            yield items[i:i + n]

    # ------------------------------------------------------------ calls
    def ping(self) -> str:
        """Rucio's version; no token needed. The first answer (and a changed one) is logged."""
        r = self.request("GET", "/ping", "GET /ping", auth=False)
        try:
            version = str(r.json().get("version", "?"))
        except (ValueError, AttributeError):
            version = "?"
        self.server.seen(version)
        return version

    def get_did(self, scope: str, name: str) -> dict[str, Any]:
        """type, bytes, adler32, md5... of a DID. Raises NotFound."""
        r = self.request("GET", f"/dids/{_q(scope)}/{_q(name)}", f"GET /dids/{scope}/{name}")
        data: dict[str, Any] = r.json()
        return data

    def bulk_meta(self, dids: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """The DID rows (scope, name, did_type, bytes, adler32, md5...) of those of `dids` that exist,
        in bulk (POST /dids/bulkmeta): a missing DID is simply not listed."""
        out: list[dict[str, Any]] = []
        for batch in self._batches(list(dids)):
            r = self.request("POST", "/dids/bulkmeta", f"POST /dids/bulkmeta ({_names(batch)})",
                             json_body={"dids": [{"scope": s, "name": n} for s, n in batch], "plugin": "DID_COLUMN"})
            out.extend(x for x in self.lines(r) if isinstance(x, dict))
        return out

    def bulk_set_metadata(self, entries: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        """Set the metadata of many DIDs, one transaction per call (POST /dids/bulkdidsmeta): a key
        or value refused for one DID refuses the whole call."""
        for batch in self._batches(list(entries)):
            self.request("POST", "/dids/bulkdidsmeta", f"POST /dids/bulkdidsmeta ({len(batch)} DIDs)",
                         json_body={"dids": [{"scope": s, "name": n, "meta": dict(m)} for s, n, m in batch]})

    def list_content(self, scope: str, name: str) -> list[dict[str, Any]]:
        """The children of a dataset or container: scope, name, type, bytes, adler32. Raises NotFound."""
        r = self.request("GET", f"/dids/{_q(scope)}/{_q(name)}/dids", f"GET /dids/{scope}/{name}/dids")
        return [x for x in self.lines(r) if isinstance(x, dict)]

    def add_did(self, scope: str, name: str, did_type: str) -> bool:
        """Create a DATASET or CONTAINER; False if it exists already."""
        try:
            self.request("POST", f"/dids/{_q(scope)}/{_q(name)}", f"POST /dids/{scope}/{name} ({did_type})",
                         json_body={"type": did_type})
        except AlreadyDone:
            return False
        return True

    def attach(self, attachments: Sequence[tuple[str, str, Sequence[tuple[str, str]]]]) -> None:
        """Attach children to parents: [(scope, name, [(child_scope, child_name)...])...].
        Children already attached are success (ignore_duplicate)."""
        body = [{"scope": s, "name": n, "dids": [{"scope": cs, "name": cn} for cs, cn in kids]}
                for s, n, kids in attachments]
        what = ", ".join(f"{len(k)} into {s}:{n}" for s, n, k in attachments)
        for batch in self._batches(body):
            try:
                self.request("POST", "/dids/attachments", f"POST /dids/attachments ({what})",
                             json_body={"attachments": list(batch), "ignore_duplicate": True})
            except AlreadyDone:
                pass

    def detach(self, scope: str, name: str, children: Sequence[tuple[str, str]]) -> None:
        """Detach children from a dataset or container. Raises NotFound if one is not attached."""
        self.request("DELETE", f"/dids/{_q(scope)}/{_q(name)}/dids", f"DELETE /dids/{scope}/{name}/dids "
                     f"({_names(children)})", json_body={"dids": [{"scope": s, "name": n} for s, n in children]})

    def close_did(self, scope: str, name: str) -> bool:
        """Close a dataset (nothing can be attached to it afterwards); False if it was closed already
        (Rucio answers UnsupportedOperation then, as for a file: `get_did` tells them apart)."""
        try:
            self.request("PUT", f"/dids/{_q(scope)}/{_q(name)}/status", f"PUT /dids/{scope}/{name}/status (close)",
                         json_body={"open": False})
        except RucioPermanent as exc:
            if exc.rucio_class != "UnsupportedOperation" or self.get_did(scope, name).get("open") is not False:
                raise
            return False
        return True

    def set_metadata(self, scope: str, name: str, meta: Mapping[str, Any]) -> None:
        self.request("POST", f"/dids/{_q(scope)}/{_q(name)}/meta", f"POST /dids/{scope}/{name}/meta",
                     json_body={"meta": dict(meta)})

    def set_metadata_key(self, scope: str, name: str, key: str, value: Any) -> None:
        self.request("POST", f"/dids/{_q(scope)}/{_q(name)}/meta/{_q(key)}",
                     f"POST /dids/{scope}/{name}/meta/{key}", json_body={"value": value})

    def add_replicas(self, rse: str, files: Sequence[Mapping[str, Any]]) -> None:
        """Register replicas on `rse` (creating the file DIDs). Rucio accepts a replica that
        exists already silently, even with other bytes or checksum: compare afterwards."""
        for batch in self._batches(list(files)):
            what = _names(batch)
            try:
                self.request("POST", "/replicas", f"POST /replicas ({what} on {rse})",
                             json_body={"rse": rse, "files": [dict(f) for f in batch]})
            except AlreadyDone:
                pass

    def update_replica_states(self, rse: str, files: Sequence[Mapping[str, Any]]) -> None:
        """Set replica states on `rse`: files = [{"scope", "name", "state": one letter A U C B D S T}].
        An unknown replica raises NotFound (Rucio answers 500 ReplicaNotFound)."""
        for batch in self._batches(list(files)):
            self.request("PUT", "/replicas", f"PUT /replicas ({_names(batch)} on {rse})",
                         json_body={"rse": rse, "files": [dict(f) for f in batch]})

    def list_replicas(self, dids: Sequence[tuple[str, str]], schemes: Sequence[str] | None = None,
                      all_states: bool = True) -> list[dict[str, Any]]:
        """One row per file: bytes, adler32, md5, pfns {pfn: {rse...}}, rses {RSE: [pfn]},
        states {RSE: "AVAILABLE"...}. States are listed even for RSEs without a PFN in `schemes`."""
        out: list[dict[str, Any]] = []
        for batch in self._batches(list(dids)):
            body: dict[str, Any] = {"dids": [{"scope": s, "name": n} for s, n in batch], "all_states": all_states}
            if schemes:
                body["schemes"] = list(schemes)
            r = self.request("POST", "/replicas/list", f"POST /replicas/list ({_names(batch)})", json_body=body)
            out.extend(self.lines(r))
        return out

    def lfns2pfns(self, rse: str, lfns: Sequence[str], scheme: str, operation: str = "write") -> dict[str, str]:
        """{"scope:name": pfn} where `rse` would keep each file (deterministic RSEs). The names are
        query parameters: they go in as few calls as keep each request line short enough."""
        out: dict[str, str] = {}
        for chunk in _query_chunks(lfns, LFNS_QUERY_BYTES):
            r = self.request("GET", f"/rses/{_q(rse)}/lfns2pfns", f"GET /rses/{rse}/lfns2pfns ({scheme}, {operation})",
                             params={"lfn": chunk, "scheme": scheme, "operation": operation})
            out.update(r.json())
        return out

    def rse_protocols(self, rse: str) -> list[dict[str, Any]]:
        """The protocols of `rse` (cached for a few minutes)."""
        def parse(data: Any) -> list[dict[str, Any]]:
            return data if isinstance(data, list) else list(data.get("protocols", []))
        return self._cached_rse_get(self._protocols, rse, "protocols", parse)

    def add_rule(self, scope: str, name: str, copies: int, rse_expression: str, *,
                 lifetime: int | None = None, activity: str | None = None, grouping: str = "DATASET",
                 source_replica_expression: str | None = None) -> str:
        """A replication rule on one DID; its id. An identical rule (same DID, account,
        expression and copies: Rucio's uniqueness) that exists already gives its id.
        `source_replica_expression`: the only RSEs the rule's transfers may read from (not part of
        that uniqueness: a rule found so may have other sources, and still asks the same copies)."""
        body: dict[str, Any] = {"dids": [{"scope": scope, "name": name}], "account": self.account,
                                "copies": copies, "rse_expression": rse_expression, "grouping": grouping}
        if lifetime is not None:
            body["lifetime"] = lifetime
        if activity is not None:
            body["activity"] = activity
        if source_replica_expression is not None:
            body["source_replica_expression"] = source_replica_expression
        call = f"POST /rules/ ({scope}:{name}, {copies} copies on {rse_expression})"
        try:
            r = self.request("POST", "/rules/", call, json_body=body)
        except AlreadyDone:
            for rule in self.did_rules(scope, name):
                if rule.get("account") == self.account and rule.get("rse_expression") == rse_expression \
                        and rule.get("copies") == copies:
                    return str(rule["id"])
            raise RucioRetryable(f"Rucio {call}: 409 DuplicateRule, but no such rule is listed for "
                                 f"{scope}:{name} (deleted meanwhile?); will try again") from None
        ids = r.json()
        return str(ids[0])

    def add_rules(self, dids: Sequence[tuple[str, str]], copies: int, rse_expression: str, *,
                  lifetime: int | None = None, activity: str | None = None, grouping: str = "DATASET") -> list[str]:
        """One replication rule per DID, in one call (one transaction); their ids, in the DIDs' order.
        A rule that exists already for one of them refuses the whole call (RucioAlreadyDone)."""
        body: dict[str, Any] = {"dids": [{"scope": s, "name": n} for s, n in dids], "account": self.account,
                                "copies": copies, "rse_expression": rse_expression, "grouping": grouping}
        if lifetime is not None:
            body["lifetime"] = lifetime
        if activity is not None:
            body["activity"] = activity
        r = self.request("POST", "/rules/", f"POST /rules/ ({_names(dids)}, {copies} copies on {rse_expression})",
                         json_body=body)
        ids = [str(i) for i in r.json()]
        if len(ids) != len(dids):
            raise RucioRetryable(f"Rucio made {len(ids)} rules for {len(dids)} DIDs; will ask again")
        return ids

    def did_rules(self, scope: str, name: str) -> list[dict[str, Any]]:
        r = self.request("GET", f"/dids/{_q(scope)}/{_q(name)}/rules", f"GET /dids/{scope}/{name}/rules")
        return [x for x in self.lines(r) if isinstance(x, dict)]

    def get_rule(self, rule_id: str) -> dict[str, Any]:
        """state, locks_ok_cnt... of a rule. Raises NotFound."""
        r = self.request("GET", f"/rules/{_q(rule_id)}", f"GET /rules/{rule_id}")
        data: dict[str, Any] = r.json()
        return data

    def rule_locks(self, rule_id: str) -> list[dict[str, Any]]:
        """The replica locks of a rule, one per (file, RSE): scope, name, rse, state (OK, REPLICATING,
        STUCK). Raises NotFound."""
        r = self.request("GET", f"/rules/{_q(rule_id)}/locks", f"GET /rules/{rule_id}/locks")
        return [x for x in self.lines(r) if isinstance(x, dict)]

    def tombstone(self, rse: str, scope: str, name: str) -> bool:
        """Mark a replica for deletion by the reaper; False if there was no such replica.
        A replica locked by a rule raises PermanentError (423 ReplicaIsLocked)."""
        try:
            self.request("POST", "/replicas/tombstone", f"POST /replicas/tombstone ({scope}:{name} on {rse})",
                         json_body={"replicas": [{"rse": rse, "scope": scope, "name": name}]})
        except NotFound:
            return False
        return True

    def rse_attributes(self, rse: str) -> dict[str, Any]:
        """The attributes of `rse` ({"sign_url": "s3", "lake": True, ...}), cached like the protocols."""
        return self._cached_rse_get(self._attributes, rse, "attr/", lambda data: data if isinstance(data, dict) else {})

    def _cached_rse_get(self, cache: dict[str, tuple[float, _T]], rse: str, what: str,
                        parse: Callable[[Any], _T]) -> _T:
        """GET /rses/<rse>/<what>, parsed, from `cache` while younger than PROTOCOLS_TTL_S (an RSE's
        protocols and attributes change rarely, and are asked for every copy)."""
        now = self._clock()
        with self._cache_lock:
            hit = cache.get(rse)
            if hit is not None and now - hit[0] < PROTOCOLS_TTL_S:
                return hit[1]
        r = self.request("GET", f"/rses/{_q(rse)}/{what}", f"GET /rses/{rse}/{what}")
        value = parse(r.json())
        with self._cache_lock:
            cache[rse] = (now, value)
        return value

    def signed_url(self, rse: str, operation: str, url: str, lifetime: int = 600, service: str = "s3") -> str:
        """A URL that Rucio signs with the RSE's own keys (rse-accounts.cfg) for one whole-object
        `operation` (read, write, delete) on `url`, valid `lifetime` seconds. The answer carries a
        credential in its query string: never log it (shown_url drops the query)."""
        try:
            r = self.request("GET", "/credentials/signurl", f"GET /credentials/signurl ({service} {operation} on {rse})",
                             params={"rse": rse, "svc": service, "op": operation, "url": url, "lifetime": lifetime})
        except RucioPermanent as exc:
            if exc.rucio_class != "AccessDenied":
                raise
            refused = SigningRefused(
                f"Rucio refuses to sign URLs for {self.who} on RSE {rse} ({exc}): the account needs the permission "
                "(root; or, from Rucio 39, the account attribute sign-url); files wait until it has it",
                exc.status, exc.rucio_class)
            with self._cache_lock:
                self.signing_refused[rse] = (str(refused), operation, url)
            raise refused from None
        with self._cache_lock:
            self.signing_refused.pop(rse, None)
        signed = r.text.strip()
        if not signed.startswith("https://") and not signed.startswith("http://"):
            raise RucioRetryable(f"Rucio signed no URL for {operation} on {rse} (answer of {len(signed)} "
                                 "characters that is not a URL)")
        return signed

    def close(self) -> None:
        self._http.close()


def _q(part: str) -> str:
    return quote(part, safe="")


def _query_chunks(lfns: Sequence[str], budget: int) -> Iterator[list[str]]:
    """`lfns` in chunks whose `lfn=` parameters, encoded, take at most `budget` bytes (a name
    longer than that alone)."""
    chunk: list[str] = []
    used = 0
    for lfn in lfns:
        n = len("&lfn=") + len(quote(lfn, safe=""))
        if chunk and used + n > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(lfn)
        used += n
    if chunk:
        yield chunk


def _names(files: Iterable[Any]) -> str:
    items = list(files)
    first = items[0] if items else None
    if isinstance(first, Mapping):
        label = f"{first.get('scope')}:{first.get('name')}"
    elif isinstance(first, tuple):
        label = f"{first[0]}:{first[1]}"
    else:
        label = "nothing"
    return label if len(items) <= 1 else f"{label} and {len(items) - 1} more"
