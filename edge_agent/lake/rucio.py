"""The Rucio lake: files become DIDs with replicas, datasets and rules in a Rucio catalogue.

Two ways in, per rule:
  push      the agent uploads to its destination RSEs (URL from lfns2pfns), marks each replica
            AVAILABLE, then asks for `copies` with a rule; the lake's FTS makes the rest.
  register  the buffer is itself an RSE (non-deterministic): the file is registered where it lies
            (buffer_url + its path), and a rule makes the lake copy it away. Just before the local
            file is deleted, the buffer replica is tombstoned (the reaper removes the row).

The catalogue is never taken on trust for the delete decision: with verify_replicas each
AVAILABLE replica's storage is asked for its size and adler32 (edge_agent.steps.verify, at confirmation).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import structlog

from ..core.policy import normalise_adler32
from ..errors import AlreadyDone, EdgeAgentError, PermanentError, RetryableError
from ..settings import RuleSettings, Settings
from ..urls import pick_url, place_of, unsigned_url
from .base import (
    PROTECTED_META_KEYS,
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
from . import rucio_rules
from .rucio_client import PROTOCOLS_TTL_S, NotFound, RucioClient, RucioPermanent

log = structlog.get_logger("edge_agent.lake.rucio")
# the URL schemes the agent has transports for, unless told otherwise (app.build_transports)
WRITABLE_SCHEMES = ("http", "https", "davs", "root")
# Rucio's rule states, as the generic pipeline sees them (a state not named here: not done yet)
_RULE_STATES = {"OK": CopiesState.OK, "STUCK": CopiesState.STUCK, "SUSPENDED": CopiesState.SUSPENDED}

# PFNs kept (lfns2pfns answers): a night's files between their first copy and their confirmation
PFN_CACHE = 100_000
# Names Rucio was asked about ahead of a hashing job (foresee): kept this long, this many.
NAMES_FRESH_S = 10.0
NAMES_KEPT = 10_000
# Rucio's answers that are about a metadata key or value, not about the file.
META_REFUSALS = frozenset({"InvalidMetadata", "KeyNotFound", "InvalidValueForKey", "UnsupportedValueType",
                           "UnsupportedKeyType", "UnsupportedOperation", "MetadataSchemaMismatchError",
                           "UnsupportedMetadataPlugin", "InvalidObject"})
# Characters a register-in-place path cannot carry: Rucio stores the PFN's path as given and
# builds every scheme's PFN from it, so it must be the literal path, and a URL must be able to hold it.
_UNSAFE_IN_PFN = set("?#%\\") | {chr(c) for c in range(32)} | {chr(127)}


# Rucio's answers to "a PFN for this operation in this scheme" where no protocol supports it
NO_PROTOCOL = frozenset({"RSEProtocolNotSupported", "RSEOperationNotSupported", "RSEProtocolDomainNotSupported"})

def _write_priority(protocol: Mapping[str, Any]) -> bool | None:
    """What a protocol's write priorities say alone: True (a positive one, or no domains listed),
    False (none but null or false), None (a 0, whose meaning depends on the server: ask it)."""
    domains = protocol.get("domains") or {}
    if not domains:
        return True
    priorities = [(ops or {}).get("write") for ops in domains.values()]
    if any(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in priorities):
        return True
    if any(isinstance(v, int) and not isinstance(v, bool) and v == 0 for v in priorities):
        return None
    return False


# Between the rule ids of one request for copies in the ledger's lake_ref ("id1,id2"; one id: one rule)
RULE_REF_SEPARATOR = ","


def offsite_sources(expression: str, buffer_rse: str) -> str:
    """The RSE expression of the copies the lake may copy from once the buffer's copy exists: the
    rule's RSEs, never the buffer (even if the expression matched it)."""
    return f"({expression})\\{buffer_rse}"


def _rule_state(rule: dict[str, Any], *, waits_for_source: bool) -> CopiesState:
    state = str(rule.get("state") or "UNKNOWN")
    if waits_for_source and state == "STUCK" and rule.get("error") == "MissingSourceReplica":
        # a rule sourced off-site, placed before its source existed: the judge-repairer starts it
        return CopiesState.REPLICATING
    # REPLICATING, and what Rucio says of a rule not started yet (WAITING_APPROVAL, INJECT)
    return _RULE_STATES.get(state, CopiesState.REPLICATING)


