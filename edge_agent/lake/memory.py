"""A catalogue in memory, shipped for tests and for people writing plugins (as httpx ships a
MockTransport): it keeps DIDs, replicas and copy requests in dicts, says where copies go (a
directory or URL prefix per destination) and implements lake/base.py's interfaces (Catalogue, and
its read side Records) with the same promises as the real ones. Nothing is kept across processes;
nothing here touches storage.

Knobs make it behave as a real catalogue does when things go wrong, and show what it was told:

    catalogue = MemoryCatalogue({"a": "/data/lake-a", "b": "root://xrd//lake-b"})
    catalogue.fail("register", times=2)        # the next two registers raise RetryableError
    catalogue.fail("register", times=None, error=PermanentError("refused"))   # every one, until heal()
    catalogue.free_names = False               # name_free is never sure (the first copy waits for the hash)
    catalogue.rule_state = CopiesState.STUCK   # what copies_state says of the copies requested
    catalogue.list_replica("s:n", "c", "root://c//s/n", state="COPYING")   # a replica the lake made
    catalogue.calls                            # [Call("register", "s:n"), Call("add_replica", "s:n", "a"), ...]
    catalogue.asked("register")                # the register calls, in order
    catalogue.looked_up                        # the DIDs the read side was asked about
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from ..errors import PermanentError, RetryableError
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

Operation = Literal["register", "name_free", "targets", "add_replica", "request_copies", "copies_state",
                    "recorded", "recorded_locations", "release", "health"]
# the operations that change what the catalogue records: the ones `calls` keeps
EFFECTS: frozenset[Operation] = frozenset({"register", "add_replica", "request_copies", "release"})


class Call(NamedTuple):
    """One effect asked of the catalogue: which, for which DID, at which location (add_replica)."""
    operation: Operation
    did: str
    location: str | None = None


@dataclass
class _Fault:
    operation: Operation
    times: int | None            # None: every time, until heal()
    error: Exception | None


class MemoryCatalogue(Catalogue, Records):
    """`roots` maps each destination to where its copies go: an absolute directory or a URL prefix;
    a copy of scope:name lies at root/scope/name; a destination without a root is one whose copy
    the lake makes itself (targets leaves it out). `writes_copies` False: the lake makes the copies
    itself (targets is empty, and each request_copies returns a rule id whose state is `rule_state`).

    listed:     True (as Rucio): recorded() says the catalogue records each copy added, with the
                DID's size and adler32, so nothing at its URL is a copy lost. False (as the local
                lake): it only says where each added copy lies; the storage alone says whether a
                copy is there (nothing there is no replica).
    unavailable: locations whose copies recorded() lists as not usable yet (Rucio: a replica still
                COPYING); with `listed` only (the local lake has no such word).
    free_names: False: name_free answers "not sure" (False) for every name, as a catalogue that
                cannot tell; True: a name is free while no DID holds it.

    What it was asked is kept for tests (as MockTransport keeps it): `calls` (the effects),
    `looked_up` (the DIDs each lookup was asked about, in order)."""

    def __init__(self, roots: dict[str, str], name_pattern: str = r".+", *, writes_copies: bool = True,
                 rule_state: CopiesState | None = None, listed: bool = True) -> None:
        self.name_pattern = name_pattern
        self.roots = dict(roots)
        self.writes_copies = writes_copies
        self.rule_state = rule_state        # None: no copies are requested (the agent writes every one)
        self.listed = listed
        self.unavailable: set[str] = set()
        self.free_names = True
        self.dids: dict[str, LakeFile] = {}
        self.replicas: dict[tuple[str, str], ListedReplica] = {}   # (did, location) -> the replica listed
        # (scope, dataset or container) -> its children (scope, name), in the order attached
        self.contents: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.looked_up: list[tuple[str, str]] = []
        self.rules: dict[str, str] = {}                        # rule id -> did
        self.released: list[str] = []
        self.closed: set[tuple[str, str]] = set()   # datasets closed (close_dataset)
        self.problem: str | None = None     # what health() answers
        self.calls: list[Call] = []         # the effects asked (EFFECTS), in order, failed ones included
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ knobs
    def fail(self, operation: Operation, times: int | None = 1, error: Exception | None = None) -> None:
        """The next `times` calls of `operation` (None: every call until heal()) raise `error`
        (default: a RetryableError) before doing anything; an effect is still recorded in `calls`."""
        with self._lock:
            self._faults.append(_Fault(operation, times, error))

    def heal(self) -> None:
        """Forget every fault still to come."""
        with self._lock:
            self._faults.clear()

    def asked(self, operation: Operation) -> list[Call]:
        """The calls of `operation` (one of EFFECTS) recorded so far, in order."""
        with self._lock:
            return [c for c in self.calls if c.operation == operation]

    def url(self, location: str, f: LakeFile) -> str:
        """Where `location`'s copy of `f` lies."""
        return f"{self.roots[location].rstrip('/')}/{f.scope}/{f.name}"

    # ------------------------------------------------------------ the interface
    def register(self, f: LakeFile) -> None:
        self._enter("register", f.did)
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
        self._enter("name_free", f"{scope}:{name}")
        with self._lock:
            return self.free_names and f"{scope}:{name}" not in self.dids

    def targets(self, f: LakeFile) -> list[Target]:
        self._enter("targets", f.did)
        if not self.writes_copies:
            return []
        # a destination without a root is not the agent's to write: the lake makes that copy
        return [Target(loc, self.url(loc, f)) for loc in f.destinations if loc in self.roots]

    def add_replica(self, f: LakeFile, location: str, url: str) -> None:
        self._enter("add_replica", f.did, location)
        with self._lock:
            self.replicas[(f.did, location)] = ListedReplica(location, "AVAILABLE", (url,))

    def list_replica(self, did: str, location: str, *urls: str, state: str = "AVAILABLE") -> None:
        """After it the catalogue lists a replica of `did` at `location` in `state`, under `urls` (in
        that order, as Rucio lists one PFN per protocol): a copy the lake made, or one in a state the
        agent never sets (COPYING, ...)."""
        with self._lock:
            self.replicas[(did, location)] = ListedReplica(location, state, tuple(urls))

    def request_copies(self, f: LakeFile) -> str | None:
        self._enter("request_copies", f.did)
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
        self._enter("copies_state", f.did)
        if not ref:
            return None
        with self._lock:
            return self.rule_state if ref in self.rules else CopiesState.MISSING

    def recorded(self, f: LakeFile) -> list[RecordedReplica]:
        self._enter("recorded", f.did)
        with self._lock:
            dids = self.dids.get(f.did)
            reps = self._replicas_of(f.did)
        if not self.listed:
            return [RecordedReplica(r.location, r.urls[0] if r.urls else "", listed=False) for r in reps]
        size, adler = (dids.size, dids.adler32) if dids else (None, None)
        return [RecordedReplica(r.location, r.urls[0] if r.urls else "", size, adler,
                                available=r.state == "AVAILABLE" and r.location not in self.unavailable)
                for r in reps]

    def _replicas_of(self, did: str) -> list[ListedReplica]:
        return sorted((r for (d, _), r in self.replicas.items() if d == did), key=lambda r: r.location)

    def recorded_locations(self, scope: str, name: str) -> set[str]:
        self._enter("recorded_locations", f"{scope}:{name}")
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
        self._enter("release", f.did)
        with self._lock:
            if f.did not in self.released:
                self.released.append(f.did)

    def close_dataset(self, scope: str, name: str) -> None:
        with self._lock:
            self.closed.add((scope, name))

    def health(self) -> str | None:
        self._enter("health", "")
        return self.problem

    # ------------------------------------------------------------ inside
    def _enter(self, operation: Operation, did: str, location: str | None = None) -> None:
        """Record an effect, then raise the fault planned for `operation`, if any."""
        with self._lock:
            if operation in EFFECTS:
                self.calls.append(Call(operation, did, location))
            fault = next((f for f in self._faults if f.operation == operation), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
        if fault is not None:
            raise fault.error if fault.error is not None else RetryableError(f"{operation} {did}: injected fault")
