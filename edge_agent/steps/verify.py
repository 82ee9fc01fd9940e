"""The confirm step's storage check: what the catalogue records, turned into replicas as the storage
holds them. The catalogue says where copies are (lake/); each copy's storage is asked through the
transport its URL is mounted to (transfer/registry.py). Only what this returns counts for deletion.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import structlog

from ..core.policy import Replica
from ..errors import PermanentError, RetryableError
from ..lake.base import LakeFile, RecordedReplica
from ..settings import Settings
from ..transfer.registry import Transports
from ..transfer.s3 import S3Transport, etag_problem
from ..urls import shown_url

log = structlog.get_logger("edge_agent.steps.verify")


@dataclass(frozen=True)
class Checks:
    """How far the storage is asked about a copy the catalogue lists.

    ask_storage: ask at all (lake.rucio.verify_replicas); otherwise the catalogue's size and
                 adler32 stand, marked as the catalogue's.
    size_only:   a storage that answers no adler32 vouches for the size alone, and the catalogue's
                 adler32 (the agent's own) stands (lake.rucio.verify_upload = "size").
    """
    ask_storage: bool = True
    size_only: bool = False

    @classmethod
    def of(cls, settings: Settings) -> Checks:
        r = settings.lake.rucio
        if settings.lake.kind != "rucio" or r is None:
            return cls()
        return cls(ask_storage=r.verify_replicas, size_only=r.verify_upload == "size")


def replicas(recorded: Iterable[RecordedReplica], f: LakeFile, transports: Transports,
             checks: Checks = Checks()) -> list[Replica]:
    """The copies of `f` as their storage holds them, in the catalogue's order.

    A copy in a place (RecordedReplica.places) that a copy counted before it holds is left out; a
    copy only said to go somewhere (listed=False) is left out when nothing is there; a listed one is
    kept, `gone` when its storage answers that it holds nothing, and with no size nor adler32 when
    its storage cannot be asked now (it then counts neither as good nor as one to rewrite).
    """
    out: list[Replica] = []
    claimed: dict[tuple[str, Hashable], str] = {}
    for r in recorded:
        same = next(((key, claimed[key]) for key in r.places if key in claimed), None)
        if same is not None:
            log.warning("one place reached through two destinations: its copy counts once", destination=r.location,
                        same_as=same[1], same=same[0][0], url=r.url)
            continue
        if not r.listed:
            st = transports.for_url(r.url).stat(r.url, verify=r.verify)
            if st is None:
                continue
            claimed.update({key: r.location for key in r.places})
            out.append(Replica(r.location, st.size, st.adler32, True, r.url))
            continue
        if not (checks.ask_storage and r.available):
            out.append(Replica(r.location, r.size, r.adler32, r.available, r.url,
                               adler32_from_catalogue=r.adler32 is not None))
            continue
        rep = _asked(r, f, transports, checks)
        if rep.size is not None or rep.gone:
            claimed.update({key: r.location for key in r.places})
        out.append(rep)
    return out


def _asked(r: RecordedReplica, f: LakeFile, transports: Transports, checks: Checks) -> Replica:
    """A listed, available copy as its storage answers for it."""
    unknown = Replica(r.location, None, None, True, r.url)
    try:
        transport = transports.for_url(r.url) if r.url else None
    except PermanentError:
        transport = None
    if transport is None:
        log.warning("cannot verify replica: no transport for its URL", did=f.did, rse=r.location,
                    url=shown_url(r.url))
        return unknown
    try:
        st = transport.stat(r.url)
    except (RetryableError, PermanentError) as exc:
        log.warning("cannot verify replica now", did=f.did, rse=r.location, url=shown_url(r.url), error=str(exc))
        return unknown
    if st is None:
        log.warning("replica listed AVAILABLE but its storage holds nothing", did=f.did, rse=r.location,
                    url=shown_url(r.url))
        return Replica(r.location, None, None, True, r.url, gone=True)
    if isinstance(transport, S3Transport):
        # S3 has no adler32: the copy counts with the agent's own only when its ETag is the file's MD5
        problem = etag_problem(st, f.md5)
        return Replica(r.location, st.size, None if problem else r.adler32, True, r.url, problem,
                       adler32_from_catalogue=problem is None and r.adler32 is not None)
    if st.adler32 is None and checks.size_only:
        # the storage vouches for the size only; the adler32 is the one the agent registered
        return Replica(r.location, st.size, r.adler32, True, r.url, adler32_from_catalogue=r.adler32 is not None)
    return Replica(r.location, st.size, st.adler32, True, r.url)
