"""The catalogue seam: what the lake records about files (DIDs, replicas, where copies go) and what
it is asked to do with them. The local-directory lake, Rucio and the in-memory catalogue implement it.
Storage is not the catalogue's: no module here imports edge_agent.transfer.

Every method is idempotent: doing it again after a crash is success, and an effect that
already exists (a DID, an attachment, a replica, a rule) is not an error.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, PermanentError

# Metadata keys that are columns of Rucio's DID table with a meaning of their own: setting them
# through /meta would rewrite the file's size or checksum, its lifetime or its visibility. Never
# sent by the Rucio catalogue, never taken from an extractor (extractors/output.py).
PROTECTED_META_KEYS = frozenset({
    "scope", "name", "type", "did_type", "account", "bytes", "adler32", "md5", "length", "guid",
    "lifetime", "eol_at", "expired_at", "purge_replicas", "hidden", "obsolete", "suppressed", "is_open",
    "monotonic", "complete", "availability", "transient", "is_archive", "constituent", "is_new",
    "created_at", "updated_at", "deleted_at", "closed_at", "accessed_at", "access_cnt",
    "created_before", "created_after"})


@dataclass(frozen=True)
class LakeFile:
    """One version of one file as the lake sees it."""
    rule: str
    scope: str
    name: str
    dataset: str | None
    size: int
    adler32: str
    md5: str | None
    blake3: str
    copies: int
    destinations: tuple[str, ...]
    local_path: str
    metadata: dict[str, Any] = field(default_factory=dict)
    container: str | None = None   # the dataset's container, when the rule names one
    # register in place: the agent's own name for this version in the buffer (a hard link), the one
    # the buffer replica is registered under (None: an older version, registered at its own path)
    buffer_path: str | None = None

    @property
    def did(self) -> str:
        return f"{self.scope}:{self.name}"

    @classmethod
    def unhashed(cls, rule: str, scope: str, name: str, size: int, copies: int, destinations: tuple[str, ...],
                 local_path: str) -> LakeFile:
        """A file whose bytes are still to be read: enough to say where its copies go (targets),
        nothing to register (its checksums are empty)."""
        return cls(rule=rule, scope=scope, name=name, dataset=None, size=size, adler32="", md5=None, blake3="",
                   copies=copies, destinations=destinations, local_path=local_path)


@dataclass(frozen=True)
class Target:
    """A place the agent itself writes a copy to; the transport that writes it is the URL's
    (transfer.registry.Transports.for_url)."""
    location: str
    url: str
    # the pipeline's word, for a first copy resumed after a cut-short upload: the object at `url`
    # is a leftover of that upload (nobody records it), to be replaced
    replace_leftover: bool = False


@dataclass(frozen=True)
class RecordedReplica:
    """A copy as the catalogue records it: where it lies and what the catalogue says of it. What the
    storage holds there is the confirm step's to ask (edge_agent.steps.verify)."""
    location: str                 # destination or RSE name
    url: str                      # where the storage holds it ("" when the catalogue has no usable URL)
    size: int | None = None       # the catalogue's size and adler32 (the agent's own numbers, registered)
    adler32: str | None = None
    available: bool = True        # the catalogue lists it as usable (Rucio: AVAILABLE)
    # True: the catalogue records a copy there, so nothing at the URL is a copy lost. False: it only
    # says where a copy goes (the local lake counts what lies there): nothing there is no replica.
    listed: bool = True
    # keys naming the physical place the copy lies in (a filesystem's place token, a file's dev/ino):
    # a copy in a place that a copy counted before it holds counts once
    places: tuple[tuple[str, Hashable], ...] = ()
    # how the storage is asked: "reread" the copy, or trust the adler32 recorded with it while its
    # size and mtime are unchanged ("recorded": a posix destination's verify setting)
    verify: str = "reread"