def _once(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each DID's entry once: versions with the same bytes share a name, and one batch may hold two;
    Rucio refuses a call that names a new DID twice (a 500, which would be retried for ever)."""
    return list({(e["scope"], e["name"]): e for e in entries}.values())


class RucioRecords(Records):
    """What a Rucio server records, read through `client` alone: no agent settings needed (the
    access API's Lake.connect has none). RucioCatalogue reads through these same methods."""

    def __init__(self, client: RucioClient) -> None:
        self.client = client

    def dataset_files(self, scope: str, name: str) -> list[ListedFile]:
        try:
            kids = self.client.list_content(scope, name)
        except NotFound as exc:
            raise UnknownDid(str(exc)) from None
        out = []
        for k in kids:
            if str(k.get("type", "FILE")).upper() == "FILE":
                out.append(ListedFile(k["scope"], k["name"], k.get("bytes"), k.get("adler32"), k.get("md5")))
                continue
            try:    # a container: its datasets' files
                out.extend(self.dataset_files(k["scope"], k["name"]))
            except UnknownDid:
                continue    # removed since the container was listed: it holds no files
        return sorted(out, key=lambda f: f.did)

    def lookup(self, dids: Sequence[tuple[str, str]],
               schemes: Sequence[str] | None = None) -> dict[tuple[str, str], ListedFile]:
        out = self._listed(dids, schemes)
        # a DID with no replica at all is not listed by /replicas/list: ask for it by name
        for scope, name in dids:
            if (scope, name) in out:
                continue
            try:
                did = self.client.get_did(scope, name)
            except NotFound:
                continue
            out[(scope, name)] = ListedFile(scope, name, did.get("bytes"), did.get("adler32"), did.get("md5"))
        return out

    def _listed(self, dids: Sequence[tuple[str, str]], schemes: Sequence[str] | None) -> dict[tuple[str, str], ListedFile]:
        """The asked DIDs that have replicas, as /replicas/list gives them (every state)."""
        asked = set(dids)
        out: dict[tuple[str, str], ListedFile] = {}
        for row in self.client.list_replicas(list(dids), schemes=list(schemes) if schemes else None):
            key = (row.get("scope"), row.get("name"))
            if key not in asked or key in out:   # a dataset asked for lists its files: not asked
                continue
            states = row.get("states") or {}
            pfns = row.get("rses") or {}
            replicas = tuple(ListedReplica(rse, str(states.get(rse, "UNKNOWN")), tuple(pfns.get(rse) or ()))
                             for rse in sorted({*states, *pfns}))
            out[key] = ListedFile(key[0], key[1], row.get("bytes"), row.get("adler32"), row.get("md5"), replicas)
        return out

    def close(self) -> None:
        """The Rucio client's connections are closed."""
        self.client.close()


class RucioCatalogue(RucioRecords, Catalogue):
    """Catalogue on a Rucio server. `schemes`: the URL schemes the agent has transports for (a
    copy is written, and a replica's PFN chosen, only in one of them); `max_bytes`: the largest
    file a destination RSE's storage takes (an S3 RSE: one signed PUT), refused before registering."""

    def __init__(self, settings: Settings, client: RucioClient | None = None, *,
                 schemes: Iterable[str] = WRITABLE_SCHEMES, max_bytes: dict[str, int] | None = None) -> None:
        if settings.lake.rucio is None:
            raise ValueError("RucioCatalogue needs settings.lake.rucio")
        self.settings = settings
        self.rucio = settings.lake.rucio
        super().__init__(client or RucioClient(self.rucio))
        self.name_pattern = settings.lake.effective_name_pattern
        self._writable = list(dict.fromkeys(schemes))
        # S3 RSEs (sign_url = "s3"): their https PFNs are reached only through URLs Rucio signs
        self._s3 = {d.rse for d in settings.destinations.values() if d.sign_url == "s3" and d.rse}
        self._max_bytes = dict(max_bytes or {})
        # RSE -> the scheme its destination is written in, where the settings name one
        self._written_in = {d.rse: d.scheme for d in settings.destinations.values() if d.rse and d.scheme}
        self._lock = threading.Lock()
        # (scope, name) -> (Rucio holds it, monotonic time asked): answers asked ahead (foresee)
        self._names_seen: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._known: set[tuple[str, str]] = set()        # datasets/containers seen to exist
        self._pfns: OrderedDict[tuple[str, str, str], str] = OrderedDict()   # (rse, did, scheme) -> PFN
        # (rse, scheme) -> (does a write priority 0 mean the protocol takes writes, when the server said)
        self._zero_priority: dict[tuple[str, str], tuple[bool, float]] = {}
        self._unmanaged_keys: set[str] = set()           # metadata keys this server refused
        if self.rucio.verify_upload == "size":
            # said once at start, since the evidence for deleting a file is weaker there
            for name, d in sorted(settings.destinations.items()):
                if d.kind == "rse" and not d.sign_url:
                    log.warning("verify_upload is size: a copy on a storage that answers no adler32 counts "
                                "on the catalogue's adler32, which is the agent's own",
                                destination=name, rse=d.rse, setting="lake.rucio.verify_upload")

    # ------------------------------------------------------------ helpers
    def _rule(self, f: LakeFile) -> RuleSettings:
        return self.settings.rules[f.rule]

    def _dest_rses(self, f: LakeFile) -> list[tuple[str, str | None]]:
        """(RSE, scheme or None) of each destination of the file's rule, in order, once each."""
        out: dict[str, str | None] = {}
        for d in f.destinations:
            dest = self.settings.destinations[d]
            if dest.rse and dest.rse not in out:
                out[dest.rse] = dest.scheme
        return list(out.items())

    def buffer_pfn(self, f: LakeFile) -> str:
        """Where the buffer RSE serves the local file: buffer_url + the path below the rule's directory
        of the agent's own name for this version (f.buffer_path: the reaper can never reach the DAQ's
        name, nor a new file published under it), or of the file itself for an older version.

        The path goes in literally (no %-quoting): Rucio keeps it as given and derives the root://
        and http:// PFNs from it, so a quoted path would name another file on XRootD.
        """
        rule = self._rule(f)
        assert rule.buffer_url is not None
        top = os.path.normpath(rule.directory)
        path = os.path.normpath(f.buffer_path or f.local_path)
        rel = os.path.relpath(path, top)
        if rel == "." or rel.startswith("../") or rel == ".." or os.path.isabs(rel):
            raise PermanentError(f"cannot register {f.local_path} in place: it is not below the rule's "
                                 f"directory {rule.directory}")
        rel = rel.replace(os.sep, "/")
        bad = sorted({c for c in rel if c in _UNSAFE_IN_PFN or "\udc80" <= c <= "\udcff"})
        if bad:
            raise PermanentError(f"cannot register {rel!r} in place: its path holds {bad!r}, which a "
                                 "storage URL cannot carry unambiguously; rename the file, or push it")
        base = rule.buffer_url if rule.buffer_url.endswith("/") else rule.buffer_url + "/"
        return base + rel

    def _file_entry(self, f: LakeFile, state: str, pfn: str | None = None) -> dict[str, Any]:
        e: dict[str, Any] = {"scope": f.scope, "name": f.name, "bytes": f.size, "adler32": f.adler32,
                             "state": state}
        if f.md5:
            e["md5"] = f.md5
        if pfn:
            e["pfn"] = pfn
        return e

    def _content_problem(self, f: LakeFile, row: Mapping[str, Any] | None, must_exist: bool) -> Exception | None:
        """Why the lake's DID row `row` (None: no such DID) is not this file, or None."""
        if row is None:
            if must_exist:
                return RetryableError(f"Rucio did not keep {f.did} after registering it; will try again")
            return None
        kind = str(row.get("did_type") or row.get("type") or "FILE").upper()
        size, adler, md5 = row.get("bytes"), row.get("adler32"), row.get("md5")
        if kind != "FILE":
            return PermanentError(f"{f.did} already exists in the lake as a {kind}; change name_template "
                                  "(or the dataset/container templates) so that names do not collide")
        if size != f.size or normalise_adler32(adler) != normalise_adler32(f.adler32) \
                or (md5 and f.md5 and str(md5).lower() != f.md5.lower()):
            return PermanentError(f"the lake already holds {f.did} with other content ({size} bytes, adler32 "
                                  f"{adler}); the local file has {f.size} bytes, adler32 {f.adler32}. The local "
                                  "file is kept: rename it or change name_template")
        return None

    def _check_content(self, files: Sequence[LakeFile], idx: list[int], out: list[Exception | None],
                       must_exist: bool) -> None:
        """For each file of `idx`: the lake holds nothing under its name (unless `must_exist`) or
        exactly this file; otherwise its outcome is why not. One bulk lookup for them all."""
        if not idx:
            return
        try:
            rows = {(r.get("scope"), r.get("name")): r for r in self.client.bulk_meta(
                [(files[i].scope, files[i].name) for i in idx])}
        except Exception as exc:  # noqa: BLE001 - the lookup failed: every file waits for it
            for i in idx:
                out[i] = exc
            return
        for i in idx:
            out[i] = self._content_problem(files[i], rows.get((files[i].scope, files[i].name)), must_exist)

    @staticmethod
    def _narrowed(idx: list[int], call: Callable[[list[int]], None], out: list[Any],
                  also: type[Exception] | None = None) -> None:
        """Make `call` for the files of `idx` at once. Rucio's bulk writes are one transaction that
        fails whole without naming the file at fault: a refusal is narrowed down by halves until
        each file at fault carries it alone and every other file went through. A failure that may
        pass (5xx, a timeout) is every file's outcome: they are all tried again later."""
        if not idx:
            return
        refused: tuple[type[Exception], ...] = (PermanentError, also) if also else (PermanentError,)
        try:
            call(idx)
        except RetryableError as exc:
            for i in idx:
                out[i] = exc
        except refused as exc:
            if len(idx) == 1:
                out[idx[0]] = exc
                return
            half = len(idx) // 2
            RucioCatalogue._narrowed(idx[:half], call, out, also)
            RucioCatalogue._narrowed(idx[half:], call, out, also)

    # ------------------------------------------------------------ Catalogue
    def name_free(self, scope: str, name: str) -> bool:
        with self._lock:
            seen = self._names_seen.get((scope, name))
        if seen is not None and time.monotonic() - seen[1] < NAMES_FRESH_S:
            return not seen[0]
        try:
            self.client.get_did(scope, name)
        except NotFound:
            return True
        return False

    def foresee(self, files: Sequence[LakeFile]) -> None:
        """For a hashing job of many files: which of their names Rucio holds, in one POST
        /dids/bulkmeta, kept NAMES_FRESH_S (the name is then reserved in the ledger and every
        destination asked; what Rucio registers meanwhile is caught at registration, which compares
        content), and their PFNs, one lfns2pfns per RSE and scheme for them all, kept like any other.
        One call per job instead of two or three per file: the server's CPU is what a night of small
        files waits for."""
        if len(files) < 2:
            return
        # PFNs only where the agent writes the copies; names for every file (register mode too:
        # a name the lake holds is looked at for its content before a version takes it)
        push = [f for f in files if self._rule(f).inject != "register"]
        try:
            dids = list(dict.fromkeys((f.scope, f.name) for f in files))
            held = {(r.get("scope"), r.get("name")) for r in self.client.bulk_meta(dids)}
            now = time.monotonic()
            with self._lock:
                for did in dids:
                    self._names_seen[did] = (did in held, now)
                while len(self._names_seen) > NAMES_KEPT:
                    self._names_seen.popitem(last=False)
            wanted: dict[tuple[str, str], list[str]] = {}
            for f in push:
                for rse, want in self._dest_rses(f):
                    scheme = "https" if rse in self._s3 else self._scheme_for(rse, want, f.did)   # as targets()
                    with self._lock:
                        known = (rse, f.did, scheme) in self._pfns
                    if not known:
                        wanted.setdefault((rse, scheme), []).append(f.did)
            for (rse, scheme), lfns in wanted.items():
                answer = self.client.lfns2pfns(rse, lfns, scheme, "write")
                with self._lock:
                    for did, url in answer.items():
                        if url:
                            self._pfns[(rse, did, scheme)] = url
                    while len(self._pfns) > PFN_CACHE:
                        self._pfns.popitem(last=False)
        except Exception as exc:  # noqa: BLE001 - a hint: each file asks for itself what is not kept
            log.debug("could not ask Rucio ahead for a job's names", files=len(push), error=str(exc))

    def recorded_locations(self, scope: str, name: str) -> set[str]:
        listed = self._listed([(scope, name)], None).get((scope, name))
        return {r.location for r in listed.replicas} if listed else set()

    def register(self, f: LakeFile) -> None:
        problem = self.register_many([f])[0]
        if problem is not None:
            raise problem

    def register_many(self, files: Sequence[LakeFile]) -> list[Exception | None]:
        """The files' DIDs, replicas (the buffer's, in place; else the first destination's, COPYING
        until uploaded), dataset attachments and metadata, in bulk calls: a name the lake holds with
        other content is refused before and after (Rucio accepts a replica of an existing DID
        silently, whatever its bytes); a bulk call refused whole is narrowed down to the file at fault."""
        out: list[Exception | None] = [None] * len(files)
        entries: dict[int, tuple[str, dict[str, Any]]] = {}
        for i, f in enumerate(files):
            try:
                entries[i] = self._replica_entry(f)
            except Exception as exc:  # noqa: BLE001 - this file's own outcome
                out[i] = exc

        def going() -> list[int]:
            return [i for i in entries if out[i] is None]

        # look first: a conflicting DID must not get a replica row pointing at our bytes
        self._check_content(files, going(), out, must_exist=False)
        by_rse: dict[str, list[int]] = {}
        for i in going():
            by_rse.setdefault(entries[i][0], []).append(i)
        for rse, idx in by_rse.items():
            self._narrowed(idx, lambda part, rse=rse: self.client.add_replicas(rse, _once([entries[i][1] for i in part])),
                           out)
        self._check_content(files, going(), out, must_exist=True)
        by_dataset: dict[tuple[str, str, str | None], list[int]] = {}
        for i in going():
            f = files[i]
            if f.dataset:
                by_dataset.setdefault((f.scope, f.dataset, f.container), []).append(i)
        for idx in by_dataset.values():
            self._narrowed(idx, lambda part: self._collections([files[i] for i in part]), out)
        with_meta = [i for i in going() if files[i].metadata]
        if with_meta:
            self._metadata_many([files[i] for i in with_meta], with_meta, out)
        return out

    def _replica_entry(self, f: LakeFile) -> tuple[str, dict[str, Any]]:
        """(RSE, replica entry) under which `f` is registered; raises PermanentError for a file this
        rule cannot register (no RSE, too large for an S3 RSE, a path a URL cannot carry)."""
        rule = self._rule(f)
        if rule.inject == "register":
            assert rule.buffer_rse is not None
            return rule.buffer_rse, self._file_entry(f, "A", self.buffer_pfn(f))
        rses = self._dest_rses(f)
        if not rses:
            raise PermanentError(f"rule {f.rule} pushes but names no RSE destination")
        for rse, _ in rses:
            self._refuse_oversize(f, rse)
        # COPYING until the upload is verified, as `rucio upload` does
        return rses[0][0], self._file_entry(f, "C")

    def _refuse_oversize(self, f: LakeFile, rse: str) -> None:
        limit = self._max_bytes.get(rse)
        if limit is not None and f.size > limit:
            raise PermanentError(
                f"{f.local_path} has {f.size} bytes, more than one signed PUT may carry to the S3 RSE "
                f"{rse} ({limit} bytes; Rucio signs whole-object operations only). "
                "Not registered: send such files through a rule without S3 destinations")

    def _ensure(self, scope: str, name: str, did_type: str) -> None:
        with self._lock:
            if (scope, name) in self._known:
                return
        self.client.add_did(scope, name, did_type)
        with self._lock:
            self._known.add((scope, name))

    def _collections(self, files: Sequence[LakeFile]) -> None:
        """Attach files of one dataset (and that dataset to its container), creating them if missing."""
        f = files[0]
        if not f.dataset:
            return
        attachments: list[tuple[str, str, list[tuple[str, str]]]] = []
        for attempt in (1, 2):
            self._ensure(f.scope, f.dataset, "DATASET")
            attachments = [(f.scope, f.dataset, list(dict.fromkeys((g.scope, g.name) for g in files)))]
            if f.container:
                self._ensure(f.scope, f.container, "CONTAINER")
                attachments.insert(0, (f.scope, f.container, [(f.scope, f.dataset)]))
            try:
                self.client.attach(attachments)
                return
            except NotFound:
                # a dataset remembered as existing was removed meanwhile: create it again, once
                if attempt == 2:
                    raise
                with self._lock:
                    self._known.discard((f.scope, f.dataset))
                    if f.container:
                        self._known.discard((f.scope, f.container))

    def _metadata_many(self, files: Sequence[LakeFile], idx: list[int], out: list[Exception | None]) -> None:
        """Set many files' metadata in one call; if it is refused (one key or value refuses the whole
        call), file by file, where a refused key is a warning (_metadata)."""
        with self._lock:
            skip = set(self._unmanaged_keys)
        entries = []
        for f in files:
            meta = {k: v for k, v in f.metadata.items() if k not in PROTECTED_META_KEYS and k not in skip}
            if meta:
                entries.append((f.scope, f.name, meta))
        if entries and not any(k in PROTECTED_META_KEYS for f in files for k in f.metadata):
            try:
                self.client.bulk_set_metadata(entries)
                return
            except RucioPermanent:
                pass      # which key, or which file, is told file by file
            except RetryableError as exc:
                for i in idx:
                    out[i] = exc
                return
        for i, f in zip(idx, files, strict=True):
            try:
                self._metadata(f)
            except Exception as exc:  # noqa: BLE001 - this file's own outcome
                out[i] = exc

    def _metadata(self, f: LakeFile) -> None:
        """Set the file's metadata; a key the server refuses is a warning, never a lost file.

        Rucio's generic JSON metadata plugin is off on SQLite (and some deployments): only the
        DID-table columns (project, datatype, run_number, ...) are accepted there. The data must
        reach the lake regardless; refused keys are logged once and skipped afterwards.
        """
        with self._lock:
            skip = set(self._unmanaged_keys)
        protected = sorted(k for k in f.metadata if k in PROTECTED_META_KEYS)
        if protected:
            log.warning("metadata keys not sent: they are Rucio DID columns with a meaning of their own",
                        did=f.did, keys=protected)
        meta = {k: v for k, v in f.metadata.items() if k not in PROTECTED_META_KEYS and k not in skip}
        if not meta:
            return
        try:
            self.client.set_metadata(f.scope, f.name, meta)
            return
        except RucioPermanent as exc:
            if exc.rucio_class not in META_REFUSALS:
                raise
            if len(meta) == 1:
                self._refused(f, next(iter(meta)), exc)
                return
        for key, value in meta.items():   # find which keys the server does not take
            try:
                self.client.set_metadata_key(f.scope, f.name, key, value)
            except RucioPermanent as exc:
                if exc.rucio_class not in META_REFUSALS:
                    raise
                self._refused(f, key, exc)

    def _refused(self, f: LakeFile, key: str, exc: RucioPermanent) -> None:
        if exc.rucio_class == "InvalidMetadata" and "No plugin manages" in str(exc):
            with self._lock:
                self._unmanaged_keys.add(key)
            log.warning("metadata key not managed by this Rucio server: skipped from now on", did=f.did,
                        key=key, reason=str(exc))
        else:
            log.warning("metadata value refused by Rucio: skipped", did=f.did, key=key, reason=str(exc))

    def targets(self, f: LakeFile) -> list[Target]:
        if self._rule(f).inject == "register":
            return []
        out = []
        for rse, want in self._dest_rses(f):
            self._refuse_oversize(f, rse)       # before a byte is read for it
            s3 = rse in self._s3
            # an S3 RSE's protocol is https (Rucio signs the https PFN), whatever else it offers
            scheme = "https" if s3 else self._scheme_for(rse, want, f.did)
            if not s3 and scheme in ("https", "davs") and self._signs_s3(rse):
                raise PermanentError(
                    f"RSE {rse} is S3 storage (Rucio attribute sign_url=s3): unsigned uploads are refused there. "
                    f"Set sign_url = \"s3\" on its destination (and md5 = true on rule {f.rule})")
            url = self._pfn(rse, f.did, scheme)
            if not url:
                raise RetryableError(f"Rucio gave no {scheme} URL for {f.did} on {rse}")
            out.append(Target(rse, url))
        return out

    def _pfn(self, rse: str, did: str, scheme: str) -> str | None:
        """Where `rse` keeps `did` in `scheme` (lfns2pfns), asked once: a file's targets are asked when
        its first copy is written, again for the others, and by the naming checks; the answer of a
        deterministic RSE does not change."""
        key = (rse, did, scheme)
        with self._lock:
            url = self._pfns.get(key)
            if url is not None:
                self._pfns.move_to_end(key)
                return url
        url = self.client.lfns2pfns(rse, [did], scheme, "write").get(did)
        if url:
            with self._lock:
                self._pfns[key] = url
                while len(self._pfns) > PFN_CACHE:
                    self._pfns.popitem(last=False)
        return url

    def _signs_s3(self, rse: str) -> bool:
        try:
            attrs = self.client.rse_attributes(rse)
        except RucioPermanent:
            return False      # attributes not readable: the upload's own answer will tell
        return str(attrs.get("sign_url", "")).lower() == "s3"

    def _scheme_for(self, rse: str, wanted: str | None, did: str) -> str:
        """The scheme `did` is written to `rse` in: the first the agent may use (the destination's, else
        lake.rucio.schemes) and has a transport for whose protocol on `rse` takes writes."""
        protocols = self.client.rse_protocols(rse)
        prefs = [wanted] if wanted else list(self.rucio.schemes)
        for scheme in prefs:
            mine = [p for p in protocols if p.get("scheme") == scheme]
            if scheme in self._writable and any(self._takes_writes(rse, p, did) for p in mine):
                return scheme
        offered = list(dict.fromkeys(str(p["scheme"]) for p in protocols
                                     if p.get("scheme") and _write_priority(p) is not False))
        raise PermanentError(f"no way to upload to RSE {rse}: it offers {offered or 'no writable protocol'}, the "
                             f"agent may use {prefs} ({'the destination scheme' if wanted else 'lake.rucio.schemes'})"
                             f" and has transports for {sorted(self._writable)}")

    def _takes_writes(self, rse: str, protocol: Mapping[str, Any], did: str) -> bool:
        """Does `protocol` of `rse` take writes? A positive write priority says yes, and none (null) no,
        to every Rucio release; a priority 0 says "not supported" to the 38 series and before, and
        "first" to later ones. For a 0 the server itself is asked: would it give `did` a PFN for
        writing in this scheme (the lfns2pfns the upload asks anyway)? Never the release number."""
        said = _write_priority(protocol)
        if said is not None:
            return said
        scheme = str(protocol["scheme"])
        key = (rse, scheme)
        now = time.monotonic()
        with self._lock:
            known = self._zero_priority.get(key)
        if known is not None and now - known[1] < PROTOCOLS_TTL_S:   # asked again as protocols are
            return known[0]
        try:
            self._pfn(rse, did, scheme)        # the answer kept for the upload, as any PFN asked
            writes = True
        except RucioPermanent as exc:
            if exc.rucio_class not in NO_PROTOCOL:
                raise
            writes = False
        with self._lock:
            self._zero_priority[key] = (writes, now)
        if known is None or known[0] != writes:
            log.info("Rucio server: a write priority 0 read as the server reads it", rse=rse, scheme=scheme,
                     meaning="first" if writes else "not supported")
        return writes

    def add_replica(self, f: LakeFile, location: str, url: str) -> None:
        try:
            self.client.update_replica_states(location, [{"scope": f.scope, "name": f.name, "state": "A"}])
        except NotFound:
            # a destination other than the one registered with the DID: its replica is new
            self.client.add_replicas(location, [self._file_entry(f, "A", url)])

    def add_replicas_many(self, copies: Sequence[tuple[LakeFile, str, str]]) -> list[Exception | None]:
        """Copies written (and checked) by the agent just now recorded AVAILABLE: on the RSE the
        register step registered the file on, its COPYING replica set AVAILABLE (PUT /replicas;
        one that is gone meanwhile is added again first); on any other RSE the replica added
        (POST /replicas, AVAILABLE) and then set AVAILABLE (PUT), because Rucio's POST leaves a
        replica that existed already as it was (COPYING, UNAVAILABLE, BAD: made by a rule, or
        declared bad by the lake), and only this moment, right after the agent's own checked
        upload, vouches for the bytes. A call refused whole is narrowed down to the copy at fault."""
        out: list[Exception | None] = [None] * len(copies)
        by_rse: dict[tuple[str, bool], list[int]] = {}
        for i, (f, location, _) in enumerate(copies):
            try:
                registered = self._replica_entry(f)[0] == location
            except Exception as exc:  # noqa: BLE001 - this file's own outcome
                out[i] = exc
                continue
            by_rse.setdefault((location, registered), []).append(i)
        for (rse, registered), idx in by_rse.items():
            def record(part: list[int], rse: str = rse, registered: bool = registered) -> None:
                if len(part) == 1:
                    self.add_replica(*copies[part[0]])
                    return
                entries = _once([self._file_entry(copies[i][0], "A", copies[i][2]) for i in part])
                states = [{"scope": e["scope"], "name": e["name"], "state": "A"} for e in entries]
                if registered:
                    try:
                        self.client.update_replica_states(rse, states)
                        return
                    except NotFound:
                        pass   # one of them is gone (removed behind our back): added again below
                self.client.add_replicas(rse, entries)
                self.client.update_replica_states(rse, states)
            self._narrowed(idx, record, out)
        return out

    def _rule_groups(self, files: Sequence[LakeFile]) -> tuple[dict[tuple[Any, ...], list[int]], list[int]]:
        """The files whose rules say the same (expression, copies, lifetime, activity, grouping,
        rule_per), by scope and dataset; and those asked alone (register mode with uplink_once:
        two rules each, in order; a rule without an expression: its refusal, alone)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        alone: list[int] = []
        for i, f in enumerate(files):
            rule = self._rule(f)
            expression = rule.rse_expression or "|".join(rse for rse, _ in self._dest_rses(f))
            if not expression or (rule.inject == "register" and rule.uplink_once and f.copies > 1):
                alone.append(i)
                continue
            key = (expression, f.copies, rule.rule_lifetime_seconds, rule.activity, rule.grouping,
                   rule.rule_per, f.scope, f.dataset)
            groups.setdefault(key, []).append(i)
        return groups, alone

    def plan_copies(self, files: Sequence[LakeFile], planned: Sequence[str | None]) -> list[str | None]:
        """rule_per = "batch": the dataset each chunk of files gets its rule on
        (`dataset:<name>`), decided before anything is asked and kept in the ledger first: a
        crash then repeats the request on the same dataset for the same files, whichever files
        come back with them (without it a batch made of other files would get a second rule).
        A file planned or asked for before keeps what it has."""
        out = list(planned)
        groups, _ = self._rule_groups(files)
        for (_, copies, _, _, _, per, _, _), idx in groups.items():
            fresh = [i for i in idx if not out[i]]
            size = rucio_rules.files_per_rule(copies) if per == "batch" else 1
            for start in range(0, len(fresh), size):
                chunk = fresh[start:start + size]
                dids = list(dict.fromkeys((files[i].scope, files[i].name) for i in chunk))
                name = rucio_rules.dataset_name(files[chunk[0]].dataset, dids)
                # a chunk of one file (or a name too long) gets a rule on the file itself
                plan = rucio_rules.PLANNED + name if len(dids) >= 2 and name is not None else rucio_rules.PLANNED_ALONE
                for i in chunk:
                    out[i] = plan
        return out

    def request_copies_many(self, files: Sequence[LakeFile],
                            plans: Sequence[str | None] | None = None) -> list[str | None | Exception]:
        """The files' requests for copies, in as few calls as their rules allow: the files planned
        on one dataset (plan_copies) get one rule on it, closed, with exactly them in it; the
        others one rule each, asked in one call (rule_per = "file", a batch of one, or a batch
        Rucio refuses). A file with a rule already, or one the lake refuses, is found by halves
        and asked alone (request_copies finds an existing rule). A file whose plan is a rule
        asked before keeps it (the confirm step asks again for one that is gone). Without `plans`,
        planned here (nothing kept: a crash may then make a batch's rule twice)."""
        out: list[str | None | Exception] = [None] * len(files)
        plans = list(plans) if plans is not None else self.plan_copies(files, [None] * len(files))
        groups, alone = self._rule_groups(files)
        for i in alone:
            out[i] = self._asked_alone(files[i])
        for (expression, copies, lifetime, activity, grouping, _, _, _), idx in groups.items():
            kept = [i for i in idx if plans[i] and not str(plans[i]).startswith(
                (rucio_rules.PLANNED, rucio_rules.PLANNED_ALONE))]
            for i in kept:
                out[i] = plans[i]
            idx = [i for i in idx if i not in kept]
            idx = self._batch_rules(files, idx, plans, out, expression, copies, lifetime, activity, grouping)

            def ask(part: list[int], expression: str = expression, copies: int = copies, lifetime: Any = lifetime,
                    activity: Any = activity, grouping: str = grouping) -> None:
                if len(part) == 1:
                    out[part[0]] = self._asked_alone(files[part[0]])
                    return
                dids = list(dict.fromkeys((files[i].scope, files[i].name) for i in part))
                ids = dict(zip(dids, self.client.add_rules(dids, copies, expression, lifetime=lifetime,
                                                           activity=activity, grouping=grouping), strict=True))
                for i in part:
                    out[i] = ids[(files[i].scope, files[i].name)]
            self._narrowed(idx, ask, out, also=AlreadyDone)   # type: ignore[arg-type]
        return out

    def _batch_rules(self, files: Sequence[LakeFile], idx: list[int], plans: Sequence[str | None],
                     out: list[str | None | Exception], expression: str, copies: int, lifetime: int | None,
                     activity: str | None, grouping: str) -> list[int]:
        """One rule per dataset the files of `idx` are planned on (files of one scope), made on it
        with exactly them attached, then closed; their ids go to `out`. Returns the files left to
        rules of their own: those planned on none, and those of a dataset Rucio refused (the
        refusal is then narrowed down file by file)."""
        left: list[int] = []
        by_dataset: dict[str, list[int]] = {}
        for i in idx:
            plan = plans[i]
            if plan and plan.startswith(rucio_rules.PLANNED):
                by_dataset.setdefault(plan[len(rucio_rules.PLANNED):], []).append(i)
            else:
                left.append(i)
        for name, chunk in by_dataset.items():
            scope = files[chunk[0]].scope
            dids = list(dict.fromkeys((files[i].scope, files[i].name) for i in chunk))
            outside: list[tuple[str, str]] = []
            try:
                rule_id: str | Exception
                rule_id, outside = rucio_rules.rule_on_batch(
                    self.client, scope, name, dids, copies, expression, lifetime=lifetime, activity=activity,
                    grouping=grouping)
            except RetryableError as exc:
                rule_id = exc
            except PermanentError as exc:
                log.warning("Rucio refused a rule for a batch; asking one rule per file", dataset=name,
                            files=len(dids), reason=str(exc))
                try:
                    rucio_rules.give_up(self.client, scope, name, dids)
                except EdgeAgentError as undone:
                    rule_id = undone       # tried again, whole, later
                else:
                    left += chunk
                    continue
            for i in chunk:
                if (files[i].scope, files[i].name) in outside:
                    left.append(i)         # not in the dataset its rule was made on: a rule of its own
                else:
                    out[i] = rule_id
        return left

    def _asked_alone(self, f: LakeFile) -> str | None | Exception:
        try:
            return self.request_copies(f)
        except Exception as exc:  # noqa: BLE001 - this file's own outcome
            return exc

    def request_copies(self, f: LakeFile) -> str | None:
        """The rule(s) asking the lake for `copies`; their ids as one ref (RULE_REF_SEPARATOR between).

        Register mode with uplink_once: a rule of N copies would pull N copies from the buffer across
        the site's uplink. Instead, as CTAO's ingest does, one rule of 1 copy (its only source is the
        buffer), then one rule of N copies on the same expression whose transfers may read only from
        the expression's RSEs, never the buffer (source_replica_expression). Rucio places the second
        rule's first copy on the first rule's replica (it prefers RSEs already holding the file), so
        it adds N-1 transfers, all from off-site. Those have no source until the first copy is
        AVAILABLE: Rucio makes the second rule STUCK (MissingSourceReplica) and its judge-repairer
        starts them later (copies_state reports that wait as REPLICATING). Asked in this order
        (the first rule's replica must exist when the second is placed), each idempotently."""
        rule = self._rule(f)
        expression = rule.rse_expression or "|".join(rse for rse, _ in self._dest_rses(f))
        if not expression:
            raise PermanentError(f"rule {f.rule}: no rse_expression and no RSE destinations to ask copies on")

        def ask(copies: int, sources: str | None = None) -> str:
            return self.client.add_rule(f.scope, f.name, copies, expression, lifetime=rule.rule_lifetime_seconds,
                                        activity=rule.activity, grouping=rule.grouping,
                                        source_replica_expression=sources)

        if rule.inject != "register" or not rule.uplink_once or f.copies == 1:
            return ask(f.copies)
        assert rule.buffer_rse is not None
        first = ask(1)
        rest = ask(f.copies, offsite_sources(expression, rule.buffer_rse))
        return RULE_REF_SEPARATOR.join((first, rest))

    def copies_state(self, f: LakeFile, ref: str | None) -> CopiesState | None:
        return self.copies_states([(f, ref)])[0]

    def copies_states(self, asked: Sequence[tuple[LakeFile, str | None]]) -> list[CopiesState | None]:
        """The state of each file's rule(s) (its `ref`): MISSING if one is gone (request_copies asks
        again, and finds the one still there), OK when all are OK. Each rule is read once however
        many files share it; a rule on a collection (a batch's dataset) answers for each file by
        that file's own locks (rucio_rules.file_states). Register mode's two rules: while the
        buffer's copy (the first rule) is being made, its state alone; the later rule is read only
        once the first is OK."""
        rules: dict[str, dict[str, Any] | None] = {}
        by_file: dict[str, dict[tuple[str, str], CopiesState]] = {}    # a collection rule's files
        sharing: dict[str, list[tuple[str, str]]] = {}
        for f, ref in asked:
            for rule_id in (ref.split(RULE_REF_SEPARATOR) if ref else ()):
                sharing.setdefault(rule_id, []).append((f.scope, f.name))

        def state_of(f: LakeFile, rule_id: str, waits_for_source: bool) -> CopiesState:
            if rule_id not in rules:
                try:
                    rules[rule_id] = self.client.get_rule(rule_id)
                except NotFound:
                    rules[rule_id] = None
            rule = rules[rule_id]
            if rule is None:
                return CopiesState.MISSING
            if (rule.get("scope"), rule.get("name")) == (f.scope, f.name):
                return _rule_state(rule, waits_for_source=waits_for_source)
            if rule_id not in by_file:
                try:
                    locks = self.client.rule_locks(rule_id)
                except NotFound:
                    locks = []         # gone meanwhile: no file is locked by it
                by_file[rule_id] = rucio_rules.file_states(rule, locks, sharing[rule_id])
            return by_file[rule_id][(f.scope, f.name)]

        out: list[CopiesState | None] = []
        for f, ref in asked:
            if not ref:
                out.append(None)
                continue
            first, *rest = ref.split(RULE_REF_SEPARATOR)
            state = state_of(f, first, waits_for_source=False)
            if state is CopiesState.OK and rest:
                states = [state_of(f, rid, waits_for_source=True) for rid in rest]
                state = next((worst for worst in (CopiesState.MISSING, CopiesState.SUSPENDED, CopiesState.STUCK,
                                                  CopiesState.REPLICATING) if worst in states), CopiesState.OK)
            out.append(state)
        return out

    def storage_prefixes(self, rse: str, scheme: str = "https") -> list[str]:
        """The URL prefixes under which Rucio builds `rse`'s PFNs in `scheme` (scheme://host:port/prefix/),
        where a transport for that storage alone is mounted (an S3 RSE's signing transport)."""
        out: list[str] = []
        for p in self.client.rse_protocols(rse):
            if p.get("scheme") != scheme or not p.get("hostname"):
                continue
            path = "/" + str(p.get("prefix") or "").strip("/")
            path = path if path.endswith("/") else path + "/"
            host = str(p["hostname"])
            for netloc in (f"{host}:{p['port']}", host) if p.get("port") else (host,):
                out.append(f"{scheme}://{netloc}{path}")
        if not out:
            log.warning("Rucio lists no storage endpoint for this RSE", rse=rse, scheme=scheme)
        return out

    def _schemes(self) -> list[str]:
        ordered = [s for s in self.rucio.schemes if s in self._writable]
        ordered += [s for s in self._writable if s not in ordered]
        if self._s3 and "https" not in ordered:
            ordered.append("https")      # the S3 RSEs' protocol
        return ordered

    def recorded(self, f: LakeFile) -> list[RecordedReplica]:
        return self.recorded_many([f])[0]

    def recorded_many(self, files: Sequence[LakeFile]) -> list[list[RecordedReplica]]:
        """The replicas Rucio records for each file (never the buffer's), one bulk list for them all."""
        listed = self._listed([(f.scope, f.name) for f in files], self._schemes()) if files else {}
        return [self._recorded_of(f, listed.get((f.scope, f.name))) for f in files]

    def _recorded_of(self, f: LakeFile, listed: ListedFile | None) -> list[RecordedReplica]:
        rule = self._rule(f)
        schemes = self._schemes()
        if listed is None:
            return []
        out = []
        for r in listed.replicas:
            if r.location == rule.buffer_rse:
                continue
            # PFNs are never compared as strings (the same file's differ by scheme and by '//'): only
            # chosen. A destination written in a scheme of its own (`scheme`) is asked in that scheme
            # too: the storage answers as it did right after the upload, through the same transport
            want = self._written_in.get(r.location)
            url = pick_url(r.urls, [want, *schemes] if want else schemes)
            # an S3 PFN may come signed (a credential): never kept
            # the place each PFN names: two RSEs over one storage path list one copy, which counts once
            places = tuple(sorted({("pfn", place_of(u)) for u in r.urls}))
            out.append(RecordedReplica(r.location, unsigned_url(url) if r.location in self._s3 else url,
                                       listed.size, listed.adler32, r.state == "AVAILABLE", places=places))
        return out

    def close_dataset(self, scope: str, name: str) -> None:
        self.client.close_did(scope, name)

    def release(self, f: LakeFile) -> None:
        rule = self._rule(f)
        if rule.inject != "register":
            return
        assert rule.buffer_rse is not None
        try:
            self.client.tombstone(rule.buffer_rse, f.scope, f.name)
        except RucioPermanent as exc:
            if exc.rucio_class == "ReplicaIsLocked":
                raise PermanentError(
                    f"cannot release the buffer copy of {f.did} on {rule.buffer_rse}: a replication rule locks "
                    f"it (does rules.{f.rule}.rse_expression {rule.rse_expression!r} match the buffer RSE?). "
                    "The local file is kept.") from None
            raise

    def health(self) -> str | None:
        try:
            self.client.ping()
            self.client.token()
        except EdgeAgentError as exc:
            return str(exc)
        return self._signing_problem()

    def _signing_problem(self) -> str | None:
        """Why Rucio refuses to sign URLs for an RSE, asked again each time (the permission granted,
        the problem is gone at once, whether or not a file waits for that RSE)."""
        for rse, (_, operation, url) in sorted(self.client.signing_refused.items()):
            try:
                self.client.signed_url(rse, operation, url)
            except EdgeAgentError as exc:
                if rse in self.client.signing_refused:
                    return str(exc)
        return None


