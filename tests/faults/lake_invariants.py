"""After a fault scenario against the real lake (Rucio + XRootD): was anything lost, half-done or unexplained?

The Rucio twin of local_invariants.py, with the same shape and without the agent's own code:
it compares a manifest the test wrote while it made each file, the buffer directory, the
ledger (read only, plain SQLite), Rucio (its REST API, through tests/lake.Lake) and the
storage behind the lake RSEs (XRootD's data directory on disk, Lake.local_path).

  - every file that left the buffer: a ledger row says it was deleted, Rucio lists its DID with
    the size and adler32 it was written with, and >= N replicas off the buffer RSE are AVAILABLE
    AND hold exactly its bytes on the storage (a listed replica is never taken on trust);
  - every file still in the buffer is unchanged and the ledger explains it (a live row; a
    quarantine or retry with its reason; or a notice; or, while unsettled, no row yet: the agent
    has not seen it), and no row says it was deleted;
  - nothing half-registered once the scenario has settled: no row stuck between hashing and
    confirmation; no DID of this run that the ledger does not know, that has no replica off the
    buffer, a replica in any state but AVAILABLE (a COPYING one left behind) or no rule; no object
    of this run on the lake's storage that is not an AVAILABLE replica (a partial upload).

"Of this run": DID names start with `prefix` (the test's name_template puts a unique tag there).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Any

from tests.faults.local_invariants import FINAL, Manifest, _ledger_rows, _notices, explained

BATCH = 100        # DIDs per list_replicas call (Rucio on SQLite refuses very large ones)


def digest_of(data: bytes) -> tuple[int, str, str]:
    """(size, adler32, sha256): what 'exactly those bytes' is compared by."""
    return len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}", hashlib.sha256(data).hexdigest()


def _on_disk(path: Path | bytes) -> tuple[int, str, str] | None:
    try:
        with open(path, "rb") as fh:
            return digest_of(fh.read())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _expected(manifest: Manifest, rel: bytes) -> tuple[int, str, str | None]:
    size, adler = manifest.files[rel]
    return size, adler, manifest.digests.get(rel)


def _same(got: tuple[int, str, str] | None, want: tuple[int, str, str | None]) -> bool:
    return got is not None and got[:2] == want[:2] and (want[2] is None or got[2] == want[2])


def _shown(got: tuple[int, str, str] | None) -> str:
    return "nothing" if got is None else f"{got[0]} bytes, adler32 {got[1]}"


def list_replicas(lake: Any, scope: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: Rucio's replica row (bytes, adler32, states, rses)} for every name Rucio knows."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(names), BATCH):
        r = lake.call("POST", "/replicas/list", {"dids": [{"scope": scope, "name": n} for n in names[i:i + BATCH]],
                                                 "all_states": True, "schemes": ["http"]})
        out.update({row["name"]: row for row in lake.lines(r)})
    return out


def run_dids(lake: Any, scope: str, prefix: str) -> set[str]:
    """The file DIDs of this run that Rucio holds."""
    r = lake.call("GET", f"/dids/{scope}/dids/search?type=file&name={prefix}*")
    return {row if isinstance(row, str) else row["name"] for row in lake.lines(r)}


def ruled_dids(lake: Any, scope: str, prefix: str) -> set[str]:
    """Names of this run's DIDs that some replication rule covers: a rule on the file itself, or a
    lock of a rule made on a batch's dataset (rule_per = "batch": `<dataset>.rule-<digest>`)."""
    r = lake.call("GET", f"/rules/?scope={scope}")
    out = set()
    for x in lake.lines(r):
        name = str(x.get("name", ""))
        if name.startswith(prefix):
            out.add(name)
        if x.get("did_type") != "FILE" and ".rule-" in name:
            locks = lake.lines(lake.call("GET", f"/rules/{x['id']}/locks"))
            out |= {str(lock["name"]) for lock in locks if str(lock.get("name", "")).startswith(prefix)}
    return out


def _pfn_path(lake: Any, row: dict[str, Any], rse: str) -> Path | None:
    pfns = (row.get("rses") or {}).get(rse) or []
    http = [p for p in pfns if p.startswith("http")]
    return lake.local_path(http[0]) if http else None


def copy_problems(lake: Any, show: str, row: dict[str, Any] | None, want: tuple[int, str, str | None],
                  copies: int, buffer_rse: str | None = None) -> list[str]:
    """Is this file fully in the lake: its DID with the right size and adler32, and >= `copies`
    AVAILABLE replicas off the buffer whose storage holds exactly its bytes?"""
    if not row:
        return [f"{show}: left the buffer but Rucio does not know its DID"]
    problems = []
    if (row.get("bytes"), row.get("adler32")) != want[:2]:
        problems.append(f"{show}: Rucio has {row.get('bytes')} bytes, adler32 {row.get('adler32')}; it was written "
                        f"as {want[0]} bytes, adler32 {want[1]}")
    good = []
    for rse, state in sorted((row.get("states") or {}).items()):
        if rse == buffer_rse or state != "AVAILABLE":
            continue
        where = _pfn_path(lake, row, rse)
        got = _on_disk(where) if where else None
        if _same(got, want):
            good.append(rse)
        else:
            problems.append(f"{show}: replica on {rse} is AVAILABLE but its storage holds {_shown(got)} "
                            f"({where}), not the bytes written ({want[0]} bytes, adler32 {want[1]})")
    if len(good) < copies:
        problems.append(f"{show}: deleted locally with {len(good)} good copies of {copies} ({good}; Rucio states "
                        f"{row.get('states')})")
    return problems