class CopiesState(enum.StrEnum):
    """Where the copies asked for by request_copies stand (Rucio: the replication rule's state)."""
    OK = "OK"                     # every copy asked for is made
    REPLICATING = "REPLICATING"   # still being made (or waiting to be)
    STUCK = "STUCK"               # the lake tried and gave up for now: a person may be needed
    SUSPENDED = "SUSPENDED"       # the lake stopped making them
    MISSING = "MISSING"           # the request is gone (expired, deleted): to be asked again


class UnknownDid(PermanentError):
    """The catalogue holds no such DID (file, dataset or container)."""


class NoCatalogue(ConfigError, PermanentError):
    """There is no catalogue to read (the local lake's file was never written)."""


@dataclass(frozen=True)
class ListedReplica:
    """A replica as the catalogue lists it when asked by DID: where, in what state, at which URLs."""
    location: str                 # destination or RSE name
    state: str                    # the catalogue's word: AVAILABLE, COPYING, ... (the local lake: AVAILABLE)
    urls: tuple[str, ...] = ()    # every URL (PFN) it lists the copy under, in its order; urls.pick_url chooses


@dataclass(frozen=True)
class ListedFile:
    """A file DID as the catalogue records it: its size and checksums (the agent's own, registered)
    and, when asked by DID (Records.lookup), every replica listed, whatever its state."""
    scope: str
    name: str
    size: int | None
    adler32: str | None
    md5: str | None = None
    replicas: tuple[ListedReplica, ...] = ()

    @property
    def did(self) -> str:
        return f"{self.scope}:{self.name}"


class Records(abc.ABC):
    """The catalogue's read side: what it records about files, asked by dataset or by DID, never
    asked of storage. `audit` and the access API read the lake through it; the catalogues' own
    `recorded` (the confirm step's) is built on the same reads. Read-only: nothing changes."""

    @abc.abstractmethod
    def dataset_files(self, scope: str, name: str) -> list[ListedFile]:
        """The files of dataset scope:name (of a container: its datasets' files), sorted by DID,
        with size and checksums and no replicas. Raises UnknownDid where the catalogue can tell
        that it holds no such dataset (Rucio, the in-memory one); the local lake lists none."""

    @abc.abstractmethod
    def lookup(self, dids: Sequence[tuple[str, str]],
               schemes: Sequence[str] | None = None) -> dict[tuple[str, str], ListedFile]:
        """Each of `dids` the catalogue holds, by (scope, name), with every replica it lists (in
        location order); a DID it does not hold is left out. `schemes`: list only URLs in these
        schemes (a bare path is "file"; None: every URL). Raises what asking costs (RetryableError)."""

    def close(self) -> None:
        """The connections the reads used are closed."""


