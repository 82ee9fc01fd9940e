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
