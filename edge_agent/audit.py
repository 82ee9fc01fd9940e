"""`edge-agent audit`: compare the ledger, the buffer, the lake's catalogue and its storage.

Read-only by construction: the ledger and the local catalogue are opened read-only, the lake is
only listed and its storage only asked for size and checksum (or read, with deep=True). The
verdicts come from core/audit.py; this module gathers what they are made of.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from .core import audit as core
from .core import policy
from .core.lifecycle import State
from .errors import ConfigError, EdgeAgentError
from .lake.base import ListedFile, Records, UnknownDid
from .ledger import FileRecord, Ledger
from .settings import RuleSettings, Settings
from .transfer.base import RemoteStat
from .urls import pick_url, shown_url


@dataclass(frozen=True)
class Selection:
    """What to audit: a dataset (scope:name), an observing night, a rule; all None is everything."""
    dataset: str | None = None
    night: str | None = None       # YYYYMMDD (YYYY-MM-DD accepted)
    rule: str | None = None

    def __post_init__(self) -> None:
        if self.night is not None:
            n = self.night.replace("-", "")
            if len(n) != 8 or not n.isdigit():
                raise ConfigError(f"--night {self.night!r}: give the night as YYYY-MM-DD")
            object.__setattr__(self, "night", n)
        if self.dataset is not None and ":" not in self.dataset:
            raise ConfigError(f"--dataset {self.dataset!r}: give it as scope:name")

    def describe(self) -> str:
        parts = [f"dataset {self.dataset}" if self.dataset else "",
                 f"night {self.night[:4]}-{self.night[4:6]}-{self.night[6:]}" if self.night else "",
                 f"rule {self.rule}" if self.rule else ""]
        return ", ".join(p for p in parts if p) or "the whole ledger"

    def wants(self, rule_name: str, rule: RuleSettings | None, relpath: str, mtime: float | None,
              dataset: str | None) -> bool:
        if self.rule and rule_name != self.rule:
            return False
        if self.night:
            if mtime is None or rule is None:
                return False
            if policy.night_of(mtime, rule.night_rollover_hour, rule.tz) != self.night:
                return False
        return not self.dataset or dataset == self.dataset


# (location, url, deep) -> what the storage holds there (None: nothing); raises EdgeAgentError when it
# cannot say. The location (RSE) matters: an S3 RSE's objects are read through URLs Rucio signs for it.
Probe = Callable[[str, str, bool], "RemoteStat | None"]


@dataclass(frozen=True)
class AuditedLake:
    """What the audit reads the configured lake with (build), closed by `close`."""
    records: Records              # the catalogue's read side
    probe: Probe                  # its storage, asked through the transports registry
    schemes: tuple[str, ...]      # the URL schemes a replica is asked in, preferred first (() any)
    close: Callable[[], None]


# ------------------------------------------------------------------ the audit
def run_audit(settings: Settings, ledger: Ledger, cat: Records, probe: Probe, sel: Selection,
              deep: bool = False, now: float | None = None, workers: int = 1,
              schemes: Sequence[str] = ()) -> core.Report:
    """Judge every selected file. `workers` storages are asked at once (each transport still
    keeps its own per-server limits: XRootD answers one checksum query at a time). `schemes`:
    each replica is asked at its URL in the first of these the catalogue lists (() any)."""
    now = time.time() if now is None else now
    if sel.rule and sel.rule not in settings.rules:
        raise ConfigError(f"--rule {sel.rule}: no such rule (have {sorted(settings.rules)})")
    report = core.Report(sel.describe() + (" (deep: every copy read through)" if deep else ""))

    rows = _selected_rows(settings, ledger, sel)
    dids = {(r.scope, r.name): r for r in rows if r.scope and r.name}
    # DIDs the lake holds in the selected datasets that the ledger does not know
    datasets = {tuple(sel.dataset.split(":", 1))} if sel.dataset else {
        (r.scope, r.dataset) for r in rows if r.scope and r.dataset}
    extra: list[tuple[str, str]] = []
    for scope, name in sorted(datasets):
        for f in _dataset_files(cat, scope, name):
            if (f.scope, f.name) not in dids:
                extra.append((f.scope, f.name))
    listed = cat.lookup(sorted(set(dids) | set(extra)), list(schemes) or None)
    buffer_rses = {r.buffer_rse for r in settings.rules.values() if r.buffer_rse}

    every = sorted(set(dids) | set(extra))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="audit") as pool:
        views = dict(zip(every, pool.map(lambda d: _catalogue_view(listed.get(d), probe, deep, buffer_rses, schemes),
                                         every)))
    left = _superseded_by_did(ledger)
    for scope, name in every:
        rec = dids.get((scope, name))
        if rec is not None:
            report.add([core.judge_file(f"{scope}:{name}", _ledger_view(settings, rec), views[(scope, name)],
                                        rec.relpath)])
            continue
        old = left.get((scope, name))
        history = (f"the ledger's #{old.id} ({old.relpath}) registered it and was then superseded: "
                   f"{old.reason or 'no reason recorded'}") if old else None
        report.add([core.judge_file(f"{scope}:{name}", None, views[(scope, name)], history=history)])
    for rec in rows:   # not hashed yet: no DID, judged by the ledger alone
        if not (rec.scope and rec.name):
            report.add([core.judge_file(f"(#{rec.id} {rec.relpath})", _ledger_view(settings, rec), None,
                                        rec.relpath)])
    report.add(_unknown_in_buffer(settings, ledger, sel, now))
    return report


def _dataset_files(cat: Records, scope: str, name: str) -> list[ListedFile]:
    try:
        return cat.dataset_files(scope, name)
    except UnknownDid:
        return []      # a dataset the lake does not hold lists nothing: the ledger's files are judged alone


def _selected_rows(settings: Settings, ledger: Ledger, sel: Selection) -> list[FileRecord]:
    """The newest version of each file in the selection; superseded versions ended and left nothing."""
    newest: dict[tuple[str, bytes], FileRecord] = {}
    for rec in ledger.iter_all():
        if rec.state is State.SUPERSEDED:
            continue
        dataset = f"{rec.scope}:{rec.dataset}" if rec.dataset else None
        mtime = rec.mtime_ns / 1e9 if rec.mtime_ns is not None else None
        if not sel.wants(rec.rule, settings.rules.get(rec.rule), rec.relpath, mtime, dataset):
            continue
        key = (rec.rule, rec.path)
        if key not in newest or rec.id > newest[key].id:
            newest[key] = rec
    return sorted(newest.values(), key=lambda r: r.id)


def _superseded_by_did(ledger: Ledger) -> dict[tuple[str, str], FileRecord]:
    return {(r.scope, r.name): r for r in ledger.in_states([State.SUPERSEDED]) if r.scope and r.name}


def _ledger_view(settings: Settings, rec: FileRecord) -> core.LedgerView:
    rule = settings.rules.get(rec.rule)
    return core.LedgerView(rec.id, rec.rule, rec.relpath, rec.state, rec.size, rec.adler32,
                           rule.copies if rule else 1, rec.reason, rec.md5)


def _catalogue_view(item: ListedFile | None, probe: Probe, deep: bool, buffer_rses: set[str],
                    schemes: Sequence[str]) -> core.CatalogueView | None:
    """Ask the storage behind each AVAILABLE replica what it holds (others are in flight: not asked)."""
    if item is None:
        return None
    copies = []
    for replica in item.replicas:
        location, state, url = replica.location, replica.state, pick_url(replica.urls, schemes)
        shown = shown_url(url) if "://" in url else url   # a query string may carry a signature
        check = partial(core.CopyCheck, location, shown, state, is_buffer=location in buffer_rses)
        if state != "AVAILABLE":
            copies.append(check(checked=False))
        elif not url:
            copies.append(check(error="no URL in a scheme the audit can ask"))
        else:
            try:
                st = probe(location, url, deep)
            except EdgeAgentError as exc:
                copies.append(check(error=str(exc)))
                continue
            copies.append(check(stored_size=st.size if st else None, stored_adler32=st.adler32 if st else None,
                                stored_md5=st.md5 if st else None))
    return core.CatalogueView(item.size, item.adler32, tuple(copies), item.md5)


def _unknown_in_buffer(settings: Settings, ledger: Ledger, sel: Selection, now: float) -> Iterable[core.FileAudit]:
    from .watch.filters import RuleFilter
    from .watch.scanner import walk
    grace = 2 * settings.rescan_seconds
    for name, rule in settings.rules.items():
        if sel.rule and name != sel.rule or not rule.directory.is_dir():
            continue
        known = ledger.live_paths(name)
        filt = RuleFilter(rule)
        for e in walk(os.fsencode(rule.directory), rule.recursive):
            if e.problem or e.st is None or filt(e.relpath) is not None or e.path in known:
                continue
            mtime = e.st.st_mtime
            dataset = None
            if rule.dataset_template:
                fields = policy.naming_fields(e.relpath, mtime, name, rule.night_rollover_hour, rule.tz)
                dataset = f"{rule.scope}:{policy.render(rule.dataset_template, fields)}"
            if sel.wants(name, rule, e.relpath, mtime, dataset):
                yield core.judge_unknown(os.path.join(str(rule.directory), e.relpath),
                                         max(0.0, now - mtime), grace + rule.stable_seconds)


# ------------------------------------------------------------------ the lake kinds
def build(settings: Settings) -> AuditedLake:
    """The configured lake's catalogue, read-only, and its storage's probe (through the transports
    registry the agent builds), and how to close them."""
    if settings.lake.kind == "local":
        return _local(settings)
    return _rucio(settings)


def _local(settings: Settings) -> AuditedLake:
    from .app import build_transports
    from .lake.local import LocalCatalogue
    from .transfer.posix import PosixTransport
    records = LocalCatalogue.read_only(settings.lake_catalog_path, settings.destinations,
                                       settings.lake.effective_name_pattern)
    transports = build_transports(settings)
    # a copy recorded under a directory no destination names any more is asked all the same
    transports.mount("/", PosixTransport())
    verify_of = {str(d.path): d.verify for d in settings.destinations.values() if d.path}

    def local_probe(location: str, url: str, deep: bool) -> RemoteStat | None:
        how = "reread" if deep else next((v for p, v in verify_of.items() if url.startswith(p + os.sep)),
                                         "reread")
        return transports.for_url(url).stat(url, verify=how)

    def close() -> None:
        records.close()
        transports.close()
    return AuditedLake(records, local_probe, (), close)


def _rucio(settings: Settings) -> AuditedLake:
    from .access import ObjectMissing, Reader, digest_of, storage_client, storage_tls
    from .app import RUCIO_SCHEMES, build_s3_transports, rucio_transports
    from .lake.rucio import RucioRecords
    from .lake.rucio_client import RucioClient
    from .lake.signed_reads import SignedReadResolver
    from .transfer.s3 import S3Transport
    rucio = settings.lake.rucio
    assert rucio is not None
    client = RucioClient(rucio)
    records = RucioRecords(client)
    transports = rucio_transports(settings, client)
    # S3 RSEs (Rucio's sign_url=s3): their objects answer only URLs Rucio signs, and hold no adler32.
    # The agent's S3 destinations come with their CA files; an S3 RSE the agent never writes to
    # (a copy the lake made) gets a transport of its own, trusting the same CAs.
    s3_cas = [str(d.ca_cert) for d in settings.destinations.values() if d.sign_url and d.ca_cert]
    s3 = build_s3_transports(settings, client)
    signed_reads = SignedReadResolver(client)
    s3_lock = threading.Lock()

    def s3_transport(rse: str) -> S3Transport:
        with s3_lock:
            if rse not in s3:
                def sign(op: str, url: str, rse: str = rse) -> str:
                    return client.signed_url(rse, op, url, 600)
                s3[rse] = S3Transport(sign, verify=storage_tls(rucio, s3_cas), timeout=rucio.timeout_seconds)
            return s3[rse]
    # HTTP first: one HEAD with Want-Digest per copy, where root:// costs two xrdfs processes
    # (stat, then query checksum): 80 replicas on XRootD 5.5 took 3.6 s instead of 12-28 s (loaded 2-core
    # machine). Same storage, same checksum cache, same answer.
    known = [s for s in rucio.schemes if s in RUCIO_SCHEMES] + [s for s in RUCIO_SCHEMES if s not in rucio.schemes]
    schemes = [s for s in known if s in ("davs", "https", "http")] + [s for s in known if s not in ("davs", "https", "http")]
    http = storage_client(rucio, client, s3_cas)
    reader_ = Reader(http, rucio.timeout_seconds, root_client=rucio.root_client)

    def rucio_probe(location: str, url: str, deep: bool) -> RemoteStat | None:
        is_s3 = signed_reads.is_s3(location)
        if is_s3 and not deep:
            return s3_transport(location).stat(url)        # size and ETag (MD5), one signed ranged GET
        if deep:
            if is_s3:
                url = signed_reads(location, url)
            try:
                with reader_.chunks(url) as it:
                    size, adler = digest_of(it)
            except ObjectMissing:
                return None
            return RemoteStat(size, adler)
        return transports.for_url(url).stat(url)

    def close() -> None:
        http.close()
        transports.close()
        for t in s3.values():
            getattr(t, "close", lambda: None)()
        records.close()
    return AuditedLake(records, rucio_probe, tuple(schemes), close)
