"""Wiring: builds the parts from the settings. The only place besides the CLI that knows them all."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import structlog

from . import __version__, identity, places
from .bufferlock import HEARTBEAT_SECONDS, BufferHeld, BufferLocks
from .errors import AgentIdTaken, ConfigError
from .lake.base import Catalogue
from .lake.local import LocalCatalogue
from .ledger import Ledger
from .runner import Runner
from .settings import DestinationSettings, Settings
from .status.server import StatusServer
from .transfer.base import Transport
from .transfer.registry import Transports

if TYPE_CHECKING:
    from .lake.rucio_client import RucioClient
    from .transfer.s3 import S3Transport, Signer
    from .transfer.xroot import Backend


def build(settings: Settings) -> tuple[Catalogue, Transports]:
    """The lake's catalogue and the transports that reach its storage, sharing one Rucio client."""
    if settings.lake.kind == "local":
        return build_catalogue(settings), local_transports(settings.destinations)
    from .lake.rucio import RucioCatalogue
    from .lake.rucio_client import RucioClient
    assert settings.lake.rucio is not None, "settings validation guarantees [lake.rucio] for kind = 'rucio'"
    client = RucioClient(settings.lake.rucio)
    s3 = build_s3_transports(settings, client)
    catalogue = RucioCatalogue(settings, client, schemes=[*RUCIO_SCHEMES],
                               max_bytes={rse: t.max_object_bytes for rse, t in s3.items()})
    transports = rucio_transports(settings, client, catalogue.storage_prefixes)
    mount_s3(transports, s3, catalogue.storage_prefixes)
    return catalogue, transports


def build_catalogue(settings: Settings) -> Catalogue:
    """The lake's catalogue alone (the transports: build_transports)."""
    if settings.lake.kind == "local":
        return LocalCatalogue(settings.lake_catalog_path, settings.destinations,
                              settings.lake.effective_name_pattern)
    return build(settings)[0]


def build_transports(settings: Settings) -> Transports:
    """The transports the configured lake's storage is reached with (a Rucio client of their own)."""
    if settings.lake.kind == "local":
        return local_transports(settings.destinations)
    return build(settings)[1]


def local_transports(destinations: dict[str, DestinationSettings]) -> Transports:
    """The local lake's: each posix destination's directory mounted with its own fsync setting."""
    from .transfer.posix import PosixTransport
    transports = Transports()
    for d in destinations.values():
        if d.kind == "posix" and d.path is not None:
            transports.mount(str(d.path), PosixTransport(fsync=d.fsync))
    return transports


# the URL schemes a Rucio lake's storage is written and asked through (lake.rucio.schemes picks among them)
RUCIO_SCHEMES = ("http", "https", "davs", "root")


# (rse, scheme) -> the URL prefixes under which Rucio builds that RSE's PFNs in that scheme
StoragePrefixes = Callable[[str, str], list[str]]
# (isolate_requests, puts_per_server) -> the storage transports by URL scheme, with those gates
StorageMaker = Callable[[bool, int | None], dict[str, Transport]]


def rucio_transports(settings: Settings, client: RucioClient, prefixes: StoragePrefixes | None = None
                     ) -> Transports:
    """HTTP/WebDAV and XRootD with the identity Rucio knows, mounted by scheme with the default
    gates (XRootD 5.5.3's limits) for any storage. Given `prefixes`, each rse destination also gets
    transports of its own, with its isolate_requests and puts_per_server, mounted at its storage's
    URL prefixes (asked of Rucio when a URL in that scheme is first looked up: Rucio may be
    unreachable at start). All of them share one gate per server, so two destinations on one
    XRootD server (or a destination and a copy the lake made there) still keep its limits."""
    make = storage_maker(settings, client)
    transports = Transports()
    for scheme, transport in make(True, None).items():
        transports.mount(f"{scheme}://", transport)
    if prefixes is not None:
        for d in settings.destinations.values():
            if d.kind != "rse" or not d.rse or d.sign_url:
                continue
            for scheme, transport in make(d.isolate_requests, d.puts_per_server).items():
                find = partial(destination_prefixes, client, prefixes, d.rse, scheme)
                transports.mount_later(f"{scheme}://", find, transport)
    return transports


