"""A catalogue in memory, shipped for tests and for people writing plugins (as httpx ships a
MockTransport): it keeps DIDs, replicas and copy requests in dicts, says where copies go (a
directory or URL prefix per destination) and implements lake/base.py's interfaces (Catalogue, and
its read side Records) with the same promises as the real ones. Nothing is kept across processes;
nothing here touches storage.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..errors import PermanentError
from ..urls import scheme_of
from .base import (
    Catalogue,
    CopiesState,
    LakeFile,
    ListedFile,
    ListedReplica,
    RecordedReplica,
    Records,
    Target,
    UnknownDid,
)


class MemoryCatalogue(Catalogue, Records):
    """`roots` maps each destination to where its copies go: an absolute directory or a URL prefix;
    a copy of scope:name lies at root/scope/name. `writes_copies` False: the lake makes the copies
    itself (targets is empty, and each request_copies returns a rule id whose state is `rule_state`).

    What it was asked is kept for tests (as MockTransport keeps it): `looked_up`, the DIDs each
    lookup was asked about, in order."""

    def __init__(self, roots: dict[str, str], name_pattern: str = r".+", *, writes_copies: bool = True,
                 rule_state: CopiesState | None = None) -> None:
        self.name_pattern = name_pattern
        self.roots = dict(roots)
        self.writes_copies = writes_copies
        self.rule_state = rule_state        # None: no copies are requested (the agent writes every one)
        self.dids: dict[str, LakeFile] = {}
        self.replicas: dict[tuple[str, str], ListedReplica] = {}   # (did, location) -> the replica listed
        # (scope, dataset or container) -> its children (scope, name), in the order attached
        self.contents: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.looked_up: list[tuple[str, str]] = []
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
            if f.dataset:
                self._attach((f.scope, f.dataset), (f.scope, f.name))
                if f.container:
                    self._attach((f.scope, f.container), (f.scope, f.dataset))

    def _attach(self, parent: tuple[str, str], child: tuple[str, str]) -> None:
        kids = self.contents.setdefault(parent, [])
        if child not in kids:
            kids.append(child)

    def name_free(self, scope: str, name: str) -> bool:
        with self._lock:
            return f"{scope}:{name}" not in self.dids

    def targets(self, f: LakeFile) -> list[Target]:
        if not self.writes_copies:
            return []
        return [Target(loc, self.url(loc, f)) for loc in f.destinations]

    def add_replica(self, f: LakeFile, location: str, url: str) -> None:
        with self._lock:
            self.replicas[(f.did, location)] = ListedReplica(location, "AVAILABLE", (url,))

    def list_replica(self, did: str, location: str, *urls: str, state: str = "AVAILABLE") -> None:
        """After it the catalogue lists a replica of `did` at `location` in `state`, under `urls` (in
        that order, as Rucio lists one PFN per protocol): a copy the lake made, or one in a state the
        agent never sets (COPYING, ...)."""
        with self._lock:
            self.replicas[(did, location)] = ListedReplica(location, state, tuple(urls))

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
            reps = self._replicas_of(f.did)
        size, adler = (dids.size, dids.adler32) if dids else (None, None)
        return [RecordedReplica(r.location, r.urls[0] if r.urls else "", size, adler, r.state == "AVAILABLE")
                for r in reps]

    def _replicas_of(self, did: str) -> list[ListedReplica]:
        return sorted((r for (d, _), r in self.replicas.items() if d == did), key=lambda r: r.location)

    def recorded_locations(self, scope: str, name: str) -> set[str]:
        with self._lock:
            return {loc for (did, loc) in self.replicas if did == f"{scope}:{name}"}

    # ------------------------------------------------------------ Records
    def dataset_files(self, scope: str, name: str) -> list[ListedFile]:
        with self._lock:
            if (scope, name) not in self.contents:
                raise UnknownDid(f"the lake has no dataset {scope}:{name}")
            files = self._files_below((scope, name))
        return sorted(files, key=lambda f: f.did)

    def _files_below(self, parent: tuple[str, str]) -> list[ListedFile]:
        out = []
        for child in self.contents.get(parent, []):
            if child in self.contents:            # a dataset in a container
                out.extend(self._files_below(child))
                continue
            f = self.dids.get(f"{child[0]}:{child[1]}")
            if f is not None:
                out.append(ListedFile(f.scope, f.name, f.size, f.adler32 or None, f.md5))
        return out

    def lookup(self, dids: Sequence[tuple[str, str]],
               schemes: Sequence[str] | None = None) -> dict[tuple[str, str], ListedFile]:
        out = {}
        with self._lock:
            self.looked_up.extend(dids)
            for scope, name in dids:
                f = self.dids.get(f"{scope}:{name}")
                if f is None:
                    continue
                reps = self._replicas_of(f.did)
                if schemes:
                    reps = [ListedReplica(r.location, r.state, tuple(u for u in r.urls if scheme_of(u) in schemes))
                            for r in reps]
                out[(scope, name)] = ListedFile(scope, name, f.size, f.adler32 or None, f.md5, tuple(reps))
        return out

    def release(self, f: LakeFile) -> None:
        with self._lock:
            if f.did not in self.released:
                self.released.append(f.did)

    def health(self) -> str | None:
        return self.problem
