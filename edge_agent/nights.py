"""Night close-out, the shell around core/nights.py: every few minutes (the runner's `nights` job)
each open night of a rule with close_nights is judged on the ledger's rows; a night whose files are
all accounted for once its grace period is over is closed:

    open --(mark, in the ledger)--> closing --(manifest written, uploaded, registered, attached,
          its rule asked; dataset closed in the lake)--> closed, with its verdict

Each lake call is idempotent and the manifest's bytes are kept in the state dir before the first
of them: a crash anywhere is finished by the next run with the same manifest. The mark comes first
and the hashing step's move refuses a file into a night not open (nightbook.NightClosed) in the
same ledger lock: no file enters a night after its close-out has read its files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from .core import nights as core
from .core import policy
from .core.lifecycle import State
from .errors import EdgeAgentError, PermanentError
from .hashing import hash_stream
from .lake.base import Catalogue, LakeFile, Records, UnknownDid
from .ledger import FileRecord, Ledger
from .localfs import LocalFile
from .nightbook import CLOSED, CLOSING, OPEN
from .settings import DeletePolicy, RuleSettings, Settings
from .transfer.base import Expected
from .transfer.registry import Transports

log = structlog.get_logger("edge_agent.nights")

# late datasets looked for past a closed night (".late" ... ".late50"): more is a DAQ clock gone wrong
LATE_TRIES = 50


def entered(rule: RuleSettings, night: str) -> tuple[str, float] | None:
    """What the hashing move records of a file's night (the night and its end), where the rule
    closes nights; None where it does not (the move then checks nothing)."""
    if not rule.close_nights:
        return None
    return night, core.night_end(night, rule.night_rollover_hour, rule.tz)


def refiled_if_late(batch: Sequence[FileRecord], settings: Settings, ledger: Ledger) -> list[FileRecord]:
    """The versions of `batch`, those whose night was closed before they were registered (retried by
    an operator after the close-out, say) moved to their night's late dataset first: a closed
    dataset takes no attachment, and the file would be quarantined again at every retry."""
    out: list[FileRecord] = []
    states: dict[tuple[str, str], str] = {}
    for rec in batch:
        rule = settings.rules.get(rec.rule)
        if rule is None or not rule.close_nights or not rec.dataset or rec.mtime_ns is None:
            out.append(rec)
            continue
        key = (rec.rule, rec.dataset)
        if key not in states:
            states[key] = ledger.night_states(rec.rule, [rec.dataset]).get(rec.dataset, OPEN)
        if states[key] == OPEN:
            out.append(rec)
            continue
        night = policy.naming_fields(rec.relpath, rec.mtime_ns / 1e9, rec.rule, rule.night_rollover_hour,
                                     rule.tz)["night"]
        late = late_for(ledger, rec.rule, rec.dataset)
        if ledger.refile_late(rec.id, rec.dataset, late, (night, core.night_end(night, rule.night_rollover_hour,
                                                                                 rule.tz))):
            log.warning("late file: its night was closed before it was registered; it goes to a dataset of "
                        "its own", file_id=rec.id, rule=rec.rule, path=rec.relpath, night=rec.dataset, dataset=late)
        out.append(ledger.get(rec.id))
    return out


def late_for(ledger: Ledger, rule: str, dataset: str) -> str:
    """The dataset a late file of night `dataset` goes to: the first late one still open."""
    candidates = [f"{dataset}{core.LATE}{n if n > 1 else ''}" for n in range(1, LATE_TRIES + 1)]
    states = ledger.night_states(rule, candidates)
    return core.late_dataset(dataset, {name for name, state in states.items() if state != OPEN})


def night_file(rec: FileRecord, successor: State | None, replicas: tuple[tuple[str, str], ...] = ()) -> core.NightFile:
    return core.NightFile(id=rec.id, relpath=rec.relpath, version=rec.version, state=rec.state, size=rec.size,
                          did=rec.did if rec.name else None, adler32=rec.adler32, blake3=rec.blake3,
                          confirmed_at=rec.confirmed_at, reason=rec.reason, replicas=replicas,
                          mtime=rec.mtime_ns / 1e9 if rec.mtime_ns is not None else None, successor=successor)


@dataclass
class CloseOut:
    """The close-out job: `run()` looks at every open night once."""
    settings: Settings
    ledger: Ledger
    catalogue: Catalogue
    transports: Transports
    clock: Callable[[], float] = time.time

    def manifest_path(self, rule: str, dataset: str) -> Path:
        """Where a night's manifest is kept before (and after) it goes to the lake."""
        return Path(self.settings.state_dir) / "nights" / quote(rule, safe="") / (
            quote(dataset, safe="") + core.MANIFEST_SUFFIX)

    def run(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every unclosed night of every rule with close_nights looked at; returns what was done
        ({rule, dataset, outcome, ...}) for the nights closed or failing."""
        now = self.clock() if now is None else now
        done: list[dict[str, Any]] = []
        for name, rule in self.settings.rules.items():
            if not rule.close_nights:
                continue
            waiting = self._unhashed(name, rule)
            for night in self.ledger.unclosed_nights(name):
                try:
                    outcome = self._look(name, rule, night, waiting.get(night["dataset"], []), now)
                except EdgeAgentError as exc:
                    log.warning("night close-out failed; tried again later", rule=name, dataset=night["dataset"],
                                error=str(exc), retryable=not isinstance(exc, PermanentError))
                    done.append({"rule": name, "dataset": night["dataset"], "outcome": "failed", "error": str(exc)})
                    continue
                if outcome:
                    done.append({"rule": name, "dataset": night["dataset"], **outcome})
        return done

    def _unhashed(self, name: str, rule: RuleSettings) -> dict[str, list[tuple[FileRecord, State | None]]]:
        """The versions not hashed yet (so without a dataset), by the night their mtime puts them in
        (its late dataset if that night is closed): a file stuck before hashing holds its night
        open, or makes it incomplete. Their nights are recorded open."""
        assert rule.dataset_template
        by_dataset: dict[str, list[tuple[FileRecord, State | None]]] = {}
        nights: dict[str, str] = {}
        for rec, successor in self.ledger.night_files(name, None):
            if rec.mtime_ns is None:
                continue
            fields = policy.naming_fields(rec.relpath, rec.mtime_ns / 1e9, name, rule.night_rollover_hour, rule.tz)
            dataset = policy.render(rule.dataset_template, fields)
            nights[dataset] = fields["night"]
            by_dataset.setdefault(dataset, []).append((rec, successor))
        states = self.ledger.night_states(name, list(by_dataset))
        out: dict[str, list[tuple[FileRecord, State | None]]] = {}
        for dataset, rows in by_dataset.items():
            if states.get(dataset, OPEN) != OPEN:
                # a quarantined one that ended before its night (or the night's last late dataset) was
                # closed is in that one's manifest: filed once, not in a new late dataset at each run
                closed_at = self._last_closed(name, dataset)
                rows = [(rec, succ) for rec, succ in rows if not (
                    rec.state is State.QUARANTINED and closed_at is not None and rec.updated_at <= closed_at)]
                if not rows:
                    continue
                late = late_for(self.ledger, name, dataset)
                nights[late] = nights[dataset]
                dataset = late
            if dataset not in states:
                self.ledger.add_night(name, dataset, nights[dataset],
                                      core.night_end(nights[dataset], rule.night_rollover_hour, rule.tz))
            out.setdefault(dataset, []).extend(rows)
        return out

    def _last_closed(self, name: str, dataset: str) -> float | None:
        """When the night `dataset` or the last of its late datasets was closed (None: never)."""
        names = [dataset] + [f"{dataset}{core.LATE}{n if n > 1 else ''}" for n in range(1, LATE_TRIES + 1)]
        times = [t for t in (self.ledger.night_closed_at(name, d) for d in names) if t is not None]
        return max(times) if times else None

    def _decide(self, name: str, rule: RuleSettings, night: dict[str, Any],
                waiting: list[tuple[FileRecord, State | None]], now: float) -> tuple[core.Decision, list[core.NightFile]]:
        rows = self.ledger.night_files(name, night["dataset"]) + waiting
        files = [night_file(rec, succ) for rec, succ in rows]
        keeps = rule.delete is not DeletePolicy.AFTER_CONFIRM or self.settings.dry_run
        return core.decide(files, night["ends_at"], now, rule.night_grace_hours * 3600,
                           rule.night_deadline_hours * 3600, confirmed_is_final=keeps), files

    def _look(self, name: str, rule: RuleSettings, night: dict[str, Any],
              waiting: list[tuple[FileRecord, State | None]], now: float) -> dict[str, Any] | None:
        dataset = night["dataset"]
        path = self.manifest_path(name, dataset)
        if night["state"] == CLOSING and path.exists():
            return self._deliver(name, rule, dataset, path, now)     # a close-out cut short: finished
        decision, _ = self._decide(name, rule, night, waiting, now)
        if not decision.close:
            log.debug("night not closed yet", rule=name, dataset=dataset, waiting=decision.waiting,
                      overdue=decision.overdue)
            return None
        if night["state"] == OPEN and not self.ledger.set_night(name, dataset, OPEN, CLOSING):
            return None
        # read again under the mark: a version hashed into the night before it is in these rows
        decision, files = self._decide(name, rule, {**night, "state": CLOSING}, waiting, now)
        if not decision.close:
            self.ledger.set_night(name, dataset, CLOSING, OPEN)
            return None
        files = self._with_replicas(files)
        doc = core.manifest(name, rule.scope, dataset, night.get("night"), files, decision, now)
        _write_atomically(path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
        return self._deliver(name, rule, dataset, path, now)

    def _with_replicas(self, files: list[core.NightFile]) -> list[core.NightFile]:
        """Each file's replicas as the lake lists them now (the manifest says what the lake holds)."""
        if not isinstance(self.catalogue, Records):
            return files
        dids = [tuple(f.did.split(":", 1)) for f in files if f.did and f.state is not State.SUPERSEDED]
        listed = self.catalogue.lookup(dids) if dids else {}   # type: ignore[arg-type]
        out = []
        for f in files:
            got = listed.get(tuple(f.did.split(":", 1))) if f.did else None   # type: ignore[call-overload]
            if got is not None:
                reps = tuple((r.location, r.urls[0] if r.urls else "") for r in got.replicas if r.state == "AVAILABLE")
                f = dataclasses.replace(f, replicas=reps)
            out.append(f)
        return out

    def _deliver(self, name: str, rule: RuleSettings, dataset: str, path: Path, now: float) -> dict[str, Any]:
        """The manifest at `path` into the lake (registered in the night's dataset, copied to the
        rule's destinations, its copies asked for), the dataset closed, the night recorded closed."""
        with open(path, "rb") as fh:
            d = hash_stream(fh)
        doc = json.loads(path.read_bytes())
        mname = dataset + core.MANIFEST_SUFFIX
        problem = policy.name_problem(mname, self.catalogue.name_pattern)
        if problem:
            raise PermanentError(f"the manifest's name: {problem}")
        f = LakeFile(rule=name, scope=rule.scope, name=mname, dataset=dataset, size=d.size, adler32=d.adler32,
                     md5=None, blake3=d.blake3, copies=rule.copies, destinations=tuple(rule.destinations),
                     local_path=str(path), metadata={})
        self._name_is_the_manifests(rule.scope, mname, d.size, d.adler32)
        # attached already (a close-out cut short after the dataset was closed: Rucio refuses any
        # attachment to a closed dataset, even one it holds): its registration is done
        if not self._attached(rule.scope, dataset, mname):
            self.catalogue.register(f)
        for t in self.catalogue.targets(f):
            # the name is the close-out's own: a copy cut short by a crash is replaced
            self.transports.for_url(t.url).put(LocalFile.beside(path), t.url,
                                               Expected(d.size, d.blake3, d.adler32, may_replace=True,
                                                        known_writer=True), lambda n: None)
            self.catalogue.add_replica(f, t.location, t.url)
        self.catalogue.request_copies(f)
        self.catalogue.close_dataset(rule.scope, dataset)
        if not self.ledger.set_night(name, dataset, CLOSING, CLOSED, verdict=doc["verdict"], reasons=doc["reasons"],
                                     files=doc["files"], bytes=doc["bytes"], manifest=f.did, closed_at=now):
            log.warning("night recorded closed by someone else meanwhile", rule=name, dataset=dataset)
            return {"outcome": "closed elsewhere"}
        (log.warning if doc["verdict"] != core.Verdict.COMPLETE else log.info)(
            "night closed", rule=name, dataset=dataset, verdict=doc["verdict"], files=doc["files"],
            reasons=doc["reasons"][:10], manifest=f.did, late_of=doc.get("late_of"))
        return {"outcome": "closed", "verdict": doc["verdict"], "manifest": f.did}


    def _name_is_the_manifests(self, scope: str, name: str, size: int, adler32: str) -> None:
        """PermanentError when the lake holds `scope:name` with other bytes than the manifest's: a DAQ
        file that rendered that very name (`<dataset>.manifest.json`). Its copies are never written
        over (they may be all that is left of it); the night stays to be closed, and says why."""
        if not isinstance(self.catalogue, Records):
            return
        held = self.catalogue.lookup([(scope, name)]).get((scope, name))
        if held is not None and (held.size, held.adler32) != (size, adler32):
            raise PermanentError(f"{scope}:{name}, the night's manifest's name, is a file of the lake with other "
                                 "bytes (a data file of that name?): its copies are never replaced; rename the "
                                 "dataset_template's nights or that file's name, the night stays open meanwhile")

    def _attached(self, scope: str, dataset: str, name: str) -> bool:
        if not isinstance(self.catalogue, Records):
            return False
        try:
            return any(x.name == name for x in self.catalogue.dataset_files(scope, dataset))
        except UnknownDid:
            return False        # a night of files none of which was registered: no dataset yet


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def overdue(night: dict[str, Any], rule: RuleSettings, now: float) -> bool:
    """Is this night (a row of the book) past its deadline without being closed?"""
    return night["state"] != CLOSED and night.get("ends_at") is not None and \
        core.is_overdue(night["ends_at"], rule.night_deadline_hours * 3600, now)
