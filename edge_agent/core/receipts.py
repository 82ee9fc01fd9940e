"""Custody receipts, pure: when the delete step writes one, its name, and its content.

A receipt tells a DAQ's software, without our logs, that one version of one file is safe in the
lake: its DID and checksums, the N verified replicas that confirmed it and when. It is written
before the local file may go (never after), so its meaning is "safe in the lake", not "deleted".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .policy import Replica

SCHEMA = 1
SUFFIX = b".receipt"
NAME_MAX = 255            # bytes in a file name (ext4, xfs, tmpfs)
_KEEP = 200               # bytes of a long name kept before its digest

# what the rule does with the local file once the receipt is written
TO_DELETE = "to_delete"   # the agent deletes it right after (or it is gone already)
KEPT = "kept"             # it stays: delete = "never", a "keep" period running, or a dry run


def receipt_name(name: bytes) -> bytes:
    """The receipt's file name for a data file named `name`: `name.receipt`, or, where that would
    pass the 255-byte limit of a file name, the first 200 bytes of `name`, a dot, 16 hex digits of
    its blake2b and `.receipt` (the receipt's `path` field names the file whole)."""
    if len(name) + len(SUFFIX) <= NAME_MAX:
        return name + SUFFIX
    return name[:_KEEP] + b"." + hashlib.blake2b(name, digest_size=8).hexdigest().encode() + SUFFIX


def is_receipt_name(name: str | bytes) -> bool:
    """Is this a name receipt_name() gives (what the watcher of a rule with receipts beside its files skips)?"""
    return (name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name).endswith(SUFFIX)


def due(verdict: str, confirmed: int, copies: int, delete_policy: str, dry_run: bool) -> bool:
    """Does the delete step write the version's receipt now, on `verdict` (policy.deletion_verdict,
    after the open-writer check)? Only once the lake holds the N verified replicas: right before the
    local file is unlinked ("delete"), for a file found gone after confirmation ("gone": a crash
    after the unlink, or someone else removed it), and for one the rule keeps ("keep", or "wait"
    out a keep period): a DAQ wants to know a file is safe as soon as it is. Never for a file that
    changed, nor one held back by a writer that still has it open (it may yet change)."""
    if confirmed < copies:
        return False
    if verdict in ("delete", "gone"):
        return True
    return verdict in ("keep", "wait") and (delete_policy != "after_confirm" or dry_run)


def iso(t: float | None) -> str | None:
    """A wall-clock time as ISO 8601 in UTC, to the microsecond: 2026-12-07T13:45:12.123456Z."""
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Version:
    """What the ledger knows of the version a receipt is about (plain values)."""
    file_id: int
    version: int
    rule: str
    relpath: str               # for people: undecodable bytes shown as \\x escapes
    path: bytes                # the absolute path as the filesystem has it
    scope: str
    name: str
    dataset: str | None
    size: int
    mtime_ns: int | None
    adler32: str
    md5: str | None
    blake3: str
    confirmed_at: float | None


def document(v: Version, replicas: Sequence[Replica], copies: int, local_copy: str, written_at: float,
             host: str, agent_id: str | None, agent_version: str) -> dict[str, Any]:
    """The receipt as plain data (see docs/configuration.md, "Custody receipts"). Replicas are listed
    by location, so the same evidence always reads the same."""
    path_text = v.path.decode("utf-8", "backslashreplace")
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "confirmed",
        "rule": v.rule,
        "relpath": v.relpath,
        "path": path_text,
        "did": f"{v.scope}:{v.name}",
        "dataset": f"{v.scope}:{v.dataset}" if v.dataset else None,
        "size": v.size,
        "mtime_ns": v.mtime_ns,
        "adler32": v.adler32,
        "md5": v.md5,
        "blake3": v.blake3,
        "copies_required": copies,
        "replicas": [{"location": r.location, "url": r.url or None, "size": r.size, "adler32": r.adler32,
                      "state": "AVAILABLE" if r.available else "UNAVAILABLE",
                      "checksum_from": "catalogue" if r.adler32_from_catalogue else "storage"}
                     for r in sorted(replicas, key=lambda r: r.location)],
        "confirmed_at": iso(v.confirmed_at),
        "local_copy": local_copy,
        "written_at": iso(written_at),
        "agent": {"host": host, "agent_id": agent_id, "version": agent_version},
        "file": {"id": v.file_id, "version": v.version},
    }
    if path_text != v.path.decode("utf-8", "surrogateescape"):
        # not UTF-8: the bytes themselves, for a program that must find the file by its real name
        doc["path_hex"] = v.path.hex()
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    """The receipt as its file holds it: JSON (ASCII), one key a line, a newline at the end."""
    return json.dumps(doc, indent=2, ensure_ascii=True).encode() + b"\n"


def is_receipt(old: bytes) -> bool:
    """Is `old` (a file's content) a receipt an agent wrote? Only such a file is ever replaced: a
    DAQ's own file that happens to carry the receipt's name is data, never written over."""
    try:
        doc = json.loads(old)
    except ValueError:
        return False
    return (isinstance(doc, dict) and isinstance(doc.get("schema"), int) and doc.get("status") == "confirmed"
            and isinstance(doc.get("file"), dict) and "did" in doc and "blake3" in doc)


def same(old: bytes | None, new: dict[str, Any]) -> bool:
    """Does the receipt file content `old` say what `new` says, but for when and by whom it was written?
    Then it stands: a step repeated after a crash writes nothing new."""
    if old is None:
        return False
    try:
        doc = json.loads(old)
    except ValueError:
        return False
    transient = ("written_at", "agent")
    return isinstance(doc, dict) and ({k: v for k, v in doc.items() if k not in transient}
                                      == {k: v for k, v in new.items() if k not in transient})
