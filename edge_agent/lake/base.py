"""The catalogue seam. The local-directory lake implements it now; Rucio later, unchanged callers.

Every method is idempotent: doing it again after a crash is success, and an effect that
already exists (a DID, an attachment, a replica, a rule) is not an error.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from ..core.policy import Replica
from ..transfer.base import Transport


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
    """A place the agent itself writes a copy to, and the transport that writes it."""
    location: str
    url: str
    transport: Transport
    # the pipeline's word, for a first copy resumed after a cut-short upload: the object at `url`
    # is a leftover of that upload (nobody records it), to be replaced
    replace_leftover: bool = False


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

    def copies_state(self, f: LakeFile, ref: str | None) -> str | None:
        """The state of what request_copies asked for: "OK", "REPLICATING", "STUCK", "SUSPENDED"...;
        None where there is no such thing (the agent made every copy)."""
        return None

    @abc.abstractmethod
    def replicas(self, f: LakeFile) -> list[Replica]:
        """The copies the lake holds now (never the buffer's own), with size and adler32 as verified."""

    def recorded_locations(self, scope: str, name: str) -> set[str]:
        """The locations (destinations, RSEs) where the catalogue records a replica of scope:name.
        A copy recorded there is never removed as an unregistered one: someone registered it."""
        return set()

    def release(self, f: LakeFile) -> None:
        """Just before the local file is deleted: drop the lake's record of the buffer copy
        (register-in-place). Idempotent; a record already gone is success."""

    @abc.abstractmethod
    def health(self) -> str | None:
        """None when the lake is usable now, else why not (for /readyz)."""

    def close(self) -> None:
        pass