class Catalogue(abc.ABC):
    """What the lake knows about files, and what it is asked to do with them."""

    name_pattern: str

    @abc.abstractmethod
    def register(self, f: LakeFile) -> None:
        """Create the file DID (and its dataset, attachment and metadata) if missing.

        Raises PermanentError if the DID exists with other bytes or checksum.
        """

    def name_free(self, scope: str, name: str) -> bool:
        """True only if the lake certainly holds nothing under scope:name: the first copy may then be
        written before the DID exists (in the hashing pass). False when unsure."""
        return False

    def foresee(self, files: Sequence[LakeFile]) -> None:
        """A hint: name_free and targets are about to be asked for these files, one by one; a
        catalogue that can answer for many in one call may ask now and keep the answers briefly.
        Best effort: it never raises, and answers not kept are asked for when needed."""

    @abc.abstractmethod
    def targets(self, f: LakeFile) -> list[Target]:
        """Where the agent must write copies itself (may be empty: the lake replicates)."""

    @abc.abstractmethod
    def add_replica(self, f: LakeFile, location: str, url: str) -> None:
        """Record a copy the agent wrote at `location`."""

    @abc.abstractmethod
    def request_copies(self, f: LakeFile) -> str | None:
        """Ask the lake to hold `f.copies` copies (a replication rule).

        Returns a reference kept in the ledger (the rule id), or None where the agent makes
        every copy itself. A rule that already exists is success: its id is returned.
        """

    def copies_state(self, f: LakeFile, ref: str | None) -> CopiesState | None:
        """The state of what request_copies asked for (`ref`); None where there is no such thing
        (the agent made every copy)."""
        return None

    @abc.abstractmethod
    def recorded(self, f: LakeFile) -> list[RecordedReplica]:
        """The copies the catalogue records now (never the buffer's own), as it records them:
        nothing here was asked of the storage."""

    # ------------------------------------------------------------ in batches
    # A batch step asks these once for many files (of one rule and dataset). The defaults ask file by
    # file; a catalogue with bulk calls overrides them. Each is as idempotent as its single form.
    def register_many(self, files: Sequence[LakeFile]) -> list[Exception | None]:
        """register() for each file: after it, each file whose entry is None is registered; the others
        carry why not (PermanentError for that file alone, RetryableError...), and nothing of theirs
        was left half-made that a repeat would not finish."""
        out: list[Exception | None] = []
        for f in files:
            try:
                self.register(f)
                out.append(None)
            except Exception as exc:  # noqa: BLE001 - each file's own outcome, sorted by the step
                out.append(exc)
        return out

    def add_replicas_many(self, copies: Sequence[tuple[LakeFile, str, str]]) -> list[Exception | None]:
        """add_replica() for each (file, location, url): after it, each copy whose entry is None is
        recorded; the others carry why not."""
        out: list[Exception | None] = []
        for f, location, url in copies:
            try:
                self.add_replica(f, location, url)
                out.append(None)
            except Exception as exc:  # noqa: BLE001 - each copy's own outcome, sorted by the step
                out.append(exc)
        return out

    def plan_copies(self, files: Sequence[LakeFile], planned: Sequence[str | None]) -> list[str | None]:
        """What each file's request for copies will be made on, where the catalogue asks for many
        files at once (Rucio: the dataset of a batch's rule), decided before anything is asked and
        kept in the ledger first (as the file's lake_ref), so that a crash repeats the same request
        for the same files. `planned`: what each file has kept so far, kept as it is. Here:
        nothing to plan."""
        return list(planned)

    def request_copies_many(self, files: Sequence[LakeFile],
                            plans: Sequence[str | None] | None = None) -> list[str | None | Exception]:
        """request_copies() for each file: its reference (or None), or why the request failed.
        `plans`: what plan_copies said (nothing to follow here)."""
        out: list[str | None | Exception] = []
        for f in files:
            try:
                out.append(self.request_copies(f))
            except Exception as exc:  # noqa: BLE001 - each file's own outcome, sorted by the step
                out.append(exc)
        return out

    def copies_states(self, asked: Sequence[tuple[LakeFile, str | None]]) -> list[CopiesState | None]:
        """copies_state() of each (file, reference), in order."""
        return [self.copies_state(f, ref) for f, ref in asked]

    def recorded_many(self, files: Sequence[LakeFile]) -> list[list[RecordedReplica]]:
        """recorded() of each file, in order."""
        return [self.recorded(f) for f in files]

    def recorded_locations(self, scope: str, name: str) -> set[str]:
        """The locations (destinations, RSEs) where the catalogue records a replica of scope:name.
        A copy recorded there is never removed as an unregistered one: someone registered it."""
        return set()

    def release(self, f: LakeFile) -> None:
        """Just before the local file is deleted: drop the lake's record of the buffer copy
        (register-in-place). Idempotent; a record already gone is success."""

    def close_dataset(self, scope: str, name: str) -> None:
        """After this the lake records dataset scope:name as closed: nothing more is attached to it
        (a night's close-out). Idempotent: a dataset closed already is success."""
        raise PermanentError(f"{type(self).__name__} cannot close datasets (close_nights)")

    @abc.abstractmethod
    def health(self) -> str | None:
        """None when the lake is usable now, else why not (for /readyz)."""

    def close(self) -> None:
        """The catalogue's connections are closed (the transports are not its own)."""