def check(manifest: Manifest, ledger: Path | tuple[str, str], lake: Any, prefix: str, copies: int, settled: bool = True,
          buffer_rse: str | None = None, rses: list[str] | None = None) -> list[str]:
    """Every broken invariant, as a sentence; [] when all hold. `settled`: nothing may be in flight.

    `lake` is a tests/lake.Lake; `rses` are the lake RSEs whose storage is searched for this
    run's leftovers (default: all of them); `buffer_rse` replicas never count as copies."""
    problems: list[str] = []
    scope = lake.scope
    root = os.fsencode(manifest.root)
    rows = _ledger_rows(ledger)
    notices = _notices(ledger)
    by_path: dict[bytes, list[sqlite3.Row]] = {}
    for r in rows:
        by_path.setdefault(bytes(r["path"]), []).append(r)

    gone: dict[bytes, sqlite3.Row] = {}
    for rel in manifest.files:
        path = os.path.join(root, rel)
        show = rel.decode("utf-8", "backslashreplace")
        want = _expected(manifest, rel)
        versions = by_path.get(path, [])
        if rel in manifest.removed:
            live = [r for r in versions if r["state"] not in FINAL]
            if live and live[-1]["state"] != "quarantined":
                problems.append(f"{show}: removed by someone else, but its row {live[-1]['id']} is still "
                                f"{live[-1]['state']}")
            continue
        here = _on_disk(path)
        if here is None:
            deleted = [r for r in versions if r["state"] == "deleted"]
            if not deleted and not settled:
                # killed between the unlink and its record: the restart records it (the step in
                # flight). Deletion follows confirmation, so the lake must hold the copies already
                deleted = [r for r in versions if r["state"] == "confirmed"]
            if not deleted:
                problems.append(f"{show}: left the buffer but no ledger row says it was deleted "
                                f"(rows: {[r['state'] for r in versions]})")
            else:
                gone[rel] = deleted[-1]
            continue
        if not _same(here, want):
            problems.append(f"{show}: the buffer copy changed ({_shown(here)}, written as {want[0]} bytes, "
                            f"adler32 {want[1]})")
        st = os.stat(path)
        for r in versions:
            if r["state"] == "deleted" and r["inode"] == st.st_ino and r["size"] == st.st_size:
                problems.append(f"{show}: the ledger says deleted (row {r['id']}), but the file is still in the buffer")
        if not versions and not settled:
            continue        # written while the agent was down: not seen yet, which is no fault
        problems += explained(show, path, versions, notices, settled)

    listed = list_replicas(lake, scope, sorted({r["name"] for r in gone.values() if r["name"]}))
    for rel, r in gone.items():
        show = rel.decode("utf-8", "backslashreplace")
        problems += copy_problems(lake, show, listed.get(r["name"]), _expected(manifest, rel), copies, buffer_rse)

    if settled:
        problems += _half_registered(lake, rows, prefix, buffer_rse, rses or list(lake.lake_rses))
    return problems


def _half_registered(lake: Any, rows: list[sqlite3.Row], prefix: str, buffer_rse: str | None,
                     rses: list[str]) -> list[str]:
    """This run's DIDs and storage objects that a finished scenario must not leave behind."""
    problems: list[str] = []
    scope = lake.scope
    known = {r["name"] for r in rows if r["name"]}
    dids = run_dids(lake, scope, prefix)
    listed = list_replicas(lake, scope, sorted(dids))
    ruled = ruled_dids(lake, scope, prefix)
    replicas_at: dict[str, dict[Path, str]] = {rse: {} for rse in rses}
    for name in sorted(dids):
        row = listed.get(name) or {}
        states = row.get("states") or {}
        if name not in known:
            problems.append(f"Rucio has {scope}:{name}, which no ledger row knows (orphan registration)")
        if not [rse for rse in states if rse != buffer_rse]:
            problems.append(f"{scope}:{name} has no replica on a lake RSE (half-registered: {states})")
        for rse, state in sorted(states.items()):
            if state != "AVAILABLE":
                problems.append(f"{scope}:{name} has a {state} replica on {rse} left behind")
            where = _pfn_path(lake, row, rse)
            if where is not None and rse in replicas_at and state == "AVAILABLE":
                replicas_at[rse][where] = name
        if states and name not in ruled:
            problems.append(f"{scope}:{name} has replicas but no replication rule")
    for rse in rses:
        # where this RSE keeps the scope: lfn2pfn's hash layout is <prefix>/<scope>/xx/yy/<name>
        top = lake.local_path(lake.pfn(rse, scope, prefix + "probe")).parents[2]
        for dirpath, _dirs, names in os.walk(top):
            for n in names:
                p = Path(dirpath) / n
                if prefix in n and p not in replicas_at[rse]:
                    problems.append(f"{rse}: an object of this run that is no AVAILABLE replica (a partial or "
                                    f"temporary upload?): {p}")
    return problems
