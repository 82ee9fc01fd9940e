"""structlog set up once: JSON lines for journald and log shippers, console rendering on a TTY."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, MutableMapping

import structlog

# Anything that looks like a credential is masked, whatever the caller put in the event.
_SECRET_KEYS = re.compile(r"(pass(word)?|secret|token|authorization|cookie|credential|private|key$)", re.I)
_SECRET_IN_TEXT = re.compile(
    r"(?i)((?:^|[\s\"'{,&?;-])(?:password|passwd|pwd|token|secret|client_secret|authorization)[\"']?\s*[:=]\s*"
    r"[\"']?(?:bearer\s+|basic\s+)?)([^\s\"',}&]+)")
_USERINFO = re.compile(r"(://[^/\s:@]+:)([^@/\s]+)(@)")


def _mask(key: str, v: Any) -> Any:
    if _SECRET_KEYS.search(key) and v not in (None, "", False):
        return "***"
    if isinstance(v, str):
        return _USERINFO.sub(r"\1***\3", _SECRET_IN_TEXT.sub(r"\1***", v)) if ("=" in v or ":" in v) else v
    if isinstance(v, dict):
        return {k: _mask(str(k), x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_mask("", x) for x in v]
    return v


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
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
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
