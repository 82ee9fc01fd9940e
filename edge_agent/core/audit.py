"""The audit's verdicts, as data: what the ledger, the buffer, the catalogue and the storage
say about one file, and what that means.

Pure: the I/O side (edge_agent/audit.py) gathers the observations, this module only judges.
A file gets one verdict, the worst of its findings, and keeps every finding as evidence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .lifecycle import State
from .policy import normalise_adler32


class Verdict(str, enum.Enum):
    """What an audit concludes about a file, most severe first: a file gets the first that applies."""
    CHECKSUM_MISMATCH = "checksum_mismatch"          # a copy holds other bytes than were registered
    REGISTERED_WITHOUT_FILE = "registered_without_file"  # the catalogue names it, no storage holds it
    MISSING_REPLICA = "missing_replica"              # fewer good copies than the rule asks, or a listed copy is gone
    UNKNOWN_IN_BUFFER = "unknown_in_buffer"          # a data file in a watched tree the ledger does not know
    QUARANTINED = "quarantined"                      # the agent stopped on it; a human must look
    UNVERIFIABLE = "unverifiable"                    # a storage could not be asked now (down, refused)
    IN_FLIGHT = "in_flight"                          # not confirmed yet, and the ledger says why
    OK = "ok"                                        # >= N copies whose storage answers size and adler32

    def __str__(self) -> str:
        return self.value


PROBLEMS = frozenset({Verdict.CHECKSUM_MISMATCH, Verdict.REGISTERED_WITHOUT_FILE, Verdict.MISSING_REPLICA,
                      Verdict.UNKNOWN_IN_BUFFER, Verdict.QUARANTINED, Verdict.UNVERIFIABLE})
_ORDER = list(Verdict)

# Ledger states whose files must already be in the lake with all their copies.
SETTLED = frozenset({State.CONFIRMED, State.DELETED})


@dataclass(frozen=True)
class CopyCheck:
    """One replica: what the catalogue lists, and what its storage answered.

    stored_size None with error None: the storage holds nothing there. error: it could not be asked.
    """
    location: str                 # RSE or destination name
    url: str
    listed_state: str             # the catalogue's state: AVAILABLE, COPYING, ... ("AVAILABLE" for local)
    stored_size: int | None = None
    stored_adler32: str | None = None
    stored_md5: str | None = None  # S3: the ETag of a single-PUT object (S3 knows no adler32)
    error: str | None = None
    checked: bool = True          # False: not asked (not AVAILABLE, or the buffer's own copy)
    is_buffer: bool = False       # register-in-place: the buffer RSE's record of the local file


@dataclass(frozen=True)
class LedgerView:
    """The ledger row of the newest version of a file (what the agent believes)."""
    file_id: int
    rule: str
    relpath: str
    state: State
    size: int | None
    adler32: str | None
    copies: int
    reason: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class CatalogueView:
    """What the lake's catalogue says about one file DID."""
    size: int | None
    adler32: str | None
    copies: tuple[CopyCheck, ...] = ()
    md5: str | None = None


@dataclass(frozen=True)
class Finding:
    """One thing an audit found about a file (at `location`, when it is about one copy)."""
    verdict: Verdict
    detail: str
    location: str | None = None


@dataclass(frozen=True)
class FileAudit:
    """A file's audit: its verdict, the findings behind it, and the copies that count."""
    did: str                      # scope:name, or the buffer path of an unknown file
    verdict: Verdict
    findings: tuple[Finding, ...]
    good_copies: tuple[str, ...] = ()
    ledger: LedgerView | None = None
    path: str | None = None

    @property
    def problem(self) -> bool:
        return self.verdict in PROBLEMS


def _worst(findings: Sequence[Finding]) -> Verdict:
    return min((f.verdict for f in findings), key=_ORDER.index, default=Verdict.OK)


