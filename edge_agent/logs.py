"""structlog set up once: JSON lines for journald and log shippers, console rendering on a TTY."""

from __future__ import annotations

import functools
import io
import logging
import re
import sys
from typing import Any, MutableMapping

import structlog

# Anything that looks like a credential is masked, whatever the caller put in the event.
_SECRET_KEYS = re.compile(r"(pass(word)?|secret|token|authorization|cookie|credential|private|signature|key$)",
                          re.IGNORECASE)
# `name=value` / `name: value` in free text, query strings, JSON and reprs. The name may carry a prefix
# (access_token, X-Amz-Signature, db_password) but must start a word after one of these separators, so
# that a path such as /etc/passwd: is not taken for a key.
_SECRET_IN_TEXT = re.compile(
    r"(?i)((?:^|[\s\"'{(\[,&?;])[\w.-]*(?:password|passwd|pwd|token|secret|authorization|signature|credential)"
    r"[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+)?)([^\s\"',}&]+)")
# a bearer token (RFC 6750 token68) wherever it stands: an HTTP header echoed in an error text, a repr.
# Eight characters at least: real tokens are long, and prose ("the bearer token: ...") stays readable.
_BEARER = re.compile(r"(?i)(\bbearer\s+)([A-Za-z0-9._~+/-]{8,}=*)")
_USERINFO = re.compile(r"(://[^/\s:@]+:)([^@/\s]+)(@)")
# What each of the three above needs to find anything at all: a text without it is returned as it is,
# after one search instead of three substitutions (most log lines carry no credential-like word).
_MAY_HOLD_SECRET = re.compile(r"(?i)password|passwd|pwd|token|secret|authorization|signature|credential|bearer|://")


def mask_text(v: str) -> str:
    """`v` with whatever looks like a credential in it replaced by ***."""
    if not _MAY_HOLD_SECRET.search(v):
        return v
    return _USERINFO.sub(r"\1***\3", _BEARER.sub(r"\1***", _SECRET_IN_TEXT.sub(r"\1***", v)))


@functools.lru_cache(maxsize=1024)
def is_secret_key(key: str) -> bool:
    """Does a value under this key name hold a credential (password, token, secret, ...)?"""
    return _SECRET_KEYS.search(key) is not None


def _mask(key: str, v: Any) -> Any:
    if is_secret_key(key) and v not in (None, "", False):
        return "***"
    if isinstance(v, str):
        return mask_text(v)
    if isinstance(v, dict):
        return {k: _mask(str(k), x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_mask("", x) for x in v]
    if v is None or isinstance(v, (bool, int, float)):
        return v
    # any other object (an exception passed as a value, say) is rendered by its repr: mask that text,
    # and leave the object itself when there is nothing to mask
    text = repr(v)
    masked = mask_text(text)
    return v if masked == text else masked


def _redacted_traceback(sio: Any, exc_info: Any) -> None:
    """The console's exception formatter: the plain traceback, masked as any other text (the
    console renders exc_info itself, after the processors have run)."""
    buf = io.StringIO()
    structlog.dev.plain_traceback(buf, exc_info)
    sio.write(mask_text(buf.getvalue()))


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: nothing that looks like a credential reaches a log line."""
    for k, v in list(event.items()):
        # the message itself is masked by its text, never wholesale by its key
        event[k] = _mask("", v) if k == "event" else _mask(k, v)
    return event


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    # httpx logs whole request URLs (token query strings included) at INFO: keep it quiet
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(exception_formatter=_redacted_traceback) if console
                       else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # tracebacks become text first, so that redact sees them too
            structlog.processors.format_exc_info if not console else structlog.dev.set_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
