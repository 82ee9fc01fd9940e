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


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k, v in list(event.items()):
        if k != "event" and _SECRET_KEYS.search(k) and v not in (None, "", False):
            event[k] = "***"
        elif isinstance(v, str) and ("=" in v or ":" in v):
            event[k] = _USERINFO.sub(r"\1***\3", _SECRET_IN_TEXT.sub(r"\1***", v))
    return event


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