def destination_prefixes(client: RucioClient, prefixes: StoragePrefixes, rse: str, scheme: str) -> list[str]:
    """`rse`'s storage prefixes in `scheme`, none if the RSE does not offer it. Each also with the
    path's leading '//' (Rucio writes root:// PFNs so: root://host:1094//data/...)."""
    if not any(p.get("scheme") == scheme for p in client.rse_protocols(rse)):
        return []
    out: list[str] = []
    for prefix in prefixes(rse, scheme):
        head, _, rest = prefix.partition("://")
        netloc, _, path = rest.partition("/")
        out += [prefix, f"{head}://{netloc}//{path.lstrip('/')}"]
    return out


def mount_s3(transports: Transports, s3: dict[str, S3Transport], prefixes: Callable[[str], list[str]]) -> None:
    """Each S3 RSE's signing transport, mounted at its https endpoints (`prefixes(rse)`, Rucio's to
    say: asked when an https URL is first looked up, since Rucio may be unreachable at start)."""
    for rse, transport in s3.items():
        transports.mount_later("https://", partial(prefixes, rse), transport)


def storage_maker(settings: Settings, client: RucioClient) -> StorageMaker:
    """Makes the storage transports by URL scheme for one destination's gate settings
    (puts_per_server None: 1 over HTTP/WebDAV, any number over root://). What one maker makes
    shares each server's gate (one GateBoard for HTTP, one for root://)."""
    from .transfer.http import GateBoard, HttpTransport
    from .transfer.xroot import XRootTransport
    r = settings.lake.rucio
    assert r is not None, "settings validation guarantees [lake.rucio] for kind = 'rucio'"
    verify: bool | str = str(r.ca_cert) if r.ca_cert else r.tls_verify
    # Storage is reached with the identity Rucio knows: the X.509 certificate or proxy, or the
    # OIDC bearer token (WLCG token-based storage); userpass has no storage credential.
    cert = str(r.auth.cert) if r.auth.type == "x509" and r.auth.cert else None
    key = str(r.auth.key) if r.auth.type == "x509" and r.auth.key else None
    token = client.token if r.auth.type == "oidc" else None
    http_gates, root_gates = GateBoard(), GateBoard()
    backend = root_backend(settings)

    def make(isolate: bool, puts: int | None) -> dict[str, Transport]:
        http = HttpTransport(verify=verify, cert=cert, key=key, token=token, timeout=r.timeout_seconds,
                             verify_upload=r.verify_upload, chunk_size=settings.chunk_mb << 20,
                             max_connections=max(2, settings.transfer_workers), isolate_requests=isolate,
                             puts_per_server=1 if puts is None else puts, gate_board=http_gates)
        root = XRootTransport(timeout=r.timeout_seconds, verify_upload=r.verify_upload,
                              chunk_size=settings.chunk_mb << 20, isolate_verification=isolate,
                              puts_per_server=0 if puts is None else puts, gate_board=root_gates,
                              backend=backend)
        return {"http": http, "https": http, "davs": http, "root": root}
    return make


def root_backend(settings: Settings) -> Backend:
    """lake.rucio.root_client resolved on this host; ConfigError when it names a client this host
    lacks (asked for by name, the bindings are never silently replaced by xrdcp, nor xrdcp by them)."""
    from .transfer.xroot_choice import ClientMissing, resolve
    r = settings.lake.rucio
    assert r is not None, "settings validation guarantees [lake.rucio] for kind = 'rucio'"
    try:
        return resolve(r.root_client)
    except ClientMissing as exc:
        raise ConfigError(f"lake.rucio.root_client = {r.root_client!r}: {exc}; or set root_client = "
                          "'auto' (the bindings where they import, else xrdcp)") from None


def writes_root(settings: Settings) -> bool:
    """Does a destination upload over root://: its scheme says so, or it takes the first of
    lake.rucio.schemes its RSE offers and root is among them?"""
    r = settings.lake.rucio
    if settings.lake.kind != "rucio" or r is None:
        return False
    for d in settings.destinations.values():
        if d.kind == "rse" and not d.sign_url and (d.scheme == "root" or (d.scheme is None and "root" in r.schemes)):
            return True
    return False


