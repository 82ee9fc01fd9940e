"""Wiring: builds the parts from the settings. The only place besides the CLI that knows them all."""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING

from .errors import ConfigError
from .lake.base import Catalogue
from .lake.local import LocalLake
from .ledger import Ledger
from .runner import Runner
from .settings import Settings
from .status.server import StatusServer
from .transfer.base import Transport

if TYPE_CHECKING:
    from .lake.rucio_client import RucioClient


def build_lake(settings: Settings) -> Catalogue:
    if settings.lake.kind == "local":
        return LocalLake(settings.lake_catalog_path, settings.destinations, settings.lake.effective_name_pattern)
    return build_rucio_lake(settings)


def build_rucio_lake(settings: Settings) -> Catalogue:
    from .lake.rucio import RucioLake
    client, transports = build_rucio_parts(settings)
    return RucioLake(settings, transports, client=client)


def build_rucio_parts(settings: Settings) -> tuple[RucioClient, dict[str, Transport]]:
    """The Rucio client and the storage transports by URL scheme (the agent's, and the audit's)."""
    from .lake.rucio_client import RucioClient
    from .transfer.http import HttpTransport
    from .transfer.xroot import XRootTransport
    r = settings.lake.rucio
    assert r is not None, "settings validation guarantees [lake.rucio] for kind = 'rucio'"
    client = RucioClient(r)
    verify: bool | str = str(r.ca_cert) if r.ca_cert else r.tls_verify
    # Storage is reached with the identity Rucio knows: the X.509 certificate or proxy, or the
    # OIDC bearer token (WLCG token-based storage); userpass has no storage credential.
    cert = str(r.auth.cert) if r.auth.type == "x509" and r.auth.cert else None
    key = str(r.auth.key) if r.auth.type == "x509" and r.auth.key else None
    token = client.token if r.auth.type == "oidc" else None
    http = HttpTransport(verify=verify, cert=cert, key=key, token=token, timeout=r.timeout_seconds,
                         verify_upload=r.verify_upload, chunk_size=settings.chunk_mb << 20,
                         max_connections=max(2, settings.transfer_workers))
    root = XRootTransport(timeout=r.timeout_seconds, verify_upload=r.verify_upload,
                          chunk_size=settings.chunk_mb << 20)
    transports: dict[str, Transport] = {"http": http, "https": http, "davs": http, "root": root}
    return client, transports


class Agent:
    """A runner with its ledger, lake and status server, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _exclusive(settings.state_dir / "agent.lock")
        self.ledger = Ledger(settings.ledger_path, synchronous=settings.ledger_synchronous)
        self.lake = build_lake(settings)
        self.runner = Runner(settings, self.ledger, self.lake)
        self.status: StatusServer | None = None
        if settings.status.enabled:
            self.status = StatusServer(self.runner, settings.status.host, settings.status.port)

    def run(self) -> None:
        if self.status:
            self.status.start()
        try:
            self.runner.run_forever()
        finally:
            if self.status:
                self.status.stop()
            self.lake.close()
            self.ledger.close()
            os.close(self._lock_fd)

    def stop(self) -> None:
        self.runner.stop()


def _exclusive(path: "os.PathLike[str]") -> int:
    """One agent per state directory: a second one would work the same ledger twice."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another edge-agent already runs with state_dir {os.path.dirname(path)}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