def judge_file(did: str, ledger: LedgerView | None, cat: CatalogueView | None,
               path: str | None = None, history: str | None = None) -> FileAudit:
    """The verdict on one file DID known to the ledger, the catalogue, or both.

    `history`: what the ledger remembers of a DID it no longer works on (a superseded version
    that had registered it), added to the findings so the operator sees where it came from.
    """
    findings: list[Finding] = []
    size = ledger.size if ledger and ledger.size is not None else (cat.size if cat else None)
    adler = normalise_adler32(ledger.adler32 if ledger and ledger.adler32 else (cat.adler32 if cat else None))
    # S3 copies are judged by their ETag against the MD5 the agent computed (recorded in the ledger
    # and registered in the catalogue), as the agent itself does before it counts them
    md5 = ((ledger.md5 if ledger and ledger.md5 else None) or (cat.md5 if cat else None) or "").lower() or None
    wanted = ledger.copies if ledger else 1
    settled = ledger is None or ledger.state in SETTLED
    # a ledger file not yet registered is not expected in the catalogue at all
    expects_catalogue = ledger is None or ledger.state not in (
        State.DISCOVERED, State.COMPLETE, State.HASHED, State.RETRY_WAIT, State.QUARANTINED)

    if cat is None:
        if ledger is not None and expects_catalogue:
            findings.append(Finding(Verdict.MISSING_REPLICA if settled else Verdict.IN_FLIGHT,
                                    f"the lake has no DID {did}, the ledger says {ledger.state.value}"))
        cat = CatalogueView(None, None)
    elif ledger is not None and (cat.size != ledger.size
                                 or normalise_adler32(cat.adler32) != normalise_adler32(ledger.adler32)):
        findings.append(Finding(Verdict.CHECKSUM_MISMATCH,
                                f"the catalogue says {cat.size} bytes adler32 {cat.adler32}, the ledger recorded "
                                f"{ledger.size} bytes adler32 {ledger.adler32}"))

    good: list[str] = []
    holders = 0                   # copies that hold bytes, good or not (the buffer's too)
    unsure = 0                    # copies whose storage could not tell: neither good nor missing
    for c in cat.copies:
        if not c.checked:
            continue
        if c.error is not None:
            findings.append(Finding(Verdict.UNVERIFIABLE, f"cannot ask the storage: {c.error}", c.location))
            holders += 1          # not known to be missing
            unsure += not c.is_buffer
            continue
        if c.stored_size is None:
            if not c.is_buffer or not settled:   # a released buffer copy is gone on purpose
                findings.append(Finding(Verdict.MISSING_REPLICA,
                                        f"listed {c.listed_state} but the storage holds nothing at {c.url}",
                                        c.location))
            continue
        holders += 1
        got = normalise_adler32(c.stored_adler32)
        if c.stored_size != size:
            findings.append(Finding(Verdict.CHECKSUM_MISMATCH,
                                    f"the storage holds {c.stored_size} bytes, {size} expected", c.location))
        elif got is None and c.stored_md5 is not None and md5 is not None:
            if c.stored_md5.lower() != md5:
                findings.append(Finding(Verdict.CHECKSUM_MISMATCH,
                                        f"the storage's ETag {c.stored_md5} is not the MD5 {md5} expected", c.location))
            elif not c.is_buffer:
                good.append(c.location)
        elif got is None:
            findings.append(Finding(Verdict.UNVERIFIABLE, "the storage gives no adler32 (nor an MD5 ETag to compare "
                                    "with a recorded MD5) for this copy", c.location))
            unsure += not c.is_buffer
        elif got != adler:
            findings.append(Finding(Verdict.CHECKSUM_MISMATCH,
                                    f"the storage says adler32 {got}, {adler} expected", c.location))
        elif not c.is_buffer:
            good.append(c.location)

    if cat.copies and holders == 0 and ledger is None:
        findings = [Finding(Verdict.REGISTERED_WITHOUT_FILE,
                            "registered in the lake, but none of its replicas' storage holds any bytes; "
                            "the agent's ledger does not know it")] + [
            f for f in findings if f.verdict is not Verdict.MISSING_REPLICA]
    elif not cat.copies and ledger is None:
        findings.append(Finding(Verdict.REGISTERED_WITHOUT_FILE, "registered in the lake with no replica at all"))
    elif len(good) < wanted:
        if settled and len(good) + unsure >= wanted:
            pass                  # the unverifiable copies already say why
        elif settled:
            findings.append(Finding(Verdict.MISSING_REPLICA,
                                    f"{len(good)} of {wanted} wanted copies are good"
                                    + (f" (the ledger says {ledger.state.value})" if ledger else "")))
        else:
            assert ledger is not None
            findings.append(Finding(Verdict.QUARANTINED if ledger.state is State.QUARANTINED else Verdict.IN_FLIGHT,
                                    f"{ledger.state.value}" + (f": {ledger.reason}" if ledger.reason else "")
                                    + f"; {len(good)} of {wanted} copies so far"))
    if history:
        findings.append(Finding(_worst(findings), history))
    if ledger is not None and ledger.state is State.QUARANTINED and not any(
            f.verdict is Verdict.QUARANTINED for f in findings):
        findings.append(Finding(Verdict.QUARANTINED, f"quarantined: {ledger.reason or 'no reason recorded'}"))
    return FileAudit(did, _worst(findings), tuple(findings), tuple(good), ledger, path)


