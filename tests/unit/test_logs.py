"""The redact processor masks credentials wherever they hide, and leaves ordinary text alone."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import structlog

from edge_agent import logs


def red(**event: Any) -> dict[str, Any]:
    return dict(logs.redact(None, "info", dict(event)))


@pytest.mark.parametrize("key", ["password", "passwd", "db_password", "token", "api_token", "client_secret",
                                 "Authorization", "cookie", "credentials", "private_key", "x509_key",
                                 "PASSWORD"])
def test_secret_keys_are_masked(key: str) -> None:
    assert red(event="login", **{key: "hunter2"})[key] == "***"


def test_non_string_secret_values_are_masked_too() -> None:
    assert red(event="x", token=12345)["token"] == "***"
    assert red(event="x", password={"nested": "hunter2"})["password"] == "***"


@pytest.mark.parametrize("value", [None, "", False])
def test_empty_secrets_stay_visible_as_empty(value: Any) -> None:
    # "no password configured" is useful to see and reveals nothing
    assert red(event="x", password=value)["password"] == value


def test_ordinary_keys_are_kept() -> None:
    ev = {"event": "copy_written", "path": "run42/f1.fits", "size": 10, "did": "magic:f1", "keep_hours": 2}
    assert red(**ev) == ev


@pytest.mark.parametrize(("text", "secret", "kept"), [
    ("connect failed: password=hunter2 host=db", "hunter2", "host=db"),
    ("password: hunter2", "hunter2", "password:"),
    ('{"token": "abc.def.ghi", "user": "jdoe"}', "abc.def.ghi", '"user": "jdoe"'),
    ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi", "Authorization: Bearer"),
    ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "authorization="),
    ("GET /x?user=jdoe&token=s3cr3t&x=1 -> 401", "s3cr3t", "&x=1"),
    ("client_secret = 'xyz987'", "xyz987", "client_secret"),
    ("cannot reach https://jdoe:pw1234@lake.example.org/webdav: timeout", "pw1234", "lake.example.org/webdav"),
    ("davs://svc:p%40ss@host:8443/path", "p%40ss", "host:8443/path"),
])
def test_secrets_inside_strings(text: str, secret: str, kept: str) -> None:
    out = red(event="failed", error=text)["error"]
    assert secret not in out
    assert "***" in out
    assert kept in out


def test_secrets_in_the_event_text() -> None:
    assert "hunter2" not in red(event="login with password=hunter2")["event"]


def test_user_name_in_a_url_is_kept() -> None:
    out = red(event="x", url="https://jdoe:pw@host/p")["url"]
    assert out == "https://jdoe:***@host/p"


@pytest.mark.parametrize("text", [
    "/etc/passwd: symlinks are never followed",
    "symlink to /etc/passwd: symlinks are never followed",
    "https://lake.example.org:8443/webdav/magic/f1.fits",
    "a=1 b=2 key: value",
    "time 12:00:00, tokens=3",
    "keyboard: ok",
    "the bearer token file is re-read before it expires",
    "credentials: none configured",
])
def test_ordinary_text_is_untouched(text: str) -> None:
    assert red(event="x", detail=text)["detail"] == text


def test_through_structlog(capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    logs.setup("info", "json", stream=buf)
    try:
        structlog.get_logger("t").info("login", password="hunter2", url="https://u:pw99@h/x")
        structlog.get_logger("t").debug("hidden at info level")
    finally:
        structlog.reset_defaults()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["password"] == "***" and rec["url"] == "https://u:***@h/x" and rec["level"] == "info"
    assert "hunter2" not in buf.getvalue() and "pw99" not in buf.getvalue()


# "Anything that looks like a credential is masked, whatever the caller put in the event" (logs.py)

def test_secrets_in_nested_values_are_masked() -> None:
    out = red(event="request failed", headers={"Authorization": "Bearer abc123", "Accept": "*/*"},
              urls=["https://jdoe:pw1234@lake/x"])
    text = json.dumps(out)
    assert "abc123" not in text and "pw1234" not in text
    assert "*/*" in text


def test_secrets_in_exception_tracebacks_are_masked() -> None:
    buf = io.StringIO()
    logs.setup("info", "json", stream=buf)
    try:
        try:
            raise ConnectionError("cannot reach https://svc:pw1234@lake.example.org/webdav")
        except ConnectionError:
            structlog.get_logger("t").error("unexpected error", exc_info=True)
    finally:
        structlog.reset_defaults()
    out = buf.getvalue()
    assert "lake.example.org/webdav" in out     # the traceback is there ...
    assert "pw1234" not in out                  # ... without the password


# Review item 10 (smaller holes): credentials that free text, query strings and signed URLs carry

SIGNED = ("https://s3.example.org/magic/f1.fits?X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
          "&X-Amz-Expires=600&X-Amz-Security-Token=FQoGZXIvsesstok&X-Amz-SignedHeaders=host"
          "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0")


@pytest.mark.parametrize(("text", "secrets", "kept"), [
    ("GET /auth?access_token=eyJacc.tok.en&user=jdoe -> 401", ["eyJacc.tok.en"], "user=jdoe"),
    ("refresh failed: refresh_token=rt-98765 expired", ["rt-98765"], "expired"),
    ("oidc said access_token: at-12345", ["at-12345"], "oidc said"),
    (f"GET {SIGNED}: 403 Forbidden",
     ["0f1e2d3c4b5a69788796a5b4c3d2e1f0", "AKIAEXAMPLE", "FQoGZXIvsesstok"], "X-Amz-Date=20240101T000000Z"),
    ("http://gw/x?signature=abcdef123&expires=99", ["abcdef123"], "expires=99"),
    ("http://gw/x?sig=1&token=tok555", ["tok555"], "sig=1"),
    ("http://gw/x?user=u&password=pw777", ["pw777"], "user=u"),
    ("request had Authorization: Bearer abc.def-ghi_jkl and was refused", ["abc.def-ghi_jkl"], "was refused"),
    ("server echoed the header (Bearer zzz999yyy==) back", ["zzz999yyy"], "back"),
    ("headers={'authorization': 'Bearer q1w2e3', 'accept': '*/*'}", ["q1w2e3"], "'accept': '*/*'"),
])
def test_secrets_in_free_text_and_query_strings(text: str, secrets: list[str], kept: str) -> None:
    # in keys that are not obviously secret (error, detail) and in the message itself
    for out in (red(event="failed", error=text)["error"], red(event="x", detail=text)["detail"],
                red(event=text)["event"]):
        for secret in secrets:
            assert secret not in out
        assert "***" in out
        assert kept in out


def test_secrets_deep_in_nested_values() -> None:
    out = red(event="x", context={"attempts": [{"url": SIGNED}, ("Bearer nest3d-tok",)],
                                  "note": "access_token=deep-tok"})
    text = json.dumps(out)
    for secret in ("0f1e2d3c4b5a69788796a5b4c3d2e1f0", "nest3d-tok", "deep-tok"):
        assert secret not in text
    assert "s3.example.org/magic/f1.fits" in text


def test_an_exception_passed_as_a_value_is_masked() -> None:
    out = red(event="x", error=ConnectionError(f"cannot GET {SIGNED}"))["error"]
    assert isinstance(out, str)
    assert "0f1e2d3c4b5a69788796a5b4c3d2e1f0" not in out and "s3.example.org" in out
    plain = OSError(2, "No such file")
    assert red(event="x", error=plain)["error"] is plain      # nothing to mask: left as it was


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_are_masked_in_either_format(fmt: str) -> None:
    buf = io.StringIO()
    logs.setup("info", fmt, stream=buf)
    try:
        try:
            raise ConnectionError(f"GET {SIGNED} with Authorization: Bearer tb-tok-42 failed")
        except ConnectionError:
            structlog.get_logger("t").error("unexpected error", exc_info=True)
    finally:
        structlog.reset_defaults()
    out = buf.getvalue()
    assert "ConnectionError" in out and "s3.example.org/magic/f1.fits" in out   # the traceback is there ...
    for secret in ("0f1e2d3c4b5a69788796a5b4c3d2e1f0", "tb-tok-42", "FQoGZXIvsesstok"):
        assert secret not in out                                                 # ... without them


def _three_substitutions(v: str) -> str:
    """What _mask_text does without its pre-filter."""
    return logs._USERINFO.sub(r"\1***\3", logs._BEARER.sub(r"\1***", logs._SECRET_IN_TEXT.sub(r"\1***", v)))


def test_the_pre_filter_never_lets_a_maskable_text_through() -> None:
    # a text is returned unmasked only after one search finds no word any substitution needs:
    # random texts around each such word, in any case, must come out exactly as the three
    # substitutions alone make them
    import random
    rng = random.Random(7)
    words = ["password", "PassWd", "pwd", "TOKEN", "access_token", "Secret", "authorization", "X-Amz-Signature",
             "credential", "Bearer", "://", "user:pw@", "=", ": ", " ", "&", "?", "'", '"', "{", "abc123456789"]
    masked = 0
    for _ in range(5000):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        text = "".join(c.upper() if rng.random() < 0.3 else c for c in text)
        assert logs.mask_text(text) == _three_substitutions(text), text
        masked += logs.mask_text(text) != text
    assert masked > 500     # the corpus does exercise the substitutions