def check_root_client(settings: Settings) -> None:
    """At start: a root_client this host cannot honour is refused (ConfigError), before the ledger
    is touched; where a destination uploads over root://, one line names the client and its version."""
    if settings.lake.kind != "rucio":
        return
    backend = root_backend(settings)
    if writes_root(settings):
        from .transfer.xroot_choice import client_version, name_of
        assert settings.lake.rucio is not None
        log.info("root:// client", root_client=name_of(backend), version=client_version(backend),
                 chosen=settings.lake.rucio.root_client)


def build_s3_transports(settings: Settings, client: RucioClient) -> dict[str, S3Transport]:
    """One transport per S3 RSE destination, each signing through Rucio for its RSE."""
    from .transfer.s3 import S3Transport
    r = settings.lake.rucio
    assert r is not None
    return {d.rse: S3Transport(_signer(client, d.rse, d.signed_url_lifetime_seconds),
                               verify=str(d.ca_cert) if d.ca_cert else True, timeout=r.timeout_seconds,
                               chunk_size=settings.chunk_mb << 20, max_connections=max(2, settings.transfer_workers))
            for d in settings.destinations.values() if d.sign_url == "s3" and d.rse}


def _signer(client: RucioClient, rse: str, lifetime: int) -> Signer:
    def sign(op: str, url: str) -> str:
        return client.signed_url(rse, op, url, lifetime)
    return sign


log = structlog.get_logger("edge_agent.app")


def claim_ledger(ledger: Ledger, here: dict[str, str], adopt: bool = False) -> list[str]:
    """Check that the ledger was written on this host for these buffer directories, and record
    what is new. Returns what differed (only when adopting); raises ConfigError otherwise."""
    raw = ledger.meta("identity")
    recorded: dict[str, str] = json.loads(raw) if raw else {}
    diffs = identity.differences(recorded, here)
    if diffs and not adopt:
        raise ConfigError(
            f"the ledger {ledger.where} belongs to another host or buffer:\n  " + "\n  ".join(diffs)
            + "\nIts rows describe files by path and inode there, not here. If the move is deliberate "
            "(host renamed or rebuilt, buffer re-created, state restored from a backup), stop any agent "
            "on the old host, check `edge-agent files`, then run `edge-agent adopt-ledger` to record "
            "this host as its owner.")
    merged = {**recorded, **here}
    if merged != recorded:
        ledger.set_meta("identity", json.dumps(merged, sort_keys=True))
        if not recorded:
            log.info("ledger identity recorded", **{k.replace(" ", "_"): v for k, v in here.items()})
        elif diffs:
            log.warning("ledger adopted by this host", differences=diffs)
    return diffs


def open_ledger(settings: Settings, readonly: bool = False) -> Ledger:
    """The ledger the settings name: SQLite in state_dir, or the PostgreSQL database of
    [ledger] url (LedgerUnwritable while that server does not answer)."""
    return Ledger(settings.ledger_target, synchronous=settings.ledger_synchronous, readonly=readonly,
                  password=settings.ledger.secret(), connect_timeout=settings.ledger.connect_timeout_seconds)


