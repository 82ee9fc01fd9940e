"""A catalogue in memory, shipped for tests and for people writing plugins (as httpx ships a
MockTransport): it keeps DIDs, replicas and copy requests in dicts, says where copies go (a
directory or URL prefix per destination) and implements lake/base.py's interface with the same
promises as the real ones. Nothing is kept across processes; nothing here touches storage.
"""

from __future__ import annotations

import threading

from ..errors import PermanentError
from .base import Catalogue, CopiesState, LakeFile, RecordedReplica, Target


class MemoryCatalogue(Catalogue):
    """`roots` maps each destination to where its copies go: an absolute directory or a URL prefix;
    a copy of scope:name lies at root/scope/name. `writes_copies` False: the lake makes the copies
    itself (targets is empty, and each request_copies returns a rule id whose state is `rule_state`)."""

    def __init__(self, roots: dict[str, str], name_pattern: str = r".+", *, writes_copies: bool = True,
                 rule_state: CopiesState | None = None) -> None:
        self.name_pattern = name_pattern
        self.roots = dict(roots)
        self.writes_copies = writes_copies
        self.rule_state = rule_state        # None: no copies are requested (the agent writes every one)
        self.dids: dict[str, LakeFile] = {}
        self.replica_urls: dict[tuple[str, str], str] = {}     # (did, location) -> url
        self.rules: dict[str, str] = {}                        # rule id -> did
        self.released: list[str] = []
        self.problem: str | None = None     # what health() answers
        self._lock = threading.Lock()

    def url(self, location: str, f: LakeFile) -> str:
        """Where `location`'s copy of `f` lies."""
        return f"{self.roots[location].rstrip('/')}/{f.scope}/{f.name}"

    def register(self, f: LakeFile) -> None:
        with self._lock:
            old = self.dids.get(f.did)
            if old is not None and (old.size, old.adler32) != (f.size, f.adler32):
                raise PermanentError(f"DID {f.did} already exists in the lake with other content "
                                     f"({old.size} bytes, adler32 {old.adler32}); local file has {f.size} bytes, "
                                     f"adler32 {f.adler32}")
            self.dids.setdefault(f.did, f)

    def name_free(self, scope: str, name: str) -> bool:
        with self._lock:
            return f"{scope}:{name}" not in self.dids

    def targets(self, f: LakeFile) -> list[Target]:
        if not self.writes_copies:
            return []
        return [Target(loc, self.url(loc, f)) for loc in f.destinations]

    def add_replica(self, f: LakeFile, location: str, url: str) -> None:
        with self._lock:
            self.replica_urls[(f.did, location)] = url

    def request_copies(self, f: LakeFile) -> str | None:
        if self.rule_state is None:
            return None
        with self._lock:
            for ref, did in self.rules.items():
                if did == f.did:
                    return ref             # a rule that exists is success: its id again
            ref = f"rule-{len(self.rules) + 1}"
            self.rules[ref] = f.did
            return ref

    def copies_state(self, f: LakeFile, ref: str | None) -> CopiesState | None:
        if not ref:
            return None
        with self._lock:
            return self.rule_state if ref in self.rules else CopiesState.MISSING

    def recorded(self, f: LakeFile) -> list[RecordedReplica]:
        with self._lock:
            dids = self.dids.get(f.did)
            rows = sorted((loc, url) for (did, loc), url in self.replica_urls.items() if did == f.did)
        size, adler = (dids.size, dids.adler32) if dids else (None, None)
        return [RecordedReplica(loc, url, size, adler) for loc, url in rows]

    def recorded_locations(self, scope: str, name: str) -> set[str]:
        with self._lock:
            return {loc for (did, loc) in self.replica_urls if did == f"{scope}:{name}"}

    def release(self, f: LakeFile) -> None:
        with self._lock:
            if f.did not in self.released:
                self.released.append(f.did)

    def health(self) -> str | None:
        return self.problem
