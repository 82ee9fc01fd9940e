"""The status HTTP server: read-only, loopback by default.

    /healthz  200 while the main loop ticks (the process is alive and not wedged)
    /readyz   200 when the lake is reachable and nothing blocks progress; 503 with why
    /status   JSON: files and bytes per state per rule, oldest unconfirmed, throughput,
              recent errors, buffer disk against watermarks; with a shared ledger, the fleet
    /metrics  Prometheus text
    /custody  JSON: ?path=... (absolute, or relative to a rule's directory; percent-encoded): every
              version of the file the ledger knows there, its DID, checksums, replicas, confirmation
              and deletion (404: none; 400: no path asked)
    /         the same as a page for a browser
Only GET and HEAD are answered; everything else is 405. A request whose Host header names neither
loopback, the bound address nor one of status.allowed_hosts is refused with 421: a page that a browser
on this host loaded from elsewhere cannot read the status by pointing its own name at 127.0.0.1
(DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from . import custody, metrics, page, report
from .fleet import FleetCache

if TYPE_CHECKING:
    from ..runner import Runner

log = structlog.get_logger("edge_agent.status")


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8787` -> `::1`, `Agent.local.:80` -> `agent.local`."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:].split("]", 1)[0]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def host_allowed(header: str | None, bind: str, allowed: Sequence[str] = ()) -> bool:
    """Whether a request with this Host header is answered: loopback names and addresses, the
    address the server binds, the operator's names (`*`: any). No Host header at all is answered:
    browsers always send one, and a rebinding attack needs a browser."""
    if header is None or "*" in allowed:
        return True
    name = _host_name(header)
    if name in ("localhost", _host_name(bind), *allowed):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _query_path(target: str) -> bytes | None:
    """The `path` parameter of a request target, as bytes (a name that is not UTF-8 is asked for
    percent-encoded, byte by byte), or None."""
    query = target.split("?", 1)[1] if "?" in target else ""
    values = urllib.parse.parse_qs(query, keep_blank_values=True, errors="surrogateescape").get("path")
    return os.fsencode(values[0]) if values else None


class StatusServer:
    """The HTTP status server (health, JSON status, Prometheus metrics, the page) of a runner."""
    def __init__(self, runner: "Runner", host: str, port: int, allowed_hosts: Sequence[str] = ()) -> None:
        self.runner = runner
        self.allowed_hosts = tuple(_host_name(h) if h != "*" else h for h in allowed_hosts)
        self.bind = host
        # a shared ledger: every agent of it, read at most once every few seconds for all requests
        self.fleet = FleetCache(runner.ledger, runner.agent_id) if runner.agent_id else None
        self.registry = metrics.registry_for(runner, self.fleet)
        handler = _make_handler(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on (the port chosen when 0 was asked)."""
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """The server answers requests, on a thread of its own."""
        self.thread.start()
        log.info("status server listening", url=f"http://{self.address[0]}:{self.address[1]}/status")

    def stop(self) -> None:
        """The server no longer answers and its socket is closed."""
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edge-agent"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # requests are not worth a log line each

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, doc: Any) -> None:
            self._send(code, json.dumps(doc, indent=2, default=str).encode() + b"\n", "application/json")

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if not host_allowed(self.headers.get("Host"), server.bind, server.allowed_hosts):
                self._json(421, {"error": "host not allowed", "setting": "status.allowed_hosts"})
                return
            r = server.runner
            try:
                if path == "/healthz":
                    age = time.time() - r.last_tick if r.last_tick else 0.0
                    ok = age < report.HEALTH_STALL_S
                    self._json(200 if ok else 503, {"ok": ok, "last_tick_age_s": round(age, 2)})
                elif path == "/readyz":
                    why = report.readiness(r, time.time())
                    self._json(503 if why else 200, {"ready": not why, "not_ready_because": why})
                elif path == "/status":
                    self._json(200, report.full(r, server.fleet))
                elif path == "/custody":
                    code, doc = custody.answer(r.settings, r.ledger, _query_path(self.path))
                    self._json(code, doc)
                elif path == "/metrics":
                    self._send(200, metrics.render(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/":
                    self._send(200, page.render(report.full(r, server.fleet)).encode(), "text/html; charset=utf-8")
                else:
                    self._json(404, {"error": "not found"})
            except Exception as exc:  # noqa: BLE001 - a status page must not take the agent down
                log.error("status request failed", path=path, exc_info=True)
                self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

        do_HEAD = do_GET  # noqa: N815

        def _refuse(self) -> None:
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    return Handler