class Agent:
    """A runner with its ledger, lake and status server, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        places.check(settings)
        check_root_client(settings)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _exclusive(settings.state_dir / "agent.lock")
        directories = {n: r.directory for n, r in settings.rules.items()}
        try:
            if settings.agent_id:
                # a shared ledger: one ledger per buffer (its members share the buffers), named by it
                self.ledger = open_ledger(settings)
                try:
                    self.buffers = BufferLocks(directories, settings.state_dir, fleet=self.ledger.fleet_id())
                    self.buffers.claim_all()
                except BaseException:
                    self.ledger.close()
                    raise
            else:
                # one agent per buffer: refused before its ledger is made or touched
                self.buffers = BufferLocks(directories, settings.state_dir)
                self.buffers.claim_all()
                try:
                    self.ledger = open_ledger(settings)
                except BaseException:
                    self.buffers.release()
                    raise
        except BaseException:
            os.close(self._lock_fd)
            raise
        fleet = self.buffers.fleet
        try:
            claim_ledger(self.ledger, identity.current(settings, shared=fleet is not None))
            if settings.agent_id:
                self.ledger.enrol(settings.agent_id, f"{identity.machine_id()}:{settings.state_dir}",
                                  socket.gethostname(), os.getpid(), __version__, time.time(),
                                  fresh_s=3 * HEARTBEAT_SECONDS)
                _shares_the_catalogue(settings, self.ledger)
                _one_closer(settings, self.ledger)
        except BaseException:
            self.ledger.close()
            self.buffers.release()
            os.close(self._lock_fd)
            raise
        self.catalogue, self.transports = build(settings)
        self.runner = Runner(settings, self.ledger, self.catalogue, self.transports)
        self.runner.discovery.may_scan = self._may_scan   # a directory that appears later is claimed first
        self.runner.discovery.held_by_another = self.buffers.held_by_another   # a buffer inside ours is left alone
        self.runner.scheduler.add_job(self._heartbeat, "interval", seconds=HEARTBEAT_SECONDS, id="buffer-lock",
                                      max_instances=1, coalesce=True)
        self.lost: str | None = None
        self.status: StatusServer | None = None
        if settings.status.enabled:
            self.status = StatusServer(self.runner, settings.status.host, settings.status.port,
                                       settings.status.allowed_hosts)

    def run(self) -> None:
        if self.status:
            self.status.start()
        try:
            self.runner.run_forever()
        finally:
            if self.status:
                self.status.stop()
            self.catalogue.close()
            self.transports.close()
            self.ledger.close()
            self.buffers.release()
            os.close(self._lock_fd)
        if self.lost:
            raise BufferHeld(self.lost)
        if self.runner.agent_id_lost:
            raise AgentIdTaken(self.runner.agent_id_lost)

    def stop(self) -> None:
        self.runner.stop()

    def _may_scan(self, rule: str) -> str | None:
        refused = self.buffers.claim(rule)
        if self.buffers.lost:
            # a buffer this agent held is refused now (its lock file was removed and another agent
            # claimed it): the same as a takeover seen by the heartbeat
            self._lose(self.buffers.lost)
        return refused

    def _heartbeat(self) -> None:
        lost = self.buffers.heartbeat()
        if lost:
            self._lose(lost)

    def _lose(self, lost: str) -> None:
        if not self.lost:
            # two agents on one buffer would both delete its files: this one gives way
            self.lost = lost
            log.error("buffer lost to another agent; stopping", why=lost)
            self.stop()


def _shares_the_catalogue(settings: Settings, ledger: Ledger) -> None:
    """Agents sharing a ledger's rules on the local lake must share its catalogue as well: with one
    each in its state_dir, a file one agent registered is unknown to the agent that confirms it, and
    a night's audit is split over several files. One agent alone may keep its own, and so may agents
    that share the ledger but no rule (each its own buffer)."""
    if settings.lake.kind != "local" or settings.lake.catalog is not None:
        return
    now = ledger.lease_clock(time.time())    # heartbeats are on the ledger's clock
    others = [a["agent_id"] for a in ledger.agents()
              if a["agent_id"] != settings.agent_id and now - a["heartbeat_at"] < 3 * HEARTBEAT_SECONDS
              and set(a["stats"].get("rules") or ()) & set(settings.rules)]
    if others:
        raise ConfigError(f"lake.catalog: other agents share this ledger ({', '.join(sorted(others))}): on the "
                          "local lake they must share its catalogue too; set lake.catalog to one path every "
                          "agent reaches (SQLite: a filesystem with working locks)")


def _one_closer(settings: Settings, ledger: Ledger) -> None:
    """Agents sharing a ledger: one of them closes a rule's nights (close_nights), or two would each
    write and deliver a manifest of the same night."""
    mine = {n for n, r in settings.rules.items() if r.close_nights}
    if not mine:
        return
    now = ledger.lease_clock(time.time())
    for a in ledger.agents():
        both = mine & set(a["stats"].get("close_nights") or ())
        if a["agent_id"] != settings.agent_id and both and now - a["heartbeat_at"] < 3 * HEARTBEAT_SECONDS:
            raise ConfigError(f"rules.{sorted(both)[0]}.close_nights: agent {a['agent_id']} of this ledger closes "
                              "this rule's nights already; set close_nights on one agent of a fleet only")


def _exclusive(path: "os.PathLike[str]") -> int:
    """One agent per state directory: a second one would work the same ledger twice."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another edge-agent already runs with state_dir {os.path.dirname(path)}") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass   # the pid is for people; the lock is what counts (a full state disk must not stop us here)
    return fd
