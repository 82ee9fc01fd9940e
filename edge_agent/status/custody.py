"""What the ledger knows of one path's custody (`GET /custody?path=...`, `edge-agent custody PATH`):
every version of the file it has seen there, each with its state, DID, checksums, the replicas that
confirmed it, when it was confirmed and deleted, and why it ended or waits. The ledger's current
state, read through its (rule, path, version) index: a few rows per question, whatever its size."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..core.lifecycle import Event, State
from ..core.receipts import iso
from ..ledger import FileRecord, Ledger, display_path
from ..receipts import place
from ..settings import RuleSettings, Settings

# the versions of one path answered at most (the newest); a path rewritten more often says so
MAX_VERSIONS = 100


def candidates(rules: Mapping[str, RuleSettings], path: bytes) -> list[tuple[str, bytes]]:
    """(rule, absolute path) pairs the ledger may know `path` by: an absolute path under the rule
    whose directory holds it; a relative one under every rule's directory. Nothing leaves a rule's
    directory ('..')."""
    p = os.path.normpath(path)
    if os.path.isabs(p):
        return [(name, p) for name, r in rules.items() if below(p, os.fsencode(r.directory))]
    if p == b"." or p == b".." or p.startswith(b"../"):
        return []
    return [(name, os.path.join(os.fsencode(r.directory), p)) for name, r in rules.items()]


def below(path: bytes, root: bytes) -> bool:
    """Is `path` (normalised) inside the directory `root`?"""
    root = os.path.normpath(root)
    return path.startswith(root.rstrip(b"/") + b"/")


def answer(settings: Settings, ledger: Ledger, path: bytes | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON document) for the question about `path` (None or empty: not asked):
    200 with every version known, 404 when the ledger knows no file there, 400 without a path."""
    if not path:
        return 400, {"error": "missing parameter: path", "usage": "/custody?path=ABSOLUTE_OR_RULE_RELATIVE_PATH"}
    files = []
    for rule, abspath in candidates(settings.rules, path):
        recs = ledger.versions(rule, abspath, MAX_VERSIONS)
        if recs:
            files.append(_file(settings.rules[rule], rule, abspath, recs, ledger))
    if not files:
        return 404, {"error": "no file at this path in the ledger", "path": display_path(path),
                     "rules": {n: str(r.directory) for n, r in settings.rules.items()}}
    return 200, {"path": display_path(path), "files": files}


def _file(rule: RuleSettings, name: str, path: bytes, recs: list[FileRecord], ledger: Ledger) -> dict[str, Any]:
    doc: dict[str, Any] = {"rule": name, "path": display_path(path), "relpath": recs[-1].relpath,
                           "versions": [_version(rec, rule, ledger) for rec in recs]}
    if len(recs) == MAX_VERSIONS:
        doc["only_newest"] = MAX_VERSIONS
    if rule.receipts != "none":
        target = place(rule.receipts, rule.directory, rule.receipts_directory, path)
        try:
            present = target.lstat() is not None
        except OSError:        # a symlink on the way: not ours to follow
            present = False
        doc["receipt"] = {"path": display_path(target.path), "present": present}
    return doc


def _version(rec: FileRecord, rule: RuleSettings, ledger: Ledger) -> dict[str, Any]:
    evidence = _evidence(ledger.history(rec.id))
    return {
        "file_id": rec.id, "version": rec.version, "state": rec.state.value,
        # a wait (retry, quarantine) says which step it waits to go back to
        "waiting_to_resume": rec.resume_state.value if rec.resume_state else None,
        "reason": rec.reason,
        "did": rec.did if rec.scope and rec.name else None,
        "dataset": f"{rec.scope}:{rec.dataset}" if rec.scope and rec.dataset else None,
        "size": rec.size, "mtime_ns": rec.mtime_ns,
        "adler32": rec.adler32, "md5": rec.md5, "blake3": rec.blake3,
        "copies_required": rule.copies,
        # the lake's replicas that confirmed the version (at its deletion, with their URLs)
        "replicas": evidence.get("replicas", []),
        "evidence_from": evidence.get("event"),
        "receipt": evidence.get("receipt"),
        # what the agent itself wrote, as it recorded it
        "copies_written": [{k: r[k] for k in ("location", "url", "size", "adler32", "state")}
                           for r in ledger.replicas(rec.id)],
        "first_seen": iso(rec.first_seen), "confirmed_at": iso(rec.confirmed_at),
        "deleted_at": iso(rec.deleted_at), "updated_at": iso(rec.updated_at),
    }


def _evidence(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The replicas of the version's last confirmation or deletion, from its history."""
    for h in reversed(history):
        if h["event"] in (Event.DELETED.value, Event.CONFIRMED.value) and h["detail"]:
            d = h["detail"]
            reps = [{k: r.get(k) for k in ("location", "url", "size", "adler32")} for r in d.get("replicas", [])]
            return {"event": h["event"], "replicas": reps, "receipt": d.get("receipt")}
        if h["to_state"] == State.RETRY_WAIT.value and h["event"] == Event.REWRITE_COPIES.value:
            return {}          # copies being written again: the earlier evidence no longer stands
    return {}