def judge_unknown(path: str, age_s: float, grace_s: float) -> FileAudit:
    """A data file in a watched tree with no live ledger row. Younger than `grace_s` (the agent's
    rescan period, twice): it has not been seen yet, which is normal."""
    if age_s < grace_s:
        f = Finding(Verdict.IN_FLIGHT, f"arrived {age_s:.0f} s ago; the agent has not picked it up yet")
    else:
        f = Finding(Verdict.UNKNOWN_IN_BUFFER, f"{_age(age_s)} old and not in the ledger (missed, or the agent "
                    "does not run with this state_dir)")
    return FileAudit(path, f.verdict, (f,), path=path)


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600:02d}h{s % 3600 // 60:02d}m" if s >= 86400 else \
        f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


@dataclass
class Report:
    """Every file's audit, and the totals a person or a script reads first."""
    selection: str
    files: list[FileAudit] = field(default_factory=list)

    def add(self, items: Iterable[FileAudit]) -> None:
        self.files.extend(items)

    @property
    def ok(self) -> bool:
        return not any(f.problem for f in self.files)

    def by_verdict(self) -> dict[Verdict, list[FileAudit]]:
        out: dict[Verdict, list[FileAudit]] = {v: [] for v in Verdict}
        for f in sorted(self.files, key=lambda f: f.did):
            out[f.verdict].append(f)
        return out

    def to_json(self) -> dict[str, object]:
        groups = self.by_verdict()
        return {
            "format": "edge-agent-audit/1",   # bumped only when a key changes meaning or goes away
            "selection": self.selection,
            "ok": self.ok,
            "counts": {v.value: len(fs) for v, fs in groups.items()},
            "files": {v.value: [_file_json(f) for f in fs] for v, fs in groups.items()},
        }


def _file_json(f: FileAudit) -> dict[str, object]:
    d: dict[str, object] = {"did": f.did, "verdict": f.verdict.value, "good_copies": list(f.good_copies),
                            "findings": [{"verdict": x.verdict.value, "location": x.location, "detail": x.detail}
                                         for x in f.findings]}
    if f.path:
        d["path"] = f.path
    if f.ledger:
        d["ledger"] = {"id": f.ledger.file_id, "rule": f.ledger.rule, "state": f.ledger.state.value,
                       "relpath": f.ledger.relpath}
    return d


HEADINGS = {
    Verdict.CHECKSUM_MISMATCH: "CHECKSUM MISMATCH: a copy holds other bytes than the ledger recorded",
    Verdict.REGISTERED_WITHOUT_FILE: "REGISTERED WITHOUT A FILE: the lake names it, no storage holds it",
    Verdict.MISSING_REPLICA: "MISSING REPLICA: fewer good copies than wanted, or a listed copy is gone",
    Verdict.UNKNOWN_IN_BUFFER: "UNKNOWN IN THE BUFFER: data files the ledger does not know",
    Verdict.QUARANTINED: "QUARANTINED: the agent holds these back until a human looks (edge-agent retry)",
    Verdict.UNVERIFIABLE: "UNVERIFIABLE NOW: a storage did not answer; run the audit again later",
    Verdict.IN_FLIGHT: "in flight (explained by the ledger)",
    Verdict.OK: "confirmed",
}


def render(report: Report, verbose: bool = False, limit: int = 50) -> str:
    """The report a person reads at 3 a.m.: the verdict first, then each problem with its evidence."""
    groups = report.by_verdict()
    n = len(report.files)
    bad = sum(len(fs) for v, fs in groups.items() if v in PROBLEMS)
    out = [f"edge-agent audit of {report.selection}: {n} files",
           ("ALL WELL" if report.ok else f"PROBLEMS: {bad} of {n} files need attention"),
           "  " + ", ".join(f"{len(fs)} {v.value}" for v, fs in groups.items() if fs) if n else "  (nothing selected)"]
    for v in _ORDER:
        fs = groups[v]
        if not fs or (v in (Verdict.OK, Verdict.IN_FLIGHT) and not verbose):
            continue
        out.append("")
        out.append(f"{HEADINGS[v]} ({len(fs)})")
        for f in fs[:limit]:
            where = f"  [ledger #{f.ledger.file_id} {f.ledger.relpath}, {f.ledger.state.value}]" if f.ledger else ""
            out.append(f"  {f.did}{where}")
            for x in f.findings:
                out.append(f"      {x.location + ': ' if x.location else ''}{x.detail}")
        if len(fs) > limit:
            out.append(f"  ... and {len(fs) - limit} more (--json lists all)")
    return "\n".join(out)
